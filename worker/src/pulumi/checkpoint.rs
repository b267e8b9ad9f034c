//! Checkpoints while Pulumi runs, and recovery from a run that never ended.
//!
//! The CLI rewrites the stack's checkpoint file after each step of an
//! operation. [`watch`] polls that file while the CLI runs and hands each new
//! state to a [`CheckpointSink`], whose owner stores it: a worker killed in
//! the middle of a run leaves the state of what it had already deployed, and
//! the worker that takes the command over resumes from it instead of
//! deploying a second copy.
//!
//! Such a state may hold *pending operations* (steps the dead run started
//! and never finished). [`clear_pending`] drops them before the next run,
//! which then refreshes the stack so Pulumi's view matches what exists.

use std::{path::Path, time::Duration};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{StackState, workspace::Workspace};

/// How often the checkpoint file is looked at while the CLI runs.
const POLL: Duration = Duration::from_millis(150);

/// Receives the checkpoints an operation writes, at most one per interval;
/// the latest one wins.
#[derive(Debug)]
pub struct CheckpointSink {
    tx: watch::Sender<Option<StackState>>,
    interval: Duration,
}

impl CheckpointSink {
    /// A sink taking at most one checkpoint per `interval` (each read parses
    /// the whole state, and its owner stores it whole), and the receiver its
    /// owner drains (see `watch::Receiver::changed`; the receiver sees the
    /// last state even after the sink is dropped).
    pub fn channel(interval: Duration) -> (Self, watch::Receiver<Option<StackState>>) {
        let (tx, rx) = watch::channel(None);
        (Self { tx, interval }, rx)
    }

    pub(crate) fn send(&self, state: StackState) {
        self.tx.send_replace(Some(state));
    }
}

/// Polls the workspace's checkpoint until `done`, sending a change once
/// the sink's interval has passed since the last one sent (marked as taken
/// in the middle of an `up` when `mid_up`).
pub(crate) async fn watch(
    ws: &Workspace,
    salt: &str,
    sink: &CheckpointSink,
    done: &CancellationToken,
    mid_up: bool,
) {
    let path = ws.state_path();
    let mut last = stamp(&path).await;
    let mut sent_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        if sent_at.is_some_and(|t| t.elapsed() < sink.interval) {
            continue;
        }
        let now = stamp(&path).await;
        if now == last {
            continue;
        }
        last = now;
        sent_at = Some(tokio::time::Instant::now());
        // The backend replaces the file in one rename, so a read sees a whole
        // checkpoint; one that does not parse is skipped until the next.
        if let Ok(Some(mut state)) = ws.read_state(salt).await {
            state.mid_up = mid_up;
            sink.send(state);
        }
    }
}

async fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The URNs of the resources a dead run left pending creation in
/// `checkpoint`: they may exist, and no state gives their id.
pub(crate) fn pending_creates(checkpoint: &Value) -> Vec<String> {
    checkpoint
        .pointer("/checkpoint/latest/pending_operations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|op| op.get("type").and_then(Value::as_str) == Some("creating"))
        .map(|op| {
            op.pointer("/resource/urn")
                .and_then(Value::as_str)
                .unwrap_or("unknown resource")
                .to_owned()
        })
        .collect()
}

/// Removes the pending operations a dead run left in `checkpoint`, returning
/// a description of each (`type urn`) for the log. Empty when there were none.
pub(crate) fn clear_pending(checkpoint: &mut Value) -> Vec<String> {
    let Some(pending) = checkpoint
        .pointer_mut("/checkpoint/latest/pending_operations")
        .and_then(Value::as_array_mut)
    else {
        return Vec::new();
    };
    let cleared = pending
        .iter()
        .map(|op| {
            let kind = op.get("type").and_then(Value::as_str).unwrap_or("unknown");
            let urn = op
                .pointer("/resource/urn")
                .and_then(Value::as_str)
                .unwrap_or("unknown resource");
            format!("{kind} {urn}")
        })
        .collect();
    pending.clear();
    cleared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clears_pending_operations_and_says_which() {
        let mut cp = serde_json::json!({"version": 3, "checkpoint": {"latest": {
            "resources": [{"urn": "urn:pulumi:s::p::pulumi:pulumi:Stack::p-s"}],
            "pending_operations": [
                {"type": "creating", "resource": {"urn": "urn:pulumi:s::p::x:y:Z::a"}},
                {"type": "deleting", "resource": {"urn": "urn:pulumi:s::p::x:y:Z::b"}}
            ]
        }}});
        assert_eq!(pending_creates(&cp), ["urn:pulumi:s::p::x:y:Z::a"]);
        let cleared = clear_pending(&mut cp);
        assert!(pending_creates(&cp).is_empty());
        assert_eq!(
            cleared,
            [
                "creating urn:pulumi:s::p::x:y:Z::a",
                "deleting urn:pulumi:s::p::x:y:Z::b"
            ]
        );
        assert_eq!(
            cp.pointer("/checkpoint/latest/pending_operations"),
            Some(&serde_json::json!([]))
        );
        // Resources are kept, and a second pass finds nothing.
        assert_eq!(
            cp.pointer("/checkpoint/latest/resources/0/urn")
                .and_then(Value::as_str),
            Some("urn:pulumi:s::p::pulumi:pulumi:Stack::p-s")
        );
        assert!(clear_pending(&mut cp).is_empty());
        assert!(clear_pending(&mut serde_json::json!({"checkpoint": {"latest": null}})).is_empty());
    }
}

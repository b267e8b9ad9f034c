//! `cmctl queue status`: the command stream and its consumers as JetStream
//! reports them, read-only (nothing is pulled, nothing is created).
//!
//! - queued: commands in `CM_COMMANDS` (work-queue retention keeps a command
//!   until a worker acks it, so this is every unfinished command);
//! - pending / ack pending / redelivered / waiting: the workers' consumer
//!   `cm-workers` (not yet delivered, delivered and unacknowledged, delivered
//!   more than once, open pull requests); without that consumer (no worker
//!   ever ran) every queued command is pending;
//! - oldest pending age: since the oldest unfinished command was queued;
//! - dead letters: messages in `CM_DEAD_LETTERS`.

use async_nats::jetstream::consumer;
use clap::Subcommand;
use cm_core::protocol::{COMMANDS_STREAM, DEAD_LETTERS_STREAM, WORKERS_CONSUMER};
use futures::TryStreamExt;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::Ctx;
use crate::{args::rfc3339, error::CliError, nats, output::View};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Pending, in-flight and redelivered commands, the oldest one's age, the
    /// consumers and the dead letters.
    Status,
}

pub async fn run(cmd: Cmd, ctx: &Ctx) -> Result<(), CliError> {
    let Cmd::Status = cmd;
    let js = ctx.jetstream().await?;
    let mut commands = nats::stream(&js, COMMANDS_STREAM).await?;
    let state = commands
        .info()
        .await
        .map_err(|e| CliError::nats("stream info", e))?
        .state
        .clone();
    let consumers: Vec<consumer::Info> = commands
        .consumers()
        .try_collect()
        .await
        .map_err(|e| CliError::nats("consumers", e))?;
    let mut dlq = nats::stream(&js, DEAD_LETTERS_STREAM).await?;
    let dead_letters = dlq
        .info()
        .await
        .map_err(|e| CliError::nats("dead-letter stream info", e))?
        .state
        .messages;

    let workers = consumers.iter().find(|c| c.name == WORKERS_CONSUMER);
    let (oldest_at, oldest_age) = if state.messages > 0 {
        let at = state.first_timestamp;
        let age = (OffsetDateTime::now_utc() - at).as_seconds_f64().max(0.0);
        (Some(at), age)
    } else {
        (None, 0.0)
    };
    let pending = workers.map_or(state.messages, |w| w.num_pending);
    let ack_pending = workers.map_or(0, |w| w.num_ack_pending);
    let redelivered = workers.map_or(0, |w| w.num_redelivered);
    let waiting = workers.map_or(0, |w| w.num_waiting);

    let json = json!({
        "stream": COMMANDS_STREAM,
        "queued": state.messages,
        "pending": pending,
        "ackPending": ack_pending,
        "redelivered": redelivered,
        "waiting": waiting,
        "oldestPendingAgeSeconds": (oldest_age * 1000.0).round() / 1000.0,
        "oldestPendingAt": oldest_at.map(rfc3339),
        "workersConsumer": workers.is_some(),
        "consumers": consumers.iter().map(|c| json!({
            "name": c.name,
            "pending": c.num_pending,
            "ackPending": c.num_ack_pending,
            "redelivered": c.num_redelivered,
            "waiting": c.num_waiting,
        })).collect::<Vec<Value>>(),
        "deadLetters": dead_letters,
    });
    ctx.printer.emit(json, || {
        let mut fields = vec![
            ("stream".into(), COMMANDS_STREAM.to_owned()),
            ("queued".into(), state.messages.to_string()),
            ("pending".into(), pending.to_string()),
            ("ack pending".into(), ack_pending.to_string()),
            ("redelivered".into(), redelivered.to_string()),
            ("waiting pulls".into(), waiting.to_string()),
            (
                "oldest pending".into(),
                oldest_at.map_or("-".into(), |at| {
                    format!("{} ago ({})", age_text(oldest_age), rfc3339(at))
                }),
            ),
            ("dead letters".into(), dead_letters.to_string()),
        ];
        if workers.is_none() {
            fields.push((
                "note".into(),
                format!("no {WORKERS_CONSUMER} consumer: no worker has run against this stream"),
            ));
        }
        let table = View::Table {
            headers: vec![
                "CONSUMER",
                "PENDING",
                "ACK PENDING",
                "REDELIVERED",
                "WAITING",
            ],
            rows: consumers
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.num_pending.to_string(),
                        c.num_ack_pending.to_string(),
                        c.num_redelivered.to_string(),
                        c.num_waiting.to_string(),
                    ]
                })
                .collect(),
        };
        View::Sections(vec![View::Fields(fields), table])
    });
    Ok(())
}

/// `4.2s`, `3m 12s`, `2h 5m`.
fn age_text(seconds: f64) -> String {
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds as u64;
    match s {
        ..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age_text(4.25), "4.2s");
        assert_eq!(age_text(192.0), "3m 12s");
        assert_eq!(age_text(7500.0), "2h 5m");
    }
}

//! Result and lifecycle events on `CM_EVENTS`: `cm.evt.<event>.<challenge>`,
//! retained for replay, so they never carry a flag.
//!
//! Each settled command publishes one event: its kind's past tense on
//! success (`instance.created`), `instance.expiry-skipped` when the
//! janitor's order found the instance renewed, `command.failed` on a
//! failure. Headers: `cm-command-id`, and `Nats-Msg-Id` =
//! `<command id>-<event>` so a redelivery's copy counts once.
//!
//! Owns: event names and subjects, their headers, stripping flags. Must not
//! know: how a result was reached, retries of the publish.

use async_nats::HeaderMap;
use bytes::Bytes;
use cm_schemas::v1::{CommandResult, command_result::Outcome};
use prost::Message as _;

use super::envelope::{CommandKind, HDR_MSG_ID, inject_trace_context};
use crate::ids;

/// The command id on result events.
pub const HDR_COMMAND_ID: &str = "cm-command-id";

/// `cm.evt.<event>.<challenge>`; `event` is two tokens (`instance.created`).
pub fn event_subject(event: &str, challenge_id: &str) -> String {
    format!("cm.evt.{event}.{}", ids::encode(challenge_id))
}

/// Past-tense event name of a command kind's success.
pub fn event_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::ChallengeCreate => "challenge.created",
        CommandKind::ChallengeUpdate => "challenge.updated",
        CommandKind::ChallengeDelete => "challenge.deleted",
        CommandKind::InstanceCreate => "instance.created",
        CommandKind::InstanceRenew => "instance.renewed",
        CommandKind::InstanceDelete => "instance.deleted",
        CommandKind::InstanceExpire => "instance.expired",
        CommandKind::InstanceReset => "instance.reset",
        CommandKind::InstanceUpdate => "instance.updated",
        CommandKind::PoolRefill => "pool.refilled",
        CommandKind::StackReclaim => "stack.reclaimed",
    }
}

/// One event, ready to publish.
#[derive(Debug, Clone)]
pub struct Event {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Event {
    /// The event that tells a command of `kind` about `challenge_id` was
    /// answered with `result` (flags removed), under the current trace.
    pub fn of_result(kind: CommandKind, challenge_id: &str, result: &CommandResult) -> Self {
        let name = match (&result.outcome, kind) {
            (Some(Outcome::Failure(_)), _) => "command.failed",
            // The janitor's order found the instance renewed: nothing expired.
            (Some(Outcome::Instance(_)), CommandKind::InstanceExpire) => "instance.expiry-skipped",
            _ => event_name(kind),
        };
        let mut headers = HeaderMap::new();
        headers.insert(HDR_COMMAND_ID, result.command_id.as_str());
        headers.insert(HDR_MSG_ID, format!("{}-{name}", result.command_id));
        inject_trace_context(&mut headers);
        Self {
            subject: event_subject(name, challenge_id),
            headers,
            payload: Bytes::from(without_flags(result).encode_to_vec()),
        }
    }
}

/// The result as events carry it: flags are secrets, kept for the caller's
/// reply and the store, never written to the retained event stream.
pub fn without_flags(result: &CommandResult) -> CommandResult {
    let mut event = result.clone();
    let strip = |i: &mut cm_schemas::v1::Instance| {
        i.flags.clear();
        i.flag = None;
    };
    match &mut event.outcome {
        Some(Outcome::Instance(i)) => strip(i),
        Some(Outcome::Challenge(c)) => c.instances.iter_mut().for_each(strip),
        _ => {}
    }
    event
}

#[cfg(test)]
mod tests {
    use cm_schemas::v1::{Failure, Instance};

    use super::*;

    fn with_flag(outcome: Outcome) -> CommandResult {
        CommandResult {
            command_id: "c1".into(),
            finished_at: None,
            outcome: Some(outcome),
        }
    }

    #[test]
    fn an_event_names_its_outcome_and_drops_flags() {
        let instance = Instance {
            flags: vec!["FLAG{x}".into()],
            flag: Some("FLAG{x}".into()),
            ..Default::default()
        };
        let ok = Event::of_result(
            CommandKind::InstanceCreate,
            "web.1",
            &with_flag(Outcome::Instance(instance.clone())),
        );
        assert_eq!(ok.subject, "cm.evt.instance.created.web~2E1");
        assert_eq!(
            ok.headers.get(HDR_MSG_ID).map(|v| v.as_str()),
            Some("c1-instance.created")
        );
        assert_eq!(
            ok.headers.get(HDR_COMMAND_ID).map(|v| v.as_str()),
            Some("c1")
        );
        let decoded = CommandResult::decode(ok.payload).expect("decodes");
        let Some(Outcome::Instance(i)) = decoded.outcome else {
            panic!("an instance");
        };
        assert!(i.flags.is_empty() && i.flag.is_none());

        let skipped = Event::of_result(
            CommandKind::InstanceExpire,
            "a",
            &with_flag(Outcome::Instance(instance)),
        );
        assert_eq!(skipped.subject, "cm.evt.instance.expiry-skipped.a");
        let failed = Event::of_result(
            CommandKind::PoolRefill,
            "a",
            &with_flag(Outcome::Failure(Failure::default())),
        );
        assert_eq!(failed.subject, "cm.evt.command.failed.a");
    }
}

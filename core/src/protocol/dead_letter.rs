//! Dead letters on `CM_DEAD_LETTERS`: commands a worker gave up on, written
//! by the worker's consumer and read, replayed or deleted by `cmctl dlq`.
//!
//! A dead letter is the command's payload and headers as delivered, on
//! `cm.dlq.<kind>.<encoded challenge id>` (`cm.dlq.unknown.unknown` for an
//! undecodable command), plus
//! - `cm-failure-reason` (one line) and `cm-deliveries`;
//! - where it came from: `cm-original-subject`, `cm-original-msg-id`,
//!   `cm-original-sequence` (its sequence in `CM_COMMANDS`);
//! - `Nats-Msg-Id` = `dlq-<sequence>-<original id>`: never de-duplicated
//!   against the command itself, nor against an earlier dead letter of the
//!   same command (replayed, then failed again), while every delivery of one
//!   message gives the same id. Letters written before the sequence was
//!   recorded carry `dlq-<original id>`.
//!
//! A replay publishes the payload on the original subject with the headers
//! the command carried and its original `Nats-Msg-Id` restored.
//!
//! Owns: the letter's subject, headers and id, and reading them back. Must
//! not know: why a command failed, the streams' retention, the CLI.

use async_nats::HeaderMap;
use cm_schemas::v1::Command;

use super::envelope::{CommandKind, HDR_MSG_ID, command_subject};
use crate::ids;

/// Why a command was dead-lettered.
pub const HDR_FAILURE_REASON: &str = "cm-failure-reason";
/// How many times it was delivered before being dead-lettered.
pub const HDR_DELIVERIES: &str = "cm-deliveries";
/// A dead letter's subject on the command stream, where a replay publishes it.
pub const HDR_ORIGINAL_SUBJECT: &str = "cm-original-subject";
/// A dead letter's `Nats-Msg-Id` on the command stream, which a replay restores.
pub const HDR_ORIGINAL_MSG_ID: &str = "cm-original-msg-id";
/// A dead letter's sequence in the command stream.
pub const HDR_ORIGINAL_SEQUENCE: &str = "cm-original-sequence";

/// Headers the dead-lettering adds, which the command did not carry.
pub const ADDED_HEADERS: [&str; 6] = [
    HDR_FAILURE_REASON,
    HDR_DELIVERIES,
    HDR_ORIGINAL_SUBJECT,
    HDR_ORIGINAL_MSG_ID,
    HDR_ORIGINAL_SEQUENCE,
    HDR_MSG_ID,
];

/// Where an undecodable command's letter goes.
pub const UNKNOWN_SUBJECT: &str = "cm.dlq.unknown.unknown";

/// `cm.dlq.<kind>.<challenge>`; `kind` is `unknown.unknown` for undecodable commands.
pub fn dead_letter_subject(kind: &str, challenge_id: &str) -> String {
    format!("cm.dlq.{kind}.{}", ids::encode(challenge_id))
}

/// The letter's subject for a command of `kind` about a challenge, or for
/// an undecodable one (`None`).
pub fn subject_for(about: Option<(CommandKind, &str)>) -> String {
    match about {
        Some((kind, cid)) => dead_letter_subject(kind.as_str(), cid),
        None => UNKNOWN_SUBJECT.to_owned(),
    }
}

/// The letter's `Nats-Msg-Id`: the command message's sequence and original id.
pub fn letter_msg_id(sequence: u64, original_id: Option<&str>) -> String {
    format!("dlq-{sequence}-{}", original_id.unwrap_or_default())
}

/// What a worker gave up on, as it was delivered.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The command's headers.
    pub headers: Option<&'a HeaderMap>,
    /// Its subject on the command stream.
    pub subject: &'a str,
    /// Its sequence in the command stream, when known.
    pub sequence: Option<u64>,
    /// How many times it was delivered.
    pub delivered: i64,
}

/// The letter's headers: the command's, the reason (one line), the count
/// and the origin, and the letter's own id.
pub fn letter_headers(delivery: Delivery<'_>, reason: &str) -> HeaderMap {
    let mut headers = delivery.headers.cloned().unwrap_or_default();
    headers.insert(HDR_FAILURE_REASON, reason.replace(['\r', '\n'], " "));
    headers.insert(HDR_DELIVERIES, delivery.delivered.to_string());
    headers.insert(HDR_ORIGINAL_SUBJECT, delivery.subject);
    let original_id = headers.get(HDR_MSG_ID).map(|v| v.as_str().to_owned());
    if let Some(id) = &original_id {
        headers.insert(HDR_ORIGINAL_MSG_ID, id.as_str());
    }
    if let Some(seq) = delivery.sequence {
        headers.insert(HDR_ORIGINAL_SEQUENCE, seq.to_string());
    }
    match (delivery.sequence, &original_id) {
        (Some(seq), id) => headers.insert(HDR_MSG_ID, letter_msg_id(seq, id.as_deref())),
        (None, Some(id)) => headers.insert(HDR_MSG_ID, format!("dlq-{id}")),
        (None, None) => {}
    }
    headers
}

/// The `Nats-Msg-Id` the command was queued with, read from its letter's
/// headers (`None`: it had none).
pub fn original_msg_id(headers: &HeaderMap) -> Option<String> {
    if let Some(id) = headers.get(HDR_ORIGINAL_MSG_ID) {
        return Some(id.as_str().to_owned());
    }
    if headers.get(HDR_ORIGINAL_SEQUENCE).is_some() {
        // Written by a worker that records the id: the command had none.
        return None;
    }
    // Older dead letters: `dlq-<original id>`.
    headers
        .get(HDR_MSG_ID)
        .and_then(|id| id.as_str().strip_prefix("dlq-"))
        .map(str::to_owned)
}

/// The command's kind from a letter's subject (`instance.create`), or `unknown`.
pub fn kind_of(subject: &str) -> String {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["cm", "dlq", "unknown", "unknown"] => "unknown".into(),
        ["cm", "dlq", a, b, _] => format!("{a}.{b}"),
        _ => "unknown".into(),
    }
}

/// The challenge id, decoded from a letter's subject.
pub fn challenge_of(subject: &str) -> Option<String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["cm", "dlq", _, _, cid] => ids::decode(cid),
        _ => None,
    }
}

/// Where a replay queues the letter's `command`: the recorded subject, else
/// the command's own.
pub fn replay_subject(headers: &HeaderMap, command: &Command) -> String {
    match headers.get(HDR_ORIGINAL_SUBJECT) {
        Some(s) => s.as_str().to_owned(),
        None => match &command.request {
            Some(r) => {
                let (kind, cid) = CommandKind::of(r);
                command_subject(kind, cid)
            }
            None => String::new(),
        },
    }
}

/// The headers a replay publishes with: the command's own (those the
/// dead-lettering added removed), its original `Nats-Msg-Id` restored.
pub fn replay_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if ADDED_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            continue;
        }
        for v in values {
            out.append(name, v.as_str());
        }
    }
    if let Some(id) = original_msg_id(headers) {
        out.insert(HDR_MSG_ID, id.as_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HDR_MSG_ID, "0190-abc");
        h.insert("traceparent", "00-1-2-01");
        h
    }

    #[test]
    fn a_written_letter_reads_back() {
        let original = command_headers();
        let headers = letter_headers(
            Delivery {
                headers: Some(&original),
                subject: "cm.cmd.instance.create.web~2E1",
                sequence: Some(42),
                delivered: 5,
            },
            "boom\r\nagain",
        );
        let get = |n: &str| headers.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get(HDR_MSG_ID).as_deref(), Some("dlq-42-0190-abc"));
        assert_eq!(get(HDR_FAILURE_REASON).as_deref(), Some("boom  again"));
        assert_eq!(get(HDR_DELIVERIES).as_deref(), Some("5"));
        assert_eq!(get(HDR_ORIGINAL_SEQUENCE).as_deref(), Some("42"));
        assert_eq!(original_msg_id(&headers).as_deref(), Some("0190-abc"));

        let replay = replay_headers(&headers);
        assert_eq!(replay.get(HDR_MSG_ID).map(|v| v.as_str()), Some("0190-abc"));
        assert_eq!(
            replay.get("traceparent").map(|v| v.as_str()),
            Some("00-1-2-01")
        );
        for added in &ADDED_HEADERS[..5] {
            assert!(replay.get(*added).is_none(), "{added}");
        }
        assert_eq!(
            replay_subject(&headers, &Command::default()),
            "cm.cmd.instance.create.web~2E1"
        );
    }

    #[test]
    fn letters_without_an_id_or_from_older_workers_read_back() {
        let none = letter_headers(
            Delivery {
                headers: None,
                subject: "cm.cmd.pool.refill.a",
                sequence: Some(7),
                delivered: 1,
            },
            "r",
        );
        assert_eq!(none.get(HDR_MSG_ID).map(|v| v.as_str()), Some("dlq-7-"));
        assert_eq!(original_msg_id(&none), None);
        let mut older = HeaderMap::new();
        older.insert(HDR_MSG_ID, "dlq-0190-abc");
        assert_eq!(original_msg_id(&older).as_deref(), Some("0190-abc"));
    }

    #[test]
    fn subjects_name_kind_and_challenge() {
        let s = subject_for(Some((CommandKind::InstanceCreate, "web.1")));
        assert_eq!(s, "cm.dlq.instance.create.web~2E1");
        assert_eq!(kind_of(&s), "instance.create");
        assert_eq!(challenge_of(&s).as_deref(), Some("web.1"));
        assert_eq!(subject_for(None), "cm.dlq.unknown.unknown");
        assert_eq!(kind_of(UNKNOWN_SUBJECT), "unknown");
        assert_eq!(challenge_of(UNKNOWN_SUBJECT), None);
    }
}

//! Reply routing: how a waiter hears a command's result.
//!
//! A waiter (an API process, a challenge update waiting for its instances'
//! updates) owns a prefix and subscribes `<prefix>.*`; a command it waits
//! for carries `cm-reply: <prefix>.<command id>` (see
//! [`super::envelope::Outgoing::reply_to`]); the worker publishes the
//! protobuf [`CommandResult`] there, on core NATS (no stream: a reply lost
//! while the waiter reconnects is found in the operation record instead).
//!
//! Owns: the `cm-reply` header, the reply prefix and subject layout, the
//! reply's payload. Must not know: the envelope (which uses this), how long
//! a waiter waits, or the operation record.

use async_nats::HeaderMap;
use bytes::Bytes;
use cm_schemas::v1::CommandResult;
use prost::Message as _;

/// Where a waiter hears a command's result: `<prefix>.<command id>`.
pub const HDR_REPLY: &str = "cm-reply";

/// A fresh prefix for one API process's waiters: `_CM_REPLY.<uuid>`.
pub fn fresh_prefix() -> String {
    format!("_CM_REPLY.{}", uuid::Uuid::new_v4().simple())
}

/// What a waiter on `prefix` subscribes: every command's reply subject.
pub fn subscription(prefix: &str) -> String {
    format!("{prefix}.*")
}

/// The reply subject of command `command_id` under `prefix`.
pub fn reply_subject(prefix: &str, command_id: &str) -> String {
    format!("{prefix}.{command_id}")
}

/// The command a reply subject is about (its last token).
pub fn command_id_of(subject: &str) -> Option<&str> {
    subject.rsplit('.').next()
}

/// Where a delivered command's result is awaited, if anywhere.
pub fn reply_to(headers: Option<&HeaderMap>) -> Option<&str> {
    headers.and_then(|h| h.get(HDR_REPLY)).map(|v| v.as_str())
}

/// A reply's payload.
pub fn encode(result: &CommandResult) -> Bytes {
    Bytes::from(result.encode_to_vec())
}

/// The result a reply carries.
pub fn decode(payload: Bytes) -> Result<CommandResult, prost::DecodeError> {
    CommandResult::decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_subject_names_its_command() {
        let prefix = fresh_prefix();
        assert!(prefix.starts_with("_CM_REPLY.") && !prefix[10..].contains('.'));
        let subject = reply_subject(&prefix, "0190-abc");
        assert_eq!(subject, format!("{prefix}.0190-abc"));
        assert_eq!(command_id_of(&subject), Some("0190-abc"));
        assert_eq!(subscription("_INBOX.x"), "_INBOX.x.*");
        let mut headers = HeaderMap::new();
        headers.insert("cm-reply", subject.as_str());
        assert_eq!(reply_to(Some(&headers)), Some(subject.as_str()));
        assert_eq!(reply_to(None), None);
    }

    #[test]
    fn a_reply_round_trips() {
        let result = CommandResult {
            command_id: "c1".into(),
            ..Default::default()
        };
        let bytes = encode(&result);
        assert_eq!(&bytes[..], b"\x0a\x02c1");
        assert_eq!(decode(bytes).expect("decodes"), result);
    }
}

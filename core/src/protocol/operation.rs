//! The operation record: what `GET /api/v1/operation/{id}` shows, and how a
//! command's answer outlives its reply.
//!
//! The API writes a pending record for a command a caller does not wait
//! for (or stopped waiting for); the worker settles it with the result,
//! once; a redelivery, a retried request (same `Idempotency-Key`) and a
//! waiter whose reply was lost read the settled record back. Records live
//! between [`RETENTION_KEEP_SECS`] and [`RETENTION_TTL_SECS`] on a shared
//! lease ([`retention_lease`]).
//!
//! Stored as the protobuf canonical JSON of [`Operation`] (camelCase, state
//! by name). This module is the only place that encodes or decodes it.
//!
//! Owns: the record's states, its encoding, "is it settled", which life of
//! a command a record belongs to, the retention. Must not know: the etcd
//! key layout or transactions (the store), NATS.

use std::time::SystemTime;

use cm_schemas::{
    v1::{Command, CommandResult, Operation, command_result::Outcome, operation::State},
    wkt::Timestamp,
};

use super::envelope::CommandKind;
use crate::lock::RetentionLease;

/// A record lives at least this long (a day)...
pub const RETENTION_KEEP_SECS: i64 = 24 * 3600;
/// ...and at most this long.
pub const RETENTION_TTL_SECS: i64 = 25 * 3600;

/// The lease operation records are attached to.
pub fn retention_lease(client: etcd_client::Client) -> RetentionLease {
    RetentionLease::new(client, RETENTION_KEEP_SECS, RETENTION_TTL_SECS)
}

/// Why a record could not be encoded, or stored bytes are not a record.
#[derive(Debug, thiserror::Error)]
#[error("operation record: {0}")]
pub struct RecordError(#[from] serde_json::Error);

/// One command's operation record.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord(Operation);

impl OperationRecord {
    /// The record of `command`, accepted and not yet answered.
    pub fn pending(command: &Command) -> Self {
        Self(Operation {
            id: command.command_id.clone(),
            kind: kind_of(command),
            state: State::Pending as i32,
            created_at: command.issued_at,
            result: None,
        })
    }

    /// The record of `command` answered with `result` (failed when the
    /// result is a failure).
    pub fn settled(command: &Command, result: CommandResult) -> Self {
        let failed = matches!(result.outcome, Some(Outcome::Failure(_)));
        Self(Operation {
            id: command.command_id.clone(),
            kind: kind_of(command),
            state: if failed {
                State::Failed
            } else {
                State::Succeeded
            } as i32,
            created_at: command.issued_at,
            result: Some(result),
        })
    }

    /// The command id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Whether the command was answered (succeeded or failed).
    pub fn is_settled(&self) -> bool {
        self.0.state != State::Pending as i32
    }

    /// The answer, when settled.
    pub fn result(&self) -> Option<&CommandResult> {
        self.0.result.as_ref().filter(|_| self.is_settled())
    }

    /// The answer, when settled.
    pub fn into_result(self) -> Option<CommandResult> {
        if self.is_settled() {
            self.0.result
        } else {
            None
        }
    }

    /// When the answer was recorded.
    pub fn finished_at(&self) -> Option<&Timestamp> {
        self.0.result.as_ref().and_then(|r| r.finished_at.as_ref())
    }

    /// Whether this record was finished before `since` (a message's
    /// publication): it answered an earlier life of the command (dead-
    /// lettered, then replayed), not the one published at `since`. Unknown
    /// times count as not before.
    pub fn finished_before(&self, since: SystemTime) -> bool {
        self.finished_at()
            .is_some_and(|f| crate::model::to_system_time(f) < since)
    }

    /// The record as clients see it.
    pub fn operation(&self) -> &Operation {
        &self.0
    }

    pub fn into_operation(self) -> Operation {
        self.0
    }

    /// The stored bytes.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        Ok(serde_json::to_vec(&self.0)?)
    }

    /// A record from its stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        Ok(Self(serde_json::from_slice(bytes)?))
    }
}

fn kind_of(command: &Command) -> String {
    command
        .request
        .as_ref()
        .map(|r| CommandKind::of(r).0.as_str().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use cm_schemas::v1::{Failure, RefillPool, Requester, command::Request};

    use super::*;

    fn command() -> Command {
        Command {
            command_id: "0190-c1".into(),
            issued_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            requested_by: Some(Requester::default()),
            request: Some(Request::PoolRefill(RefillPool {
                challenge_id: "web".into(),
            })),
        }
    }

    #[test]
    fn a_pending_record_is_stored_as_this_json() {
        let rec = OperationRecord::pending(&command());
        assert_eq!(
            String::from_utf8(rec.encode().expect("encodes")).expect("utf-8"),
            r#"{"id":"0190-c1","kind":"pool.refill","state":"PENDING","createdAt":"2023-11-14T22:13:20Z"}"#
        );
        assert!(!rec.is_settled());
        assert_eq!(rec.result(), None);
        assert_eq!(
            OperationRecord::decode(&rec.encode().expect("encodes")).expect("decodes"),
            rec
        );
    }

    #[test]
    fn a_settled_record_round_trips_and_knows_its_life() {
        let result = CommandResult {
            command_id: "0190-c1".into(),
            finished_at: Some(Timestamp {
                seconds: 1_700_000_100,
                nanos: 0,
            }),
            outcome: Some(Outcome::Failure(Failure::default())),
        };
        let rec = OperationRecord::settled(&command(), result.clone());
        let json = String::from_utf8(rec.encode().expect("encodes")).expect("utf-8");
        assert!(json.contains(r#""state":"FAILED""#), "{json}");
        let back = OperationRecord::decode(json.as_bytes()).expect("decodes");
        assert!(back.is_settled());
        assert_eq!(back.result(), Some(&result));
        let at = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert!(back.finished_before(at(1_700_000_101)));
        assert!(!back.finished_before(at(1_700_000_100)));
        assert!(OperationRecord::decode(b"{not json").is_err());
    }
}

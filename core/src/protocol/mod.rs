//! The wire protocol between the processes: every contract that one process
//! writes and another reads, each encoded and decoded here and nowhere else.
//!
//! # Layout
//! - [`envelope`]: a command on `cm.cmd.<kind>.<challenge>`: its id (uuid v7,
//!   or derived from an `Idempotency-Key`), headers (`Nats-Msg-Id`,
//!   `cm-reply`, W3C trace context), the one mint-and-publish
//!   ([`Outgoing`]) and the decoding of a delivered command.
//! - [`reply`]: reply routing: a waiter's prefix, reply subjects, the reply's
//!   payload.
//! - [`operation`]: the typed operation record (pending, settled, read back)
//!   and its retention lease.
//! - [`events`]: result and lifecycle events on `cm.evt.>`, flags stripped.
//! - [`dead_letter`]: dead letters on `cm.dlq.>`: written by the worker,
//!   read and replayed by `cmctl`.
//! - [`streams`]: stream and consumer definitions, redelivery backoff.
//!
//! Must not know: the store's keys and transactions, handlers, HTTP.

pub mod dead_letter;
pub mod envelope;
pub mod events;
pub mod operation;
pub mod reply;
pub mod streams;

pub use dead_letter::{
    HDR_DELIVERIES, HDR_FAILURE_REASON, HDR_ORIGINAL_MSG_ID, HDR_ORIGINAL_SEQUENCE,
    HDR_ORIGINAL_SUBJECT, dead_letter_subject,
};
pub use envelope::{
    CommandKind, HDR_MSG_ID, Outgoing, PublishError, command_subject, extract_trace_context,
    inject_trace_context,
};
pub use events::{HDR_COMMAND_ID, event_subject};
pub use operation::OperationRecord;
pub use reply::HDR_REPLY;
pub use streams::{
    COMMANDS_STREAM, DEAD_LETTERS_STREAM, EVENTS_STREAM, QueueConfig, WORKERS_CONSUMER,
    backoff_delay, ensure_streams, reconcile_workers_consumer, workers_consumer,
    workers_consumer_config,
};

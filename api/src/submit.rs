//! Turning a validated request into a command on JetStream, and waiting for
//! its result.
//!
//! Each command gets a uuid v7 (also its `Nats-Msg-Id`), a pending operation
//! record in etcd (so `GET /api/v1/operation/{id}` knows it at once), the
//! caller's trace context in its headers, and, when the caller waits, a reply
//! subject under this API process's own inbox prefix. One subscription on
//! that prefix serves every waiting request (no per-request SUB round trip).
//! The API answers only once JetStream acknowledged the publish: an accepted
//! command is on disk.
//!
//! A reply is a plain NATS message, lost if it is sent while this process is
//! reconnecting. So a waiter that heard nothing for a while also reads the
//! operation record the worker writes before replying, and answers from it.
//! The pending record written here never replaces a result a worker recorded
//! (create-if-absent): a wait that timed out as the result came in answers
//! that result.
//!
//! # Client retries (`Idempotency-Key`)
//! A request carrying an `Idempotency-Key` header (HTTP or NATS) becomes the
//! command whose id is [`keyed_command_id`] of (caller, command kind, target
//! challenge and source, key): a uuid v8. A retry is therefore the same
//! command: answered from its operation record when that is settled, waited
//! for when it is in flight, and de-duplicated by JetStream (same
//! `Nats-Msg-Id`) when the two publishes race, within the duplicate window.
//! Beyond that window the operation record (kept 24 h) still answers it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream;
use cm_core::{
    DomainError,
    lock::RetentionLease,
    protocol::{OperationRecord, Outgoing, operation::retention_lease, reply},
    store::Store,
};
use cm_schemas::v1::{CommandResult, Requester, command::Request};
use futures::StreamExt;
use tokio::sync::oneshot;
use tracing::Instrument;

/// What became of a submitted command.
#[derive(Debug)]
pub enum Submitted {
    /// The worker's result.
    Done(Box<CommandResult>),
    /// Accepted; the caller did not wait (or stopped waiting): poll the operation.
    Accepted { operation_id: String },
}

/// How long a waiter trusts the reply alone before reading the record too.
const RECORD_POLL: Duration = Duration::from_secs(1);

/// How often a retried command's waiter reads its record (no reply comes to
/// it: the first request's waiter gets that).
const RETRY_POLL: Duration = Duration::from_millis(100);

pub use cm_core::protocol::envelope::{
    MAX_IDEMPOTENCY_KEY, keyed_command_id, validate_idempotency_key,
};

/// Requests waiting for a command's reply, by command id; several when a
/// client retried under one `Idempotency-Key` (each with its own token).
type Waiters = Arc<Mutex<HashMap<String, Vec<(u64, oneshot::Sender<CommandResult>)>>>>;

/// Publishes commands and routes their replies.
#[derive(Debug, Clone)]
pub struct Submitter {
    js: jetstream::Context,
    store: Store,
    retention: Arc<RetentionLease>,
    reply_prefix: String,
    waiters: Waiters,
    publish_timeout: Duration,
}

impl Submitter {
    /// Subscribes this process's reply prefix and starts routing replies.
    pub async fn start(
        nats: async_nats::Client,
        js: jetstream::Context,
        store: Store,
    ) -> Result<Self, async_nats::Error> {
        let reply_prefix = reply::fresh_prefix();
        let mut sub = nats.subscribe(reply::subscription(&reply_prefix)).await?;
        let waiters: Waiters = Arc::default();
        let routes = waiters.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(id) = reply::command_id_of(&msg.subject) else {
                    continue;
                };
                let Ok(result) = reply::decode(msg.payload.clone()) else {
                    tracing::warn!(subject = %msg.subject, "undecodable reply");
                    continue;
                };
                let waiting = routes.lock().ok().and_then(|mut w| w.remove(id));
                for (_, tx) in waiting.unwrap_or_default() {
                    let _ = tx.send(result.clone());
                }
            }
        });
        let retention = Arc::new(retention_lease(store.client()));
        Ok(Self {
            js,
            store,
            retention,
            reply_prefix,
            waiters,
            publish_timeout: Duration::from_secs(10),
        })
    }

    /// Publishes `request` as a command; waits at most `wait` for its result
    /// (`None`: do not wait). With an idempotency key (in `requester`), the
    /// command id is derived from it: a command already in flight under that
    /// key is waited for, not repeated (the caller answers one already
    /// settled before its own checks, see `ops`).
    pub async fn submit(
        &self,
        request: Request,
        requester: Requester,
        wait: Option<Duration>,
    ) -> Result<Submitted, DomainError> {
        let keyed = !requester.idempotency_key.is_empty();
        let mut outgoing = Outgoing::new(request, requester)?;
        if wait.is_some() {
            outgoing = outgoing.reply_to(&self.reply_prefix);
        }
        let (id, kind) = (outgoing.id().to_owned(), outgoing.kind());
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish cm.cmd.{kind}"),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.name = %outgoing.subject(),
            messaging.message.id = %id,
            cm.command.kind = %kind,
            cm.idempotent = keyed,
        );
        async {
            // A caller that does not wait polls the operation at once: record
            // it first. A waiting caller hears the result directly; its
            // operation is recorded only if the wait times out.
            if wait.is_none()
                && let Some(result) = self.record_pending(&outgoing).await?
            {
                return Ok(Submitted::Done(Box::new(result)));
            }
            let receiver = wait.map(|_| self.register(&id));
            let token = receiver.as_ref().map_or(0, |(token, _)| *token);
            let duplicate = match self.publish(&outgoing).await {
                Ok(duplicate) => duplicate,
                Err(e) => {
                    self.forget(&id, token);
                    return Err(e);
                }
            };
            let (Some(limit), Some((_, receiver))) = (wait, receiver) else {
                return Ok(Submitted::Accepted { operation_id: id });
            };
            // A duplicate (the first request's copy is in flight) gets no
            // reply of its own: it reads the record, often.
            let poll = if duplicate { RETRY_POLL } else { RECORD_POLL };
            let answered = async {
                // A reply wakes it; else the record (a dropped sender is no answer).
                let replied = async {
                    match receiver.await {
                        Ok(r) => r,
                        Err(_) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = replied => r,
                    r = self.recorded_result(&id, poll) => r,
                }
            };
            match tokio::time::timeout(limit, answered).await {
                Ok(result) => {
                    self.forget(&id, token);
                    Ok(Submitted::Done(Box::new(result)))
                }
                Err(_) => {
                    self.forget(&id, token);
                    // The result may have been recorded just now: it wins
                    // over a pending record, and is the answer.
                    match self.record_pending(&outgoing).await? {
                        Some(result) => Ok(Submitted::Done(Box::new(result))),
                        None => Ok(Submitted::Accepted { operation_id: id }),
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Writes the command's pending operation record unless one exists;
    /// returns the recorded result when the existing one is settled.
    async fn record_pending(
        &self,
        outgoing: &Outgoing,
    ) -> Result<Option<CommandResult>, DomainError> {
        let pending = OperationRecord::pending(outgoing.command());
        let lease = self.retention.id().await?;
        let existing = self.store.create_operation(&pending, lease).await?;
        Ok(existing.and_then(OperationRecord::into_result))
    }

    /// The recorded result of command `id`, if it is settled.
    pub async fn settled_result(&self, id: &str) -> Result<Option<CommandResult>, DomainError> {
        Ok(self
            .store
            .get_operation(id)
            .await?
            .and_then(OperationRecord::into_result))
    }

    /// Publishes the command; whether JetStream already had it (a retry).
    async fn publish(&self, outgoing: &Outgoing) -> Result<bool, DomainError> {
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "publish failed");
            DomainError::unavailable("the command queue is unavailable, retry later")
        };
        let ack = tokio::time::timeout(self.publish_timeout, outgoing.publish(&self.js))
            .await
            .map_err(|_| unavailable("publish acknowledgement timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        tracing::debug!(stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate, "command accepted");
        Ok(ack.duplicate)
    }

    /// The command's result as the worker recorded it: looked for after
    /// `poll` without a reply, then every `poll`. A read that fails (etcd
    /// away) is simply tried again.
    async fn recorded_result(&self, id: &str, poll: Duration) -> CommandResult {
        loop {
            tokio::time::sleep(poll).await;
            let Ok(Some(record)) = self.store.get_operation(id).await else {
                continue;
            };
            if let Some(result) = record.into_result() {
                tracing::debug!(
                    command = id,
                    "answered from the operation record (reply lost)"
                );
                return result;
            }
        }
    }

    fn register(&self, id: &str) -> (u64, oneshot::Receiver<CommandResult>) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let token = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(id.to_owned()).or_default().push((token, tx));
        }
        (token, rx)
    }

    fn forget(&self, id: &str, token: u64) {
        if let Ok(mut w) = self.waiters.lock()
            && let Some(waiting) = w.get_mut(id)
        {
            waiting.retain(|(t, _)| *t != token);
            if waiting.is_empty() {
                w.remove(id);
            }
        }
    }
}

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
//! operation record the worker writes after replying, and answers from it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use cm_core::{
    DomainError,
    lock::RetentionLease,
    model::now,
    queue::{self, CommandKind},
    store::Store,
};
use cm_schemas::v1::{
    Command, CommandResult, Operation, Requester, command::Request, operation::State,
};
use futures::StreamExt;
use prost::Message as _;
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

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<CommandResult>>>>;

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
        let reply_prefix = format!("_CM_REPLY.{}", uuid::Uuid::new_v4().simple());
        let mut sub = nats.subscribe(format!("{reply_prefix}.*")).await?;
        let waiters: Waiters = Arc::default();
        let routes = waiters.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(id) = msg.subject.rsplit('.').next() else {
                    continue;
                };
                let Ok(result) = CommandResult::decode(msg.payload.clone()) else {
                    tracing::warn!(subject = %msg.subject, "undecodable reply");
                    continue;
                };
                let waiter = routes.lock().ok().and_then(|mut w| w.remove(id));
                if let Some(tx) = waiter {
                    let _ = tx.send(result);
                }
            }
        });
        let retention = Arc::new(RetentionLease::new(store.client(), 24 * 3600, 25 * 3600));
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
    /// (`None`: do not wait).
    pub async fn submit(
        &self,
        request: Request,
        requester: Requester,
        wait: Option<Duration>,
    ) -> Result<Submitted, DomainError> {
        let (kind, challenge_id) = CommandKind::of(&request);
        let subject = queue::command_subject(kind, challenge_id);
        let id = uuid::Uuid::now_v7().to_string();
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish cm.cmd.{kind}"),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.name = %subject,
            messaging.message.id = %id,
            cm.command.kind = %kind,
        );
        let command = Command {
            command_id: id.clone(),
            issued_at: Some(now()),
            requested_by: Some(requester),
            request: Some(request),
        };
        async {
            // A caller that does not wait polls the operation at once: record
            // it first. A waiting caller hears the result directly; its
            // operation is recorded only if the wait times out.
            if wait.is_none() {
                self.record_pending(&command, kind).await?;
            }
            let receiver = wait.map(|_| self.register(&id));
            if let Err(e) = self.publish(&subject, &command, wait.is_some()).await {
                self.forget(&id);
                return Err(e);
            }
            let (Some(limit), Some(receiver)) = (wait, receiver) else {
                return Ok(Submitted::Accepted { operation_id: id });
            };
            let answered = async {
                tokio::select! {
                    r = receiver => r.ok(),
                    r = self.recorded_result(&id) => Some(r),
                }
            };
            match tokio::time::timeout(limit, answered).await {
                Ok(Some(result)) => {
                    self.forget(&id);
                    Ok(Submitted::Done(Box::new(result)))
                }
                _ => {
                    self.forget(&id);
                    self.record_pending(&command, kind).await?;
                    Ok(Submitted::Accepted { operation_id: id })
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn record_pending(
        &self,
        command: &Command,
        kind: CommandKind,
    ) -> Result<(), DomainError> {
        let op = Operation {
            id: command.command_id.clone(),
            kind: kind.as_str().to_owned(),
            state: State::Pending as i32,
            created_at: command.issued_at,
            result: None,
        };
        let bytes = serde_json::to_vec(&op).map_err(|_| DomainError::internal("internal error"))?;
        let lease = self.retention.id().await?;
        self.store
            .put_operation(&command.command_id, bytes, lease)
            .await?;
        Ok(())
    }

    async fn publish(
        &self,
        subject: &str,
        command: &Command,
        reply: bool,
    ) -> Result<(), DomainError> {
        let mut headers = HeaderMap::new();
        headers.insert(queue::HDR_MSG_ID, command.command_id.as_str());
        if reply {
            headers.insert(
                queue::HDR_REPLY,
                format!("{}.{}", self.reply_prefix, command.command_id),
            );
        }
        queue::inject_trace_context(&mut headers);
        let payload = Bytes::from(command.encode_to_vec());
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "publish failed");
            DomainError::unavailable("the command queue is unavailable, retry later")
        };
        let ack = tokio::time::timeout(self.publish_timeout, async {
            self.js
                .publish_with_headers(subject.to_owned(), headers, payload)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| unavailable("publish acknowledgement timed out".into()))?
        .map_err(unavailable)?;
        tracing::debug!(stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate, "command accepted");
        Ok(())
    }

    /// The command's result as the worker recorded it: looked for after
    /// [`RECORD_POLL`] without a reply, then every [`RECORD_POLL`]. A read
    /// that fails (etcd away) is simply tried again.
    async fn recorded_result(&self, id: &str) -> CommandResult {
        loop {
            tokio::time::sleep(RECORD_POLL).await;
            let Ok(Some(bytes)) = self.store.get_operation(id).await else {
                continue;
            };
            if let Ok(op) = serde_json::from_slice::<Operation>(&bytes)
                && op.state != State::Pending as i32
                && let Some(result) = op.result
            {
                tracing::debug!(
                    command = id,
                    "answered from the operation record (reply lost)"
                );
                return result;
            }
        }
    }

    fn register(&self, id: &str) -> oneshot::Receiver<CommandResult> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id.to_owned(), tx);
        }
        rx
    }

    fn forget(&self, id: &str) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(id);
        }
    }
}

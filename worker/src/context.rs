//! What every command handler works with: the store, the queue, the Pulumi
//! driver, the lease that binds this worker's locks, and the scenario sources;
//! and [`Locked`], a handler's view once it holds locks, whose store is
//! fenced by them (every write fails once a lock is lost).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream;
use cm_core::{
    DomainError, Identity,
    lock::{self, LockGuard, LockMode, LockSet, Session},
    model::ChallengeRecord,
    queue::{self, CommandKind, QueueConfig},
    store::{Fence, Store},
};
use cm_schemas::v1::{Command, RefillPool, Requester, command::Request};

use crate::{
    handlers::HandlerError,
    pulumi::{Driver, PreparedScenario},
    sources::{Source, SourceError, Sources},
};

/// Shared state of a running worker.
#[derive(Debug)]
pub struct Ctx {
    pub store: Store,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub driver: Arc<Driver>,
    pub session: Session,
    pub queue: QueueConfig,
    /// Resolves scenario references (directories, OCI, uploads).
    pub sources: Sources,
    /// Prepared scenarios of immutable (digest-named) sources, by their key.
    pub prepared: Mutex<HashMap<String, PreparedScenario>>,
    /// Longest wait for a lock before the command is retried later.
    pub lock_timeout: Duration,
    /// Cap on concurrent instances per source.
    pub quota: Quota,
}

/// A handler's view while it holds locks: everything of [`Ctx`], with the
/// store fenced by those locks (see [`cm_core::store::Fence`]). Helpers that
/// write take a `&Locked`, so a write made without locks, or after they were
/// lost, does not compile or does not commit.
#[derive(Debug)]
pub struct Locked<'a> {
    pub ctx: &'a Ctx,
    /// The store, every write of which requires the locks to be held.
    pub store: Store,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Ctx;
    fn deref(&self) -> &Ctx {
        self.ctx
    }
}

/// How many instances a source (player or team) may hold at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quota {
    /// Global default cap (0: no cap); a challenge's `maxPerSource` overrides it.
    pub max_per_source: i64,
    /// At the cap, destroy the source's oldest instance instead of refusing.
    pub evict_oldest: bool,
}

impl Ctx {
    /// Passes a lock result through, telling the session when etcd refused
    /// its lease, so it is replaced now rather than at the next keep-alive.
    fn noted<T>(&self, r: Result<T, lock::LockError>) -> Result<T, lock::LockError> {
        if let Err(lock::LockError::LeaseGone(lease)) = &r {
            self.session.report_lost(*lease);
        }
        r
    }

    /// This context with its store fenced by `fence` (the locks held).
    pub fn locked(&self, fence: &Fence) -> Locked<'_> {
        Locked {
            ctx: self,
            store: self.store.fenced(fence),
        }
    }

    /// Takes an identity's lock (see [`lock::identity_lock`]), waiting at
    /// most `timeout`. The caller already holds the challenge's read lock.
    pub async fn lock_identity_within(
        &self,
        cid: &str,
        identity: &Identity,
        timeout: Duration,
    ) -> Result<LockGuard, lock::LockError> {
        let prefix = lock::identity_lock(self.store.root(), cid, identity);
        self.noted(
            lock::acquire(
                &self.store.client(),
                self.session.lease(),
                &prefix,
                LockMode::Write,
                timeout,
            )
            .await,
        )
    }

    /// Takes an identity's lock, waiting at most the lock timeout.
    pub async fn lock_identity(
        &self,
        cid: &str,
        identity: &Identity,
    ) -> Result<LockGuard, HandlerError> {
        Ok(self
            .lock_identity_within(cid, identity, self.lock_timeout)
            .await?)
    }

    /// For work addressed to an identity (an update): the challenge's lock
    /// for reading and the identity's lock, together.
    pub async fn lock_challenge_identity(
        &self,
        cid: &str,
        identity: &Identity,
    ) -> Result<LockSet, HandlerError> {
        let challenge = lock::challenge_lock(self.store.root(), cid);
        let id = lock::identity_lock(self.store.root(), cid, identity);
        Ok(self.noted(
            lock::acquire_all(
                &self.store.client(),
                self.session.lease(),
                &[(&challenge, LockMode::Read), (&id, LockMode::Write)],
                self.lock_timeout,
            )
            .await,
        )?)
    }

    /// Takes the challenge's reader/writer lock.
    pub async fn lock_challenge(
        &self,
        cid: &str,
        mode: LockMode,
    ) -> Result<LockGuard, HandlerError> {
        let prefix = lock::challenge_lock(self.store.root(), cid);
        Ok(self.noted(
            lock::acquire(
                &self.store.client(),
                self.session.lease(),
                &prefix,
                mode,
                self.lock_timeout,
            )
            .await,
        )?)
    }

    /// For a create: the source's lock (its instance count), the challenge's
    /// lock for reading and the slot's lock, together.
    pub async fn lock_for_create(&self, cid: &str, sid: &str) -> Result<LockSet, HandlerError> {
        let source = lock::source_lock(self.store.root(), sid);
        let challenge = lock::challenge_lock(self.store.root(), cid);
        let slot = lock::instance_lock(self.store.root(), cid, sid);
        Ok(self.noted(
            lock::acquire_all(
                &self.store.client(),
                self.session.lease(),
                &[
                    (&source, LockMode::Write),
                    (&challenge, LockMode::Read),
                    (&slot, LockMode::Write),
                ],
                self.lock_timeout,
            )
            .await,
        )?)
    }

    /// Takes the challenge's lock for reading and the (challenge, source)
    /// instance slot's lock for writing, together (one round trip when free).
    pub async fn lock_instance(&self, cid: &str, sid: &str) -> Result<LockSet, HandlerError> {
        Ok(self
            .lock_instance_within(cid, sid, self.lock_timeout)
            .await?)
    }

    /// The same, waiting at most `timeout`.
    pub async fn lock_instance_within(
        &self,
        cid: &str,
        sid: &str,
        timeout: Duration,
    ) -> Result<LockSet, lock::LockError> {
        let challenge = lock::challenge_lock(self.store.root(), cid);
        let slot = lock::instance_lock(self.store.root(), cid, sid);
        self.noted(
            lock::acquire_all(
                &self.store.client(),
                self.session.lease(),
                &[(&challenge, LockMode::Read), (&slot, LockMode::Write)],
                timeout,
            )
            .await,
        )
    }

    /// Takes the challenge's lock for reading and its pool's lock for writing.
    pub async fn lock_pool(&self, cid: &str) -> Result<LockSet, HandlerError> {
        Ok(self.lock_pool_within(cid, self.lock_timeout).await?)
    }

    /// The same, waiting at most `timeout`.
    pub async fn lock_pool_within(
        &self,
        cid: &str,
        timeout: Duration,
    ) -> Result<LockSet, lock::LockError> {
        let challenge = lock::challenge_lock(self.store.root(), cid);
        let pool = lock::pool_lock(self.store.root(), cid);
        self.noted(
            lock::acquire_all(
                &self.store.client(),
                self.session.lease(),
                &[(&challenge, LockMode::Read), (&pool, LockMode::Write)],
                timeout,
            )
            .await,
        )
    }

    /// Publishes a follow-up command (e.g. `pool.refill`) on JetStream.
    pub async fn publish(&self, request: Request) -> Result<(), HandlerError> {
        self.publish_with_reply(request, None).await
    }

    /// Publishes a follow-up command whose result is sent to
    /// `<reply_prefix>.<command id>` when a prefix is given.
    pub async fn publish_with_reply(
        &self,
        request: Request,
        reply_prefix: Option<&str>,
    ) -> Result<(), HandlerError> {
        let kind = CommandKind::of(&request).0;
        publish_command(&self.js, request, reply_prefix)
            .await
            .map_err(|e| HandlerError::Retry(format!("publish {kind}: {e}")))
    }

    /// Asks for the challenge's pool to be brought back to `min`. Published
    /// in the background: the command that asked (a claim) answers at once.
    pub async fn request_refill(&self, cid: &str) {
        let request = Request::PoolRefill(RefillPool {
            challenge_id: cid.to_owned(),
        });
        let js = self.js.clone();
        let cid = cid.to_owned();
        tokio::spawn(async move {
            if let Err(e) = publish_command(&js, request, None).await {
                tracing::warn!(error = %e, challenge = %cid, "pool refill not requested");
            }
        });
    }

    /// The challenge `cid`, or the command's final answer: not found.
    pub async fn challenge(&self, cid: &str) -> Result<ChallengeRecord, HandlerError> {
        match self.store.get_challenge(cid).await? {
            Some(c) => Ok(c.value),
            None => Err(DomainError::challenge_not_found(cid).into()),
        }
    }

    /// Resolves a scenario reference and prepares (validates, compiles) it.
    /// Content named by a digest is prepared once per process.
    pub async fn scenario(&self, reference: &str) -> Result<PreparedScenario, HandlerError> {
        let source = self.sources.resolve(reference).await?;
        let Source::Cached { key, dir } = source else {
            return Ok(self.driver.prepare(source.dir()).await?);
        };
        let memo = self.prepared.lock().ok().and_then(|m| m.get(&key).cloned());
        if let Some(prepared) = memo.filter(|p| p.binary.is_file()) {
            return Ok(prepared);
        }
        let prepared = self.driver.prepare(&dir).await?;
        if let Ok(mut map) = self.prepared.lock() {
            map.insert(key, prepared.clone());
        }
        Ok(prepared)
    }
}

impl From<SourceError> for HandlerError {
    fn from(e: SourceError) -> Self {
        if e.is_retryable() {
            return Self::Retry(e.to_string());
        }
        match e {
            SourceError::Directory(d) => Self::Domain(d),
            other => Self::Domain(DomainError::invalid(other.to_string())),
        }
    }
}

/// Publishes a command issued by the worker itself and waits for
/// JetStream's acknowledgement.
async fn publish_command(
    js: &jetstream::Context,
    request: Request,
    reply_prefix: Option<&str>,
) -> Result<(), String> {
    let subject = {
        let (kind, cid) = CommandKind::of(&request);
        queue::command_subject(kind, cid)
    };
    let command = Command {
        command_id: uuid::Uuid::now_v7().to_string(),
        issued_at: Some(cm_core::model::now()),
        requested_by: Some(Requester {
            principal: String::new(),
            via: "worker".into(),
            ..Default::default()
        }),
        request: Some(request),
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(queue::HDR_MSG_ID, command.command_id.as_str());
    if let Some(prefix) = reply_prefix {
        headers.insert(queue::HDR_REPLY, format!("{prefix}.{}", command.command_id));
    }
    queue::inject_trace_context(&mut headers);
    let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&command));
    js.publish_with_headers(subject, headers, payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

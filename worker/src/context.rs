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
    protocol::{Outgoing, QueueConfig},
    store::{Fence, Store},
};
use cm_schemas::v1::{RefillPool, command::Request};

use crate::{
    error::{HandlerError, Transient},
    pulumi::{Driver, PreparedScenario},
    sources::{Source, Sources},
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
    /// Pulumi stack states (the etcd store holds pointers to them).
    pub stacks: cm_core::stack_store::StackStore,
    /// Shortest time between two stored checkpoints of a running operation.
    pub checkpoint_interval: Duration,
    /// The lease operation records hang on (kept a day).
    pub retention: Arc<lock::RetentionLease>,
    /// How pools are refilled and adaptive pools sized.
    pub pools: PoolSettings,
}

/// How pools are refilled, and how adaptive pools follow demand.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// The demand estimator's settings.
    pub tuning: cm_core::pool_demand::Tuning,
    /// Pool deploys the whole cluster runs at once (every worker should be
    /// given the same number): refills never take more of the cluster's
    /// Pulumi runs than this from players' own creates.
    pub refill_slots: usize,
    /// Most deploys one refill of an adaptive pool runs at once (a static
    /// pool deploys one at a time, as before).
    pub refill_batch: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            tuning: Default::default(),
            refill_slots: 4,
            refill_batch: 4,
        }
    }
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

impl Locked<'_> {
    /// This view with one more lock (taken inside the step): writes are
    /// fenced by it as well.
    pub fn also(&self, guard: &LockGuard) -> Locked<'_> {
        self.ctx
            .locked(&self.store.fence().clone().and(&guard.fence()))
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
        let mut outgoing = Outgoing::internal(request, ISSUER);
        if let Some(prefix) = reply_prefix {
            outgoing = outgoing.reply_to(prefix);
        }
        let kind = outgoing.kind();
        outgoing
            .publish(&self.js)
            .await
            .map(drop)
            .map_err(|source| Transient::Publish { kind, source }.into())
    }

    /// Asks for the challenge's pool to be brought back to its size.
    /// Published in the background: the command that asked answers at once.
    pub async fn request_refill(&self, cid: &str) {
        let js = self.js.clone();
        let cid = cid.to_owned();
        tokio::spawn(async move { publish_refill(&js, &cid).await });
    }

    /// A create arrived on `challenge`, served from its pool or deployed
    /// on demand (`from_pool`): counted; for an adaptive pool, one more claim
    /// in its demand estimate. Then the pool's refill is asked for (a static
    /// pool only misses the instance a claim took; an adaptive one may want
    /// more), unless a static pool is at its `max` or a refill is at work
    /// (`Store::refill_at_work`: that one covers this claim). In the
    /// background: the create goes on at once.
    pub fn note_claim(&self, challenge: &ChallengeRecord, from_pool: bool) {
        let served = if from_pool { "pool" } else { "deploy" };
        cm_core::metrics::metrics().pool_claim(&challenge.id, served);
        let adaptive = challenge.pool == cm_core::pool_demand::PoolMode::Adaptive;
        if !adaptive && !from_pool {
            return;
        }
        let store = self.store.clone();
        let js = self.js.clone();
        let tuning = self.pools.tuning;
        let cid = challenge.id.clone();
        let max = challenge.max;
        tokio::spawn(async move {
            if adaptive {
                let now = cm_core::pool_demand::unix_now();
                if let Err(e) = store.update_demand(&cid, |d| d.claimed(now, &tuning)).await {
                    tracing::debug!(error = %e, challenge = %cid, "demand estimate not moved");
                }
            } else if at_max(&store, &cid, max).await {
                return;
            }
            // A claim from the pool changed the pool's counts, which the
            // refill at work counts again; a create deployed on demand did
            // not (its reservation may come later), so it still asks.
            if from_pool && store.refill_at_work(&cid).await.unwrap_or(false) {
                return;
            }
            publish_refill(&js, &cid).await;
        });
    }

    /// A deploy of an adaptive pool's scenario took `took` (its estimate
    /// follows the deploy time).
    pub async fn note_deploy(&self, cid: &str, took: Duration) {
        let moved = self
            .store
            .update_demand(cid, |d| d.deployed(took.as_secs_f64()))
            .await;
        if let Err(e) = moved {
            tracing::debug!(error = %e, challenge = %cid, "deploy time not recorded");
        }
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

/// How the worker names itself as the issuer of its own commands.
pub const ISSUER: &str = "worker";

/// Whether a static pool capped at `max` can take no new instance after a
/// claim, so a refill would find nothing to do: every pooled instance ready
/// (no reservation a refill would resume) and pooled + claimed at `max`. A
/// claim moves an instance from pooled to claimed, leaving the total as it
/// was; at the cap, each claim's refill would only take and release the
/// pool's locks. Any doubt (`max` 0, a read failing) asks for the refill.
async fn at_max(store: &Store, cid: &str, max: i64) -> bool {
    if max <= 0 {
        return false;
    }
    let Ok((pooled, claimed)) = tokio::try_join!(store.list_pooled(cid), store.count_claimed(cid))
    else {
        return false;
    };
    let all_ready = pooled
        .iter()
        .all(|p| p.value.status == cm_core::model::InstanceStatus::Ready);
    all_ready && pooled.len() as i64 + claimed >= max
}

/// Publishes a `pool.refill` of `cid`; a failure is logged (the next claim,
/// or the janitor's review of adaptive pools, asks again).
async fn publish_refill(js: &jetstream::Context, cid: &str) {
    let request = Request::PoolRefill(RefillPool {
        challenge_id: cid.to_owned(),
    });
    if let Err(e) = Outgoing::internal(request, ISSUER).publish(js).await {
        tracing::warn!(error = %e, challenge = %cid, "pool refill not requested");
    }
}

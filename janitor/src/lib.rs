//! The janitor: on a timer, reads the expiry index and publishes one
//! `instance.expire` command per expired instance.
//!
//! It is a background task in omicron's sense: no input, idempotent, each
//! tick returns a status, and a failed tick is simply retried by the next one
//! (no retry loops inside a tick). Several janitors may run at once: each
//! command's `Nats-Msg-Id` is derived from (challenge, source, until), so
//! JetStream keeps one of the copies, and the worker deletes an instance only
//! if its `until` is still the one the janitor saw (a renewal wins).
//!
//! Stale index entries (whose instance was deleted, renewed or replaced
//! without the entry moving) are checked against the records and deleted as
//! the index is read, a page at a time: however many there are, they neither
//! hide the live entries behind them nor come back every tick.
//!
//! On a second timer it looks for orphaned stacks: a stack state no
//! instance record names and no lock holds (a reset or blue/green update
//! died around its switch, or failed to destroy the stack it replaced). It
//! publishes one `stack.reclaim` per orphan; the worker checks again under
//! the identity's lock and destroys it. Nothing is deployed that no record
//! or command answers for.
//!
//! On another timer it asks for a refill of every adaptive pool
//! (`pool.refill`): a pool that follows demand must also shrink when claims
//! stop, and no claim arrives then to ask for it.
//!
//! On a third, slower timer it sweeps the Pulumi state bucket: objects no
//! stack pointer names and older than [`STATE_SWEEP_GRACE`] (left by a
//! worker that died between storing a state and writing its pointer) are
//! removed.
//!
//! # Layout
//! - [`cli`]: the flags and the configuration they make.
//! - [`run`]: connects (with backoff), then ticks until shutdown or once.
//! - [`Janitor::tick`]: one pass over the expiry index.
//! - [`Janitor::sweep_orphans`]: one pass over the stack states' pointers.
//! - [`Janitor::sweep_states`]: one pass over the state bucket.
//! - [`Janitor::review_pools`]: one refill request per adaptive pool.

pub mod cli;

use std::{future::Future, time::Duration};

use async_nats::jetstream;
use cm_core::{
    model::now,
    protocol::{self, Outgoing, PublishError, envelope},
    store::{Expired, Store},
};
use cm_schemas::v1::{ExpireInstance, ReclaimStack, RefillPool, command::Request};

/// How the janitor names itself as the issuer of its commands.
pub const ISSUER: &str = "janitor";

/// Everything the janitor needs.
#[derive(Debug, Clone)]
pub struct JanitorConfig {
    /// Where NATS and etcd are, and the queue's settings.
    pub connection: cm_core::config::Connection,
    /// Time between ticks.
    pub interval: Duration,
    /// Run one tick and return (for cron).
    pub once: bool,
    /// Most expiry commands published per tick (the rest wait for the next).
    pub batch: i64,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Time between two sweeps of the state bucket (`None`: never).
    pub state_sweep: Option<Duration>,
    /// Time between two looks for orphaned stacks (`None`: never).
    pub orphan_sweep: Option<Duration>,
    /// Time between two refill requests of each adaptive pool (`None`: never).
    pub pool_review: Option<Duration>,
}

/// Age under which an unreferenced state object is kept: its writer may
/// still be between storing it and writing its pointer. Far above any such
/// gap, which a lock lease (seconds) bounds: a writer stalled longer has
/// lost its lock, and its pointer write is refused.
pub const STATE_SWEEP_GRACE: Duration = Duration::from_secs(3600);

/// Why a sweep of the state bucket failed (the next one tries again).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("reading the stack pointers: {0}")]
    Store(#[from] cm_core::store::StoreError),
    #[error(transparent)]
    Objects(#[from] cm_core::stack_store::StackStoreError),
}

/// Why the janitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum JanitorError {
    #[error(transparent)]
    Connect(#[from] cm_core::nats::NatsError),
    /// The streams could not be set up.
    #[error("JetStream: {0}")]
    Streams(#[source] async_nats::Error),
    #[error(transparent)]
    Store(#[from] cm_core::store::StoreError),
    #[error("the tick failed: {0}")]
    Tick(#[from] TickError),
}

/// Why a tick failed (the next tick tries again).
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("reading the expiry index: {0}")]
    Store(#[from] cm_core::store::StoreError),
    #[error("publishing expiry commands: {0}")]
    Publish(#[from] PublishError),
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Expired instances found.
    pub expired: usize,
    /// Expiry commands JetStream stored (not counting duplicates of another janitor's).
    pub published: usize,
    /// Duplicates JetStream dropped (already published by a janitor).
    pub duplicates: usize,
    /// Stale index entries found and deleted (no command published).
    pub stale: usize,
}

/// The janitor's connections.
#[derive(Debug, Clone)]
pub struct Janitor {
    store: Store,
    js: jetstream::Context,
    batch: i64,
}

impl Janitor {
    /// A janitor over an existing store and JetStream context.
    pub fn new(store: Store, js: jetstream::Context, batch: i64) -> Self {
        Self { store, js, batch }
    }

    /// One pass: publish an expiry command for every expired instance.
    #[tracing::instrument(name = "janitor tick", skip(self), fields(expired, published))]
    pub async fn tick(&self) -> Result<TickReport, TickError> {
        let outcome = async {
            let scan = self.store.expired_live(&now(), self.batch).await?;
            let mut report = self.publish(scan.live).await?;
            report.stale = scan.stale_removed;
            Ok::<_, TickError>(report)
        }
        .await;
        let expired = outcome.as_ref().map_or(0, |r| r.expired as u64);
        cm_core::metrics::metrics().janitor_tick(outcome.is_ok(), expired);
        let report = outcome?;
        let span = tracing::Span::current();
        span.record("expired", report.expired);
        span.record("published", report.published);
        Ok(report)
    }

    /// Removes the state objects of this store's root that no pointer names
    /// and that are older than `grace`; returns how many.
    pub async fn sweep_states(&self, grace: Duration) -> Result<usize, SweepError> {
        let states = cm_core::stack_store::StackStore::open(&self.js, self.store.root()).await?;
        let referenced = self.store.stack_objects().await?.into_iter().collect();
        Ok(states.sweep(&referenced, grace).await?)
    }

    /// Publishes a `stack.reclaim` for every orphaned stack (see
    /// [`Store::orphan_stacks`]); returns how many were published (not
    /// counting duplicates of a recent sweep's).
    pub async fn sweep_orphans(&self) -> Result<usize, TickError> {
        let mut pending = Vec::new();
        for (cid, identity) in self.store.orphan_stacks().await? {
            tracing::warn!(challenge = %cid, %identity, "orphaned stack: asking a worker to reclaim it");
            let msg_id = envelope::reclaim_msg_id(&cid, &identity);
            let reclaim = Request::StackReclaim(ReclaimStack {
                challenge_id: cid,
                identity: identity.to_string(),
            });
            pending.push(
                Outgoing::internal(reclaim, ISSUER)
                    .deduplicated_as(msg_id)
                    .send(&self.js)
                    .await?,
            );
        }
        let mut published = 0;
        for ack in pending {
            if !ack.await.map_err(PublishError::Ack)?.duplicate {
                published += 1;
            }
        }
        Ok(published)
    }

    /// Asks for a refill of every adaptive pool (which grows it to, or
    /// shrinks it back towards, what its demand asks for); returns how many
    /// were asked for.
    pub async fn review_pools(&self) -> Result<usize, TickError> {
        let mut pending = Vec::new();
        for c in self.store.list_challenges().await? {
            if c.pool != cm_core::pool_demand::PoolMode::Adaptive {
                continue;
            }
            let refill = Request::PoolRefill(RefillPool { challenge_id: c.id });
            pending.push(Outgoing::internal(refill, ISSUER).send(&self.js).await?);
        }
        let asked = pending.len();
        for ack in pending {
            ack.await.map_err(PublishError::Ack)?;
        }
        Ok(asked)
    }

    /// What has expired at `at` (the first half of a tick): live entries
    /// only, stale ones deleted on the way.
    pub async fn collect(
        &self,
        at: &cm_schemas::wkt::Timestamp,
    ) -> Result<Vec<Expired>, TickError> {
        Ok(self.store.expired_live(at, self.batch).await?.live)
    }

    /// Publishes the expiry commands of `expired` (the second half of a tick).
    pub async fn publish(&self, expired: Vec<Expired>) -> Result<TickReport, TickError> {
        let mut report = TickReport {
            expired: expired.len(),
            ..Default::default()
        };
        let mut pending = Vec::with_capacity(expired.len());
        for entry in expired {
            let until = entry.until;
            let msg_id = envelope::expiry_msg_id(&entry.challenge_id, &entry.source_id, &until);
            let expire = Request::InstanceExpire(ExpireInstance {
                challenge_id: entry.challenge_id,
                source_id: entry.source_id,
                identity: entry.identity.to_string(),
                until: Some(until),
            });
            let ack = Outgoing::internal(expire, ISSUER)
                .deduplicated_as(msg_id)
                .send(&self.js)
                .await?;
            pending.push(ack);
        }
        for ack in pending {
            let ack = ack.await.map_err(PublishError::Ack)?;
            if ack.duplicate {
                report.duplicates += 1;
            } else {
                report.published += 1;
            }
        }
        Ok(report)
    }
}

/// Connects (retrying with exponential backoff while NATS or etcd are
/// away), then ticks every `interval` until `shutdown`, or once.
pub async fn run(
    config: JanitorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), JanitorError> {
    tokio::pin!(shutdown);
    if let Some(addr) = config.metrics_listen {
        tokio::spawn(async move {
            if let Err(e) = cm_core::metrics::serve(addr).await {
                tracing::error!(error = %e, %addr, "metrics endpoint failed");
            }
        });
    }
    let connect = connect(&config);
    let janitor = tokio::select! {
        j = connect => j?,
        _ = &mut shutdown => return Ok(()),
    };
    if config.once {
        let report = janitor.tick().await?;
        tracing::info!(?report, "janitor tick");
        return Ok(());
    }
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = tokio::time::interval(config.state_sweep.unwrap_or(Duration::MAX / 4));
    sweeper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut orphans = tokio::time::interval(config.orphan_sweep.unwrap_or(Duration::MAX / 4));
    orphans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pools = tokio::time::interval(config.pool_review.unwrap_or(Duration::MAX / 4));
    pools.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = ticker.tick() => {}
            _ = orphans.tick(), if config.orphan_sweep.is_some() => {
                match janitor.sweep_orphans().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(published = n, "orphaned stacks handed to the workers"),
                    Err(e) => tracing::warn!(error = %e, "orphan sweep failed; the next one retries"),
                }
                continue;
            }
            _ = pools.tick(), if config.pool_review.is_some() => {
                match janitor.review_pools().await {
                    Ok(n) => tracing::debug!(asked = n, "adaptive pools reviewed"),
                    Err(e) => tracing::warn!(error = %e, "pool review failed; the next one retries"),
                }
                continue;
            }
            _ = sweeper.tick(), if config.state_sweep.is_some() => {
                match janitor.sweep_states(STATE_SWEEP_GRACE).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "unreferenced stack states removed"),
                    Err(e) => tracing::warn!(error = %e, "state sweep failed; the next one retries"),
                }
                continue;
            }
        }
        match janitor.tick().await {
            Ok(report) if report.expired > 0 => tracing::info!(?report, "janitor tick"),
            Ok(report) => tracing::debug!(?report, "janitor tick"),
            Err(e) => tracing::warn!(error = %e, "janitor tick failed; the next tick retries"),
        }
    }
}

async fn connect(config: &JanitorConfig) -> Result<Janitor, JanitorError> {
    let policy = || backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(200),
        max_interval: Duration::from_secs(10),
        max_elapsed_time: None,
        ..Default::default()
    };
    // Refused credentials or TLS end the janitor at once (retrying cannot
    // help); an unreachable server is waited for.
    let nats = backoff::future::retry(policy(), || async {
        config.connection.nats("cm-janitor").await.map_err(|e| {
            if e.is_permanent() {
                return backoff::Error::permanent(JanitorError::Connect(e));
            }
            tracing::warn!(error = %e, "NATS unreachable; retrying");
            backoff::Error::transient(JanitorError::Connect(e))
        })
    })
    .await?;
    let js = jetstream::new(nats);
    backoff::future::retry(policy(), || async {
        protocol::ensure_streams(&js, &config.connection.queue)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "JetStream unavailable; retrying");
                backoff::Error::transient(JanitorError::Streams(e))
            })
    })
    .await?;
    let store = backoff::future::retry(policy(), || async {
        config.connection.store().await.map_err(|e| {
            if e.is_permanent() {
                return backoff::Error::permanent(JanitorError::Store(e));
            }
            tracing::warn!(error = %e, "etcd unreachable; retrying");
            backoff::Error::transient(JanitorError::Store(e))
        })
    })
    .await?;
    Ok(Janitor::new(store, js, config.batch))
}

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
//! # Layout
//! - [`run`]: connects (with backoff), then ticks until shutdown or once.
//! - [`tick`]: one pass over the expiry index.

use std::{future::Future, time::Duration};

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use cm_core::{
    ids,
    model::now,
    queue::{self, CommandKind, QueueConfig},
    store::{Expired, Store, StoreOptions},
};
use cm_schemas::v1::{Command, ExpireInstance, Requester, command::Request};
use prost::Message as _;

/// Everything the janitor needs.
#[derive(Debug, Clone)]
pub struct JanitorConfig {
    pub nats_url: String,
    /// NATS authentication and TLS.
    pub nats: cm_core::nats::NatsOptions,
    pub etcd_endpoints: Vec<String>,
    pub etcd_root: String,
    pub store: StoreOptions,
    pub queue: QueueConfig,
    /// Time between ticks.
    pub interval: Duration,
    /// Run one tick and return (for cron).
    pub once: bool,
    /// Most expiry commands published per tick (the rest wait for the next).
    pub batch: i64,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Why the janitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum JanitorError {
    #[error(transparent)]
    Connect(#[from] cm_core::nats::NatsError),
    #[error("NATS: {0}")]
    Nats(String),
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
    Publish(String),
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
            let msg_id = format!(
                "expire:{}:{}:{}.{:09}",
                ids::encode(&entry.challenge_id),
                ids::encode(&entry.source_id),
                until.seconds,
                until.nanos
            );
            let subject = queue::command_subject(CommandKind::InstanceExpire, &entry.challenge_id);
            let command = Command {
                command_id: uuid::Uuid::now_v7().to_string(),
                issued_at: Some(now()),
                requested_by: Some(Requester {
                    principal: String::new(),
                    via: "janitor".into(),
                    ..Default::default()
                }),
                request: Some(Request::InstanceExpire(ExpireInstance {
                    challenge_id: entry.challenge_id,
                    source_id: entry.source_id,
                    identity: entry.identity.to_string(),
                    until: Some(until),
                })),
            };
            let mut headers = HeaderMap::new();
            headers.insert(queue::HDR_MSG_ID, msg_id);
            queue::inject_trace_context(&mut headers);
            let ack = self
                .js
                .publish_with_headers(subject, headers, Bytes::from(command.encode_to_vec()))
                .await
                .map_err(|e| TickError::Publish(e.to_string()))?;
            pending.push(ack);
        }
        for ack in pending {
            let ack = ack.await.map_err(|e| TickError::Publish(e.to_string()))?;
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
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = ticker.tick() => {}
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
        cm_core::nats::connect(&config.nats_url, "cm-janitor", &config.nats)
            .await
            .map_err(|e| {
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
        queue::ensure_streams(&js, &config.queue)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "JetStream unavailable; retrying");
                backoff::Error::transient(JanitorError::Nats(e.to_string()))
            })
    })
    .await?;
    let store = backoff::future::retry(policy(), || async {
        Store::connect(&config.etcd_endpoints, &config.etcd_root, &config.store)
            .await
            .map_err(|e| {
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

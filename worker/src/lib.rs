//! The worker: consumes commands from JetStream, takes etcd locks, runs
//! Pulumi and writes records and results back.
//!
//! # Layout
//! - [`run`]: connects, ensures the streams, consumes until shutdown.
//! - [`cli`]: the flags and what each mode runs (`main` only calls it).
//! - [`consumer`]: the pull loop and how each command is settled (ack, nak
//!   with backoff, dead letter, in-progress acks).
//! - [`handlers`]: one file per command (`instance_create.rs`, ...).
//! - [`context`]: what handlers share (store, queue, driver, locks).
//! - [`error`]: how a handler fails (final answer or transient cause).
//! - [`permit`]: the running command's concurrency permit, which a handler
//!   waiting on other commands gives back.
//! - [`scenario`]: the `scenario` subcommand (one stack run directly).
//! - [`observer`]: queue-lag and inventory gauges for `/metrics`.
//! - [`pulumi`]: the Pulumi driver, the only place that runs the CLI.
//! - [`failpoint`]: places the crash and race tests make the worker die or
//!   pause on purpose (one pause mechanism).
//! - [`passphrase`]: where the Pulumi passphrase comes from (required
//!   outside `--dev`).
//! - `run_marker`: one Pulumi run per stack across a lock handover (a
//!   revoked lease's run stops before the next holder's starts).
//! - `stacks`: where stack states are kept between runs.
//! - [`sources`]: scenario references to local directories (scenario root,
//!   OCI registries, uploads in the object store), cached per digest.

pub mod cli;
pub mod consumer;
pub mod context;
pub mod error;
pub mod failpoint;
pub mod handlers;
pub mod observer;
pub mod passphrase;
pub mod permit;
pub mod pulumi;
mod run_marker;
pub mod scenario;
pub mod sources;
mod stacks;

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use cm_core::{
    lock::Session,
    protocol::{self, operation::retention_lease},
};
use tokio_util::sync::CancellationToken;

use crate::{context::Ctx, pulumi::Driver};

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where NATS and etcd are, and the queue's settings.
    pub connection: cm_core::config::Connection,
    /// Commands processed at once by this worker.
    pub concurrency: usize,
    /// Pulumi runs at once in this worker (0: as many as `concurrency`).
    /// Below `concurrency`, commands without Pulumi (pool claims, renewals)
    /// are served while every Pulumi turn is taken.
    pub pulumi_runs: usize,
    /// Directory scenario references resolve under this directory.
    pub scenarios_dir: PathBuf,
    /// How OCI registries are reached, and scenario size bounds.
    pub oci: cm_core::oci::ClientConfig,
    pub driver: pulumi::DriverConfig,
    pub lock_timeout: Duration,
    /// Cap on concurrent instances per source.
    pub quota: context::Quota,
    /// TTL of the lease binding this worker's locks (seconds).
    pub lease_ttl: i64,
    /// Shortest time between two checkpoints of a running Pulumi operation
    /// stored as the stack's state (a crash loses at most this much progress).
    pub checkpoint_interval: Duration,
    /// How long in-flight commands may finish after shutdown is asked.
    pub shutdown_grace: Duration,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How pools are refilled and adaptive pools sized.
    pub pools: context::PoolSettings,
}

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] cm_core::nats::NatsError),
    #[error(transparent)]
    Config(#[from] cm_core::config::ConfigError),
    /// The streams or the workers' consumer could not be set up.
    #[error("JetStream: {0}")]
    Streams(#[source] async_nats::Error),
    /// Consuming commands stopped on an error.
    #[error("consuming commands: {0}")]
    Consume(#[source] async_nats::Error),
    /// The `/metrics` endpoint failed.
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] cm_core::store::StoreError),
    #[error(transparent)]
    Driver(#[from] pulumi::DriverError),
    /// The Pulumi state bucket could not be opened.
    #[error(transparent)]
    States(#[from] cm_core::stack_store::StackStoreError),
}

/// Exports the queue-lag and inventory gauges on `listen` until `shutdown`,
/// consuming nothing (for deployments that keep it apart from the workers).
pub async fn run_exporter(
    connection: &cm_core::config::Connection,
    listen: std::net::SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let queue_config = &connection.queue;
    let nats = connection.nats("cm-queue-exporter").await?;
    let js = async_nats::jetstream::new(nats);
    protocol::ensure_streams(&js, queue_config)
        .await
        .map_err(WorkerError::Streams)?;
    // The consumer must exist for its lag to be read, workers running or not.
    protocol::workers_consumer(&js, queue_config)
        .await
        .map_err(WorkerError::Streams)?;
    let store = connection.store().await?;
    let stop = CancellationToken::new();
    tokio::spawn(observer::run(
        js,
        store,
        Default::default(),
        Duration::from_secs(2),
        stop.clone(),
    ));
    let serve = cm_core::metrics::serve(listen);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r.map_err(WorkerError::Metrics)?,
        _ = shutdown => {}
    }
    stop.cancel();
    Ok(())
}

/// Runs a worker until `shutdown` completes, then drains in-flight commands
/// (within the grace period) and revokes its lease.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    failpoint::announce();
    let runs = match config.pulumi_runs {
        0 => config.concurrency,
        n => n,
    };
    let driver = Driver::new(config.driver.clone())?.limit_runs(runs);
    let nats = config.connection.nats("cm-worker").await?;
    let js = async_nats::jetstream::new(nats.clone());
    protocol::ensure_streams(&js, &config.connection.queue)
        .await
        .map_err(WorkerError::Streams)?;
    let store = config.connection.store().await?;
    let session = Session::start(store.client(), config.lease_ttl).await?;
    // No Pulumi run outlives the lease its locks hang on, even when this
    // process is paused.
    let driver = Arc::new(driver.guarded(session.valid_until())?);
    let stacks = cm_core::stack_store::StackStore::open(&js, &config.connection.etcd_root).await?;
    let retention = Arc::new(retention_lease(store.client()));
    let ctx = Arc::new(Ctx {
        retention,
        store,
        nats: nats.clone(),
        js: js.clone(),
        driver,
        session,
        queue: config.connection.queue.clone(),
        sources: sources::Sources::new(
            config.scenarios_dir.clone(),
            config.driver.cache_dir.join("sources"),
            cm_core::oci::Client::new(config.oci.clone()),
            js.clone(),
        ),
        prepared: Default::default(),
        lock_timeout: config.lock_timeout,
        quota: config.quota,
        stacks,
        checkpoint_interval: config.checkpoint_interval,
        pools: config.pools,
    });
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(observer::run(
        ctx.js.clone(),
        ctx.store.clone(),
        ctx.pools.tuning,
        Duration::from_secs(5),
        token.clone(),
    ));
    if let Some(addr) = config.metrics_listen {
        tokio::spawn(async move {
            if let Err(e) = cm_core::metrics::serve(addr).await {
                tracing::error!(error = %e, %addr, "metrics endpoint failed");
            }
        });
    }
    let consume = consumer::run(
        ctx.clone(),
        config.concurrency,
        token,
        config.shutdown_grace,
    );
    tokio::pin!(consume);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut consume => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down: no new commands, finishing in-flight ones");
            trigger.cancel();
            consume.await
        }
    };
    if let Ok(ctx) = Arc::try_unwrap(ctx) {
        ctx.session.close().await;
    }
    let _ = nats.flush().await;
    result.map_err(WorkerError::Consume)
}

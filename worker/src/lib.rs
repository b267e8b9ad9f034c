//! The worker: consumes commands from JetStream, takes etcd locks, runs
//! Pulumi and writes records and results back.
//!
//! # Layout
//! - [`run`]: connects, ensures the streams, consumes until shutdown.
//! - [`consumer`]: the pull loop and how each command is settled (ack, nak
//!   with backoff, dead letter, in-progress acks).
//! - [`handlers`]: one file per command (`instance_create.rs`, ...).
//! - [`context`]: what handlers share (store, queue, driver, locks).
//! - [`observer`]: queue-lag and inventory gauges for `/metrics`.
//! - [`pulumi`]: the Pulumi driver, the only place that runs the CLI.
//! - [`failpoint`]: places the crash tests make the worker die on purpose.
//! - [`passphrase`]: where the Pulumi passphrase comes from (required
//!   outside `--dev`).
//! - [`sources`]: scenario references to local directories (scenario root,
//!   OCI registries, uploads in the object store), cached per digest.

pub mod consumer;
pub mod context;
pub mod failpoint;
pub mod handlers;
pub mod observer;
pub mod passphrase;
pub mod pulumi;
pub mod sources;

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use cm_core::{
    lock::{RetentionLease, Session},
    queue::{self, QueueConfig},
    store::{Store, StoreOptions},
};
use tokio_util::sync::CancellationToken;

use crate::{context::Ctx, pulumi::Driver};

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub nats_url: String,
    /// NATS authentication and TLS.
    pub nats: cm_core::nats::NatsOptions,
    pub etcd_endpoints: Vec<String>,
    pub etcd_root: String,
    pub store: StoreOptions,
    pub queue: QueueConfig,
    /// Commands processed at once by this worker.
    pub concurrency: usize,
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
    /// How long in-flight commands may finish after shutdown is asked.
    pub shutdown_grace: Duration,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] cm_core::nats::NatsError),
    #[error(transparent)]
    Config(#[from] cm_core::config::ConfigError),
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] cm_core::store::StoreError),
    #[error(transparent)]
    Driver(#[from] pulumi::DriverError),
}

/// Exports the queue-lag and inventory gauges on `listen` until `shutdown`,
/// consuming nothing (for deployments that keep it apart from the workers).
pub async fn run_exporter(
    config: &cm_core::config::ConnectArgs,
    queue_config: &QueueConfig,
    listen: std::net::SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let store_options = config.store_options()?;
    let nats = cm_core::nats::connect(
        &config.nats_url,
        "cm-queue-exporter",
        &config.nats_options()?,
    )
    .await?;
    let js = async_nats::jetstream::new(nats);
    queue::ensure_streams(&js, queue_config)
        .await
        .map_err(|e| WorkerError::Nats(e.to_string()))?;
    // The consumer must exist for its lag to be read, workers running or not.
    queue::workers_consumer(&js, queue_config)
        .await
        .map_err(|e| WorkerError::Nats(e.to_string()))?;
    let store = Store::connect(&config.etcd_endpoints, &config.etcd_root, &store_options).await?;
    let stop = CancellationToken::new();
    tokio::spawn(observer::run(
        js,
        store,
        Duration::from_secs(2),
        stop.clone(),
    ));
    let serve = cm_core::metrics::serve(listen);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r.map_err(|e| WorkerError::Nats(format!("metrics endpoint: {e}")))?,
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
    let driver = Arc::new(Driver::new(config.driver.clone())?);
    let nats = cm_core::nats::connect(&config.nats_url, "cm-worker", &config.nats).await?;
    let js = async_nats::jetstream::new(nats.clone());
    queue::ensure_streams(&js, &config.queue)
        .await
        .map_err(|e| WorkerError::Nats(e.to_string()))?;
    let store = Store::connect(&config.etcd_endpoints, &config.etcd_root, &config.store).await?;
    let session = Session::start(store.client(), config.lease_ttl).await?;
    let retention = Arc::new(RetentionLease::new(store.client(), 24 * 3600, 25 * 3600));
    let ctx = Arc::new(Ctx {
        store,
        nats: nats.clone(),
        js: js.clone(),
        driver,
        session,
        queue: config.queue.clone(),
        sources: sources::Sources::new(
            config.scenarios_dir.clone(),
            config.driver.cache_dir.join("sources"),
            cm_core::oci::Client::new(config.oci.clone()),
            js.clone(),
        ),
        prepared: Default::default(),
        lock_timeout: config.lock_timeout,
        quota: config.quota,
    });
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(observer::run(
        ctx.js.clone(),
        ctx.store.clone(),
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
        retention,
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
    result.map_err(|e| WorkerError::Nats(e.to_string()))
}

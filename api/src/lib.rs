//! The API: a thin front door. It validates requests, answers reads from
//! etcd, and turns writes into commands on JetStream, waiting for the
//! worker's result. No business logic beyond validation lives here.
//!
//! # Layout
//! - [`run`]: connects, then serves REST and the NATS service until shutdown.
//! - [`rest`]: the chall-manager-compatible REST routes.
//! - [`nats_service`]: the same operations as a NATS service.
//! - [`ops`]: the operations both front doors share.
//! - [`validate`]: request validation.
//! - [`scenarios`]: scenario checks before publishing (OCI registries, the
//!   object store) and direct uploads.
//! - [`submit`]: publishing commands and routing their results back.
//! - [`json`]: lenient protobuf-JSON parsing (grpc-gateway's behaviour).
//! - [`error`]: the one mapping of domain errors to HTTP and NATS errors.

pub mod error;
pub mod json;
pub mod nats_service;
pub mod ops;
pub mod rest;
pub mod scenarios;
pub mod submit;
pub mod validate;

use std::{future::Future, time::Duration};

use cm_core::{
    queue::{self, QueueConfig},
    store::{Store, StoreOptions},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{ops::App, submit::Submitter};

/// Everything the API needs to run.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub nats_url: String,
    pub etcd_endpoints: Vec<String>,
    pub etcd_root: String,
    pub store: StoreOptions,
    pub queue: QueueConfig,
    /// How long a write waits for the worker's result before answering 504.
    pub result_timeout: Duration,
    /// Serve the NATS service front door too.
    pub nats_service: bool,
    /// How OCI registries are reached, and scenario size bounds.
    pub oci: cm_core::oci::ClientConfig,
    /// Largest scenario archive accepted by `POST /api/v1/scenario`, in bytes.
    pub max_upload: usize,
}

/// Default of [`ApiConfig::max_upload`]: 128 MiB.
pub const DEFAULT_MAX_UPLOAD: usize = 128 << 20;

/// Why the API could not run.
#[derive(Debug, thiserror::Error)]
pub enum ApiRunError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] cm_core::store::StoreError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves REST on `listener` (and the NATS service) until `shutdown` completes.
pub async fn run(
    config: ApiConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiRunError> {
    let nats = async_nats::ConnectOptions::new()
        .name("cm-api")
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| ApiRunError::Nats(e.to_string()))?;
    let js = async_nats::jetstream::new(nats.clone());
    queue::ensure_streams(&js, &config.queue)
        .await
        .map_err(|e| ApiRunError::Nats(e.to_string()))?;
    let store = Store::connect(&config.etcd_endpoints, &config.etcd_root, &config.store).await?;
    let scenarios = scenarios::Scenarios::new(
        cm_core::oci::Client::new(config.oci.clone()),
        js.clone(),
        config.max_upload,
    );
    let submitter = Submitter::start(nats.clone(), js, store.clone())
        .await
        .map_err(|e| ApiRunError::Nats(e.to_string()))?;
    let app = App {
        store,
        submitter,
        result_timeout: config.result_timeout,
        scenarios,
    };

    let token = CancellationToken::new();
    let service = config.nats_service.then(|| {
        tokio::spawn(nats_service::serve(
            app.clone(),
            nats.clone(),
            token.clone(),
        ))
    });
    let stop = token.clone();
    tracing::info!(addr = ?listener.local_addr().ok(), "API listening");
    let served = axum::serve(listener, rest::router(app))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await;
    token.cancel();
    if let Some(service) = service {
        match service.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "NATS service ended with an error"),
            Err(e) => tracing::warn!(error = %e, "NATS service task failed"),
            Ok(Ok(())) => {}
        }
    }
    let _ = nats.flush().await;
    served.map_err(ApiRunError::Http)
}

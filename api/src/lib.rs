//! The API: a thin front door. It validates requests, answers reads from
//! etcd, and turns writes into commands on JetStream, waiting for the
//! worker's result. No business logic beyond validation lives here.
//!
//! # Layout
//! - [`run`]: connects, then serves REST and gRPC (one listener) and the
//!   NATS service until shutdown.
//! - [`cli`]: the command line (flags and environment) and its checks.
//! - [`auth`]: bearer tokens, checked before any route runs.
//! - [`tls`]: HTTPS and client certificates (mutual TLS).
//! - [`rest`]: the chall-manager-compatible REST routes.
//! - [`grpc`]: chall-manager's gRPC services (and health, reflection) on
//!   the REST listener, told apart by content type.
//! - [`nats_service`]: the same operations as a NATS service.
//! - [`ops`]: the operations both front doors share.
//! - [`validate`]: request validation.
//! - [`scenarios`]: scenario checks before publishing (OCI registries, the
//!   object store) and direct uploads.
//! - [`submit`]: publishing commands and routing their results back.
//! - [`telemetry`]: server spans continuing the caller's trace.
//! - [`json`]: protobuf JSON as chall-manager's grpc-gateway speaks it:
//!   lenient parsing, every field printed (`null` for unset messages).
//! - [`error`]: the one mapping of domain errors to HTTP and NATS errors,
//!   with chall-manager's `google.rpc` details, and to gRPC statuses.

pub mod auth;
pub mod cli;
pub mod error;
pub mod grpc;
pub mod json;
pub mod nats_service;
pub mod ops;
pub mod rest;
pub mod scenarios;
pub mod submit;
pub mod telemetry;
pub mod tls;
pub mod validate;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use cm_core::protocol::{self};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{auth::ApiAuth, ops::App, submit::Submitter};

/// Everything the API needs to run.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where NATS and etcd are, and the queue's settings.
    pub connection: cm_core::config::Connection,
    /// How long a write waits for the worker's result before answering 504.
    pub result_timeout: Duration,
    /// Serve the NATS service front door too.
    pub nats_service: bool,
    /// How OCI registries are reached, and scenario size bounds.
    pub oci: cm_core::oci::ClientConfig,
    /// Largest scenario archive accepted by `POST /api/v1/scenario`, in bytes.
    pub max_upload: usize,
    /// Bearer tokens required on every route but `/healthcheck` (none: open).
    pub auth: ApiAuth,
    /// Serve HTTPS with this configuration (client certificates required
    /// when it says so).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Serve `/metrics` on its own listener, unauthenticated, instead of on
    /// the API's port behind its authentication.
    pub metrics_listen: Option<SocketAddr>,
}

/// Default of [`ApiConfig::max_upload`]: 128 MiB.
pub const DEFAULT_MAX_UPLOAD: usize = 128 << 20;

/// Why the API could not run.
#[derive(Debug, thiserror::Error)]
pub enum ApiRunError {
    #[error(transparent)]
    Connect(#[from] cm_core::nats::NatsError),
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] cm_core::store::StoreError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// The one router of the API's listener: gRPC calls (by content type) go to
/// `grpc`, everything else to `rest`.
pub fn front_door(rest: axum::Router, grpc: axum::Router) -> axum::Router {
    axum::Router::new().fallback_service(grpc::ByContentType { rest, grpc })
}

/// Serves REST and gRPC on `listener` (and the NATS service) until
/// `shutdown` completes.
pub async fn run(
    config: ApiConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiRunError> {
    let nats = config.connection.nats("cm-api").await?;
    let js = async_nats::jetstream::new(nats.clone());
    protocol::ensure_streams(&js, &config.connection.queue)
        .await
        .map_err(|e| ApiRunError::Nats(e.to_string()))?;
    let store = config.connection.store().await?;
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
    let metrics_apart = config.metrics_listen.is_some();
    if let Some(addr) = config.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(addr).await?;
        let stop = token.clone();
        tokio::spawn(async move {
            let served = axum::serve(metrics, cm_core::metrics::router::<()>())
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, %addr, "metrics endpoint failed");
            }
        });
    }
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        https = config.tls.is_some(),
        tokens = !config.auth.is_open(),
        "API listening"
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(grpc::report_health(
        app.clone(),
        health_reporter,
        token.clone(),
    ));
    let router = front_door(
        rest::router(app.clone(), config.auth.clone(), !metrics_apart),
        grpc::router(app, config.auth.clone(), health),
    );
    let graceful = async move {
        shutdown.await;
        stop.cancel();
    };
    let served = match config.tls {
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, tls)?;
            axum::serve(listener, router)
                .with_graceful_shutdown(graceful)
                .await
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(graceful)
                .await
        }
    };
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

//! `cm-api`: parses flags, sets up telemetry and serves the front door.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use cm_api::ApiConfig;
use cm_core::{config::ConnectArgs, queue::QueueConfig, store::StoreOptions};

/// Front door of the CTF instance manager: the chall-manager compatible REST
/// API (/api/v1/challenge, /api/v1/instance) and a NATS service, publishing
/// commands to JetStream for the workers. Every flag can also be set through
/// the environment variable shown in brackets.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Address the REST API listens on.
    #[arg(long, env = "CM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// How long a write waits for the worker's result before answering 504
    /// with the operation to poll.
    #[arg(long, env = "CM_RESULT_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    result_timeout: Duration,

    /// Do not serve the NATS service front door (REST only).
    #[arg(long, env = "CM_NO_NATS_SERVICE")]
    no_nats_service: bool,

    #[command(flatten)]
    oci: cm_core::oci::config::OciArgs,

    /// Largest scenario archive `POST /api/v1/scenario` accepts, in bytes.
    #[arg(long, env = "CM_SCENARIO_MAX_UPLOAD", default_value_t = cm_api::DEFAULT_MAX_UPLOAD)]
    scenario_max_upload: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-api")?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let config = ApiConfig {
        nats_url: cli.connect.nats_url,
        etcd_endpoints: cli.connect.etcd_endpoints,
        etcd_root: cli.connect.etcd_root,
        store: StoreOptions::default(),
        queue: QueueConfig::default(),
        result_timeout: cli.result_timeout,
        nats_service: !cli.no_nats_service,
        oci: cli
            .oci
            .client_config()
            .context("reading the OCI registry credentials")?,
        max_upload: cli.scenario_max_upload,
    };
    cm_api::run(config, listener, cm_core::shutdown::signal()).await?;
    Ok(())
}

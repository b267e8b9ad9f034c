//! `cm-janitor`: parses flags, sets up telemetry and runs the expiry timer.

use std::time::Duration;

use clap::Parser;
use cm_core::config::{ConnectArgs, MetricsListen};
use cm_janitor::JanitorConfig;

/// Janitor of the CTF instance manager: on a timer, finds the instances past
/// their `until` and publishes their expiry commands (the workers destroy
/// them). Safe to run several at once. Every flag can also be set through the
/// environment variable shown in brackets.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Time between two ticks (e.g. `30s`, `1m`).
    #[arg(long, env = "CM_JANITOR_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,

    /// Run one tick and exit (for cron).
    #[arg(long, env = "CM_JANITOR_ONCE")]
    once: bool,

    /// Address of the Prometheus `/metrics` endpoint (`off` to disable).
    #[arg(long, env = "CM_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    metrics_listen: MetricsListen,

    /// Most expiry commands published per tick; the rest wait for the next tick.
    #[arg(long, env = "CM_JANITOR_BATCH", default_value_t = 1000)]
    batch: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-janitor")?;
    let config = JanitorConfig {
        nats: cli.connect.nats_options()?,
        store: cli.connect.store_options()?,
        queue: cli.connect.queue_config(),
        nats_url: cli.connect.nats_url,
        etcd_endpoints: cli.connect.etcd_endpoints,
        etcd_root: cli.connect.etcd_root,
        interval: cli.interval,
        once: cli.once,
        batch: cli.batch.max(1),
        metrics_listen: cli.metrics_listen.0,
    };
    cm_janitor::run(config, cm_core::shutdown::signal()).await?;
    Ok(())
}

//! `cm-janitor`: parses flags, sets up telemetry and runs the expiry timer.

use std::time::Duration;

use clap::Parser;
use cm_core::{queue::QueueConfig, store::StoreOptions};
use cm_janitor::JanitorConfig;

/// Janitor of the CTF instance manager: on a timer, finds the instances past
/// their `until` and publishes their expiry commands (the workers destroy
/// them). Safe to run several at once. Every flag can also be set through the
/// environment variable shown in brackets.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "CM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,

    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "CM_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd_endpoints: Vec<String>,

    /// Prefix of every key this system writes in etcd.
    #[arg(long, env = "CM_ETCD_ROOT", default_value = "/cm")]
    etcd_root: String,

    /// Time between two ticks (e.g. `30s`, `1m`).
    #[arg(long, env = "CM_JANITOR_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,

    /// Run one tick and exit (for cron).
    #[arg(long, env = "CM_JANITOR_ONCE")]
    once: bool,

    /// Most expiry commands published per tick; the rest wait for the next tick.
    #[arg(long, env = "CM_JANITOR_BATCH", default_value_t = 1000)]
    batch: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-janitor")?;
    let config = JanitorConfig {
        nats_url: cli.nats_url,
        etcd_endpoints: cli.etcd_endpoints,
        etcd_root: cli.etcd_root,
        store: StoreOptions::default(),
        queue: QueueConfig::default(),
        interval: cli.interval,
        once: cli.once,
        batch: cli.batch.max(1),
    };
    cm_janitor::run(config, cm_core::shutdown::signal()).await?;
    Ok(())
}

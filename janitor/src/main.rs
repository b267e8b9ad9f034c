//! `cm-janitor`: publishes expiry commands on a timer (arrives with issue 4).

use std::time::Duration;

use clap::Parser;

/// Janitor of the CTF instance manager: on a timer, finds expired instances
/// and publishes their expiry commands. Every flag can also be set through the
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

    /// Time between two ticks (e.g. `30s`, `1m`).
    #[arg(long, env = "CM_JANITOR_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-janitor")?;
    anyhow::bail!(
        "the janitor is not implemented yet (NATS {}, etcd {:?}, every {:?}): see issue 4",
        cli.nats_url,
        cli.etcd_endpoints,
        cli.interval
    )
}

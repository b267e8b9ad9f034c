//! `cm-api`: the REST and NATS front door (arrives with the command pipeline).

use clap::Parser;

/// Front door of the CTF instance manager: chall-manager compatible REST API
/// and NATS service, publishing commands to JetStream. Every flag can also be
/// set through the environment variable shown in brackets.
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

    /// Address the REST API listens on.
    #[arg(long, env = "CM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-api")?;
    anyhow::bail!(
        "the API is not implemented yet (NATS {}, etcd {:?}, listen {}): see issue 3",
        cli.nats_url,
        cli.etcd_endpoints,
        cli.listen
    )
}

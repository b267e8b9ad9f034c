//! `cm-api`: parses flags, sets up telemetry and serves the front door.

use clap::Parser;
use cm_api::cli::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config()?;
    let _telemetry = cm_core::telemetry::init("cm-api")?;
    if config.auth.is_open() && cli.security.tls_client_ca.is_none() {
        tracing::warn!("--dev: the API accepts requests from anyone");
    }
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    cm_api::run(config, listener, cm_core::shutdown::signal()).await?;
    Ok(())
}

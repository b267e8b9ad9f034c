//! `cm-janitor`: parses flags (see `cm_janitor::cli`), sets up telemetry and
//! runs the expiry timer.

use clap::Parser;
use cm_janitor::cli::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-janitor")?;
    cm_janitor::run(cli.config()?, cm_core::shutdown::signal()).await?;
    Ok(())
}

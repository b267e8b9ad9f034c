//! `cm-worker`: parses flags, sets up telemetry and runs the requested mode
//! (see `cm_worker::cli`).

use clap::Parser;
use cm_worker::cli::Cli;

/// Stack of each runtime thread. A handler's future nests the lock, store
/// and Pulumi driver futures several levels deep (a create that evicts
/// another instance destroys it from inside its own run), and unoptimised
/// builds poll them with large frames: 2 MiB (the default) overflowed there.
/// Only touched pages cost memory.
const THREAD_STACK: usize = 8 << 20;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK)
        .build()?
        .block_on(run_main())
}

async fn run_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-worker")?;
    cm_worker::cli::run(cli).await?;
    Ok(())
}

//! Resident memory of our processes idle: a fresh stack (API, one worker,
//! janitor) left alone for `--idle-settle` seconds after it is ready, then
//! `VmRSS` (and `VmHWM`, the peak so far) of each. The numbers under load
//! come from the throughput scenario.

use std::time::Duration;

use anyhow::Context;

use super::Ctx;
use crate::{
    report::{Row, Stat},
    stack::{Stack, StackConfig},
};

pub const MAX_IDLE_MIB: f64 = 30.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let config = StackConfig {
        janitor: true,
        ..StackConfig::workers(1, ctx.params.worker_concurrency)
    };
    let stack = Stack::start(&ctx.env, &config).await?;
    tokio::time::sleep(Duration::from_secs(ctx.params.idle_settle_secs)).await;
    for service in stack.services() {
        let mem = service
            .memory()
            .with_context(|| format!("{} is gone\n{}", service.name, service.log_tail(20)))?;
        ctx.report.push(
            Row::value(
                &format!("rss.idle.{}", service.name),
                &format!("rss idle: {}", service.name),
                mem.rss_kib as f64 / 1024.0,
                "MiB",
            )
            .at_most(Stat::P50, MAX_IDLE_MIB)
            .note(format!("VmHWM {:.1} MiB", mem.hwm_kib as f64 / 1024.0)),
        );
    }
    Ok(())
}

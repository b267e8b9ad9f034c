//! Claiming a pre-deployed instance from a pool, end to end through the API
//! (`POST /api/v1/instance` on a challenge with a ready pool): one etcd
//! transaction in the worker, no Pulumi. Two pools of `--pool` instances:
//! one capped (`max = min`, so a claim triggers no refill) and one uncapped
//! (each claim triggers a refill whose Pulumi run shares the cores with the
//! following claims, as in production).

use std::time::{Duration, Instant};

use anyhow::bail;
use cm_core::model::InstanceStatus;
use serde_json::json;

use super::Ctx;
use crate::{
    report::{Row, Stat},
    scrape,
    stack::{Stack, StackConfig},
    stats::ms,
};

pub const MAX_P50_MS: f64 = 5.0;
pub const MAX_P99_MS: f64 = 20.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.compiled().await?;
    let pool = ctx.params.pool.max(1);
    let stack = Stack::start(
        &ctx.env,
        &StackConfig::workers(1, ctx.params.worker_concurrency),
    )
    .await?;
    for (id, max) in [("capped", pool), ("refilled", 0)] {
        stack
            .challenge(json!({"id": id, "scenario": super::EXAMPLE, "timeout": "3600s", "min": pool, "max": max}))
            .await?;
    }
    // Pulumi ups at the worker's concurrency; generous for a loaded machine.
    let limit = Duration::from_secs(120 + 20 * pool as u64);
    for id in ["capped", "refilled"] {
        wait_pool(&stack, id, pool, limit).await?;
    }
    for (id, name, note) in [
        (
            "capped",
            "claim: from a pool, no refill (max = min)",
            "pool capped: the refill request finds the pool full, no Pulumi runs",
        ),
        (
            "refilled",
            "claim: from a pool, refills running",
            "each claim asks for a refill; its Pulumi runs while later claims are timed",
        ),
    ] {
        let worker = &stack.workers[0].metrics;
        let capped = id == "capped";
        if capped {
            stack.settle().await?;
        }
        let before = scrape::fetch(&stack.http, worker).await?;
        let mut samples = Vec::with_capacity(pool);
        let mut handler_row = None;
        for n in 0..pool {
            samples.push(ms(stack.create(id, &format!("{id}-{n}")).await?));
        }
        if capped {
            // Refills of a capped pool run no Pulumi: waiting for them is quick.
            stack.settle().await?;
            let after = scrape::fetch(&stack.http, worker).await?;
            let kind = [("kind", "instance.create")];
            let (handler, n) =
                scrape::mean_ms(&before, &after, "cm_command_duration_seconds", &kind);
            handler_row = Some(
                Row::value(
                    "claim.capped.handler",
                    "claim: worker handler, no refill (mean, /metrics)",
                    handler,
                    "ms",
                )
                .n(n as usize),
            );
        }
        ctx.report.push(
            Row::latency(&format!("claim.{id}"), name, &samples)
                .at_most(Stat::P50, MAX_P50_MS)
                .at_most(Stat::P99, MAX_P99_MS)
                .note(note),
        );
        if let Some(row) = handler_row {
            ctx.report.push(row);
        }
    }
    Ok(())
}

/// Waits until `challenge` has `size` ready pooled instances.
pub(crate) async fn wait_pool(
    stack: &Stack,
    challenge: &str,
    size: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let ready = stack
            .store
            .list_pooled(challenge)
            .await?
            .iter()
            .filter(|v| v.value.status == InstanceStatus::Ready)
            .count();
        if ready >= size {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "pool {challenge}: {ready} of {size} ready after {limit:?}\n{}",
                stack.logs(15)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

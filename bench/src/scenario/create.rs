//! A fresh instance end to end with one client: `POST /api/v1/instance` →
//! API → JetStream → worker (locks, Pulumi up, etcd) → reply, compared with
//! the raw `pulumi up` floor. The worker's own `/metrics` split the time:
//! its handler, the Pulumi run inside it, and publish-to-ack.

use serde_json::json;

use super::Ctx;
use crate::{
    report::{Row, Stat},
    scrape,
    stack::{Stack, StackConfig},
    stats::{ms, p50},
};

/// Target: end to end within 15% of the raw `pulumi up`.
pub const MAX_RATIO: f64 = 1.15;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.compiled().await?;
    let raw = ctx.raw_floor_ms().await?;
    let stack = Stack::start(
        &ctx.env,
        &StackConfig::workers(1, ctx.params.worker_concurrency),
    )
    .await?;
    stack
        .challenge(json!({"id": "fresh", "scenario": super::EXAMPLE, "timeout": "3600s"}))
        .await?;
    stack.create("fresh", "warm-up").await?;
    stack.settle().await?;
    let worker = &stack.workers[0];
    let before = scrape::fetch(&stack.http, &worker.metrics).await?;
    let mut samples = Vec::new();
    for n in 0..ctx.params.iterations {
        samples.push(ms(stack.create("fresh", &format!("s{n}")).await?));
    }
    stack.settle().await?;
    let after = scrape::fetch(&stack.http, &worker.metrics).await?;
    let e2e = p50(&samples);
    let e2e_mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    ctx.report.push(
        Row::latency(
            "create.e2e",
            "create: fresh instance end to end (1 client)",
            &samples,
        )
        .ratio(e2e / raw, "raw pulumi up p50")
        .at_most(Stat::Ratio, MAX_RATIO),
    );
    let kind = [("kind", "instance.create")];
    let (handler, n_handler) =
        scrape::mean_ms(&before, &after, "cm_command_duration_seconds", &kind);
    let (pulumi, n_pulumi) = scrape::mean_ms(
        &before,
        &after,
        "cm_pulumi_duration_seconds",
        &[("phase", "up")],
    );
    let (queue, n_queue) = scrape::mean_ms(&before, &after, "cm_command_latency_seconds", &kind);
    ctx.report.push(
        Row::value(
            "create.worker_pulumi_up",
            "create: worker's Pulumi up (mean, /metrics)",
            pulumi,
            "ms",
        )
        .n(n_pulumi as usize)
        .ratio(pulumi / raw, "raw pulumi up p50"),
    );
    ctx.report.push(
        Row::value(
            "create.worker_handler",
            "create: worker handler incl. Pulumi (mean, /metrics)",
            handler,
            "ms",
        )
        .n(n_handler as usize)
        .note(format!(
            "handler minus Pulumi = {:.1} ms (locks, etcd, outputs); mean end to end minus handler = {:.1} ms (API, JetStream, reply)",
            handler - pulumi,
            e2e_mean - handler
        )),
    );
    ctx.report.push(
        Row::value(
            "create.publish_to_ack",
            "create: publish to ack (mean, /metrics; the ack follows the reply)",
            queue,
            "ms",
        )
        .n(n_queue as usize),
    );
    Ok(())
}

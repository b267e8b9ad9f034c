//! The API's own overhead, no Pulumi in the timed path: a read
//! (`GET /api/v1/instance/{c}/{s}`, one etcd read), a write through the full
//! pipeline (`PATCH` renew: validation, operation record, JetStream publish
//! and ack, worker consume, locks, guarded etcd write, result, reply) and the
//! same write answered at acceptance (`Prefer: respond-async`). The worker's
//! `/metrics` split the renew into its handler and publish-to-ack.

use std::time::Instant;

use reqwest::Method;
use serde_json::json;

use super::Ctx;
use crate::{
    report::{Row, Stat},
    scrape,
    stack::{Stack, StackConfig},
    stats::ms,
};

pub const MAX_WRITE_P50_MS: f64 = 3.0;

pub const PATH: &str = "/api/v1/instance/bench/s";

/// Registers a challenge and deploys the one instance at [`PATH`].
pub async fn prepare(stack: &Stack) -> anyhow::Result<()> {
    stack
        .challenge(json!({"id": "bench", "scenario": super::EXAMPLE, "timeout": "3600s"}))
        .await?;
    stack.create("bench", "s").await?;
    Ok(())
}

/// `n` sequential `method` requests on [`PATH`], timed (ms).
pub async fn timed(
    stack: &Stack,
    method: Method,
    headers: &[(&str, &str)],
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        stack.ok(method.clone(), PATH, None, headers).await?;
        out.push(ms(started.elapsed()));
    }
    Ok(out)
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.compiled().await?;
    let stack = Stack::start(
        &ctx.env,
        &StackConfig::workers(1, ctx.params.worker_concurrency),
    )
    .await?;
    let n = ctx.params.fast_iterations;
    prepare(&stack).await?;
    let worker = stack.workers[0].metrics.clone();
    let reads = timed(&stack, Method::GET, &[], n).await?;
    stack.settle().await?;
    let before = scrape::fetch(&stack.http, &worker).await?;
    let writes = timed(&stack, Method::PATCH, &[], n).await?;
    stack.settle().await?;
    let after = scrape::fetch(&stack.http, &worker).await?;
    let accepted = timed(&stack, Method::PATCH, &[("Prefer", "respond-async")], n).await?;
    ctx.report.push(Row::latency(
        "write.read",
        "API read: GET instance (etcd read)",
        &reads,
    ));
    ctx.report.push(
        Row::latency(
            "write.renew",
            "API write overhead: renew, full pipeline",
            &writes,
        )
        .at_most(Stat::P50, MAX_WRITE_P50_MS),
    );
    ctx.report.push(Row::latency(
        "write.accepted",
        "API write accepted: renew, respond-async",
        &accepted,
    ));
    let kind = [("kind", "instance.renew")];
    let (handler, n) = scrape::mean_ms(&before, &after, "cm_command_duration_seconds", &kind);
    ctx.report.push(
        Row::value(
            "write.renew_handler",
            "renew: worker handler (mean, /metrics)",
            handler,
            "ms",
        )
        .n(n as usize),
    );
    let (queue, n) = scrape::mean_ms(&before, &after, "cm_command_latency_seconds", &kind);
    ctx.report.push(
        Row::value(
            "write.renew_publish_to_ack",
            "renew: publish to ack (mean, /metrics; the ack follows the reply)",
            queue,
            "ms",
        )
        .n(n as usize),
    );
    Ok(())
}

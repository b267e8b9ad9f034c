//! Pulumi state at scale: one create of the `steps` example with each of
//! `--state-sizes` resources, on a fresh stack each (1 worker, the default
//! checkpoint interval), then its delete. Per size: wall time, the final state's size, bytes of state the
//! worker wrote to the object store and to etcd (its
//! `cm_state_bytes_written_total`), etcd's database before and after, and
//! etcd's peak resident memory. The smallest size is also run through a
//! raw `pulumi up`, the floor its create is compared with.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Ctx, floor};
use crate::{
    procfs,
    report::{Row, Stat},
    scrape,
    stack::{Stack, StackConfig},
    stats::{ms, p50},
};

/// Target: the smallest stack's create within 10% of the raw `pulumi up`.
pub const MAX_RATIO: f64 = 1.10;

/// Target: etcd's growth per deploy, bytes, whatever the state's size.
pub const MAX_ETCD_GROWTH: f64 = 64.0 * 1024.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mut sizes = ctx.params.state_sizes.clone();
    sizes.sort_unstable();
    for (i, &steps) in sizes.iter().enumerate() {
        one_size(ctx, steps, i == 0).await?;
    }
    Ok(())
}

async fn one_size(ctx: &mut Ctx, steps: usize, with_floor: bool) -> anyhow::Result<()> {
    let additional = json!({"steps": steps.to_string()});
    let config = StackConfig::workers(1, 1);
    let stack = Stack::start(&ctx.env, &config).await?;
    stack
        .challenge(json!({"id": "state", "scenario": "steps", "timeout": "36000s", "additional": additional}))
        .await?;
    // Warm-up: compiles the example (not timed), on its own stack.
    let warm = json!({"steps": "1"});
    stack
        .challenge(json!({"id": "warm", "scenario": "steps", "additional": warm}))
        .await?;
    stack.create("warm", "w").await?;
    stack.settle().await?;

    let worker = &stack.workers[0];
    let before_metrics = scrape::fetch(&stack.http, &worker.metrics).await?;
    let before = stack.store.space().await?;
    let mut etcd_peak_kib = 0;
    let (create, done) = operation(
        &stack,
        reqwest::Method::POST,
        "/api/v1/instance",
        Some(&json!({"challengeId": "state", "sourceId": "s"})),
        &mut etcd_peak_kib,
    )
    .await?;
    if done["state"] != "SUCCEEDED" {
        bail!("create of {steps} steps: {done}\n{}", stack.logs(30));
    }
    stack.settle().await?;
    let after = stack.store.space().await?;
    let after_metrics = scrape::fetch(&stack.http, &worker.metrics).await?;
    let written = |store: &str| {
        scrape::sum(
            &after_metrics,
            "cm_state_bytes_written_total",
            &[("store", store)],
        ) - scrape::sum(
            &before_metrics,
            "cm_state_bytes_written_total",
            &[("store", store)],
        )
    };
    let (object_bytes, etcd_bytes) = (written("object"), written("etcd"));
    let rec = stack
        .store
        .get_instance("state", "s")
        .await?
        .context("no record")?;
    let state_bytes = match stack.store.get_stack("state", &rec.value.identity).await? {
        Some(cm_core::store::StoredStack::Pointer(p)) => p.size as f64,
        _ => 0.0,
    };
    let (delete, gone) = operation(
        &stack,
        reqwest::Method::DELETE,
        "/api/v1/instance/state/s",
        None,
        &mut etcd_peak_kib,
    )
    .await?;
    if gone["state"] != "SUCCEEDED" {
        bail!("delete of {steps} steps: {gone}\n{}", stack.logs(30));
    }
    // Destroyed means gone from the store too: no record, no stack state.
    if stack.store.get_instance("state", "s").await?.is_some() {
        bail!("delete of {steps} steps succeeded but the instance record is still stored");
    }
    if stack
        .store
        .get_stack("state", &rec.value.identity)
        .await?
        .is_some()
    {
        bail!("delete of {steps} steps succeeded but its stack state is still stored");
    }
    let growth = (after.db_size - before.db_size) as f64;

    let id = |what: &str| format!("state.{steps}.{what}");
    let create_row = Row::value(
        &id("create"),
        &format!("state: create of {steps} resources, end to end"),
        ms(create),
        "ms",
    );
    ctx.report.push(create_row);
    if with_floor {
        // Small enough to sample: `iterations` more creates against as many
        // raw `pulumi up` runs of the same stack.
        let mut samples = Vec::new();
        for n in 0..ctx.params.iterations {
            samples.push(ms(stack.create("state", &format!("r{n}")).await?));
        }
        let raw = raw_floor(ctx, &additional).await?;
        ctx.report.push(
            Row::latency(
                &id("create_p50"),
                &format!("state: create of {steps} resources (p50)"),
                &samples,
            )
            .ratio(p50(&samples) / raw, "raw pulumi up of the same stack (p50)")
            .at_most(Stat::Ratio, MAX_RATIO),
        );
    }
    ctx.report.push(Row::value(
        &id("delete"),
        &format!("state: delete of {steps} resources"),
        ms(delete),
        "ms",
    ));
    ctx.report.push(Row::value(
        &id("state_size"),
        &format!("state: final state of {steps} resources"),
        state_bytes / 1024.0,
        "KiB",
    ));
    ctx.report.push(Row::value(
        &id("object_written"),
        &format!("state: bytes to the object store, {steps}-resource create"),
        object_bytes / 1024.0,
        "KiB",
    ));
    ctx.report.push(
        Row::value(
            &id("etcd_written"),
            &format!("state: state bytes to etcd (pointers), {steps}-resource create"),
            etcd_bytes / 1024.0,
            "KiB",
        )
        .note("a live pointer at the run's first checkpoint, the final one with the record"),
    );
    ctx.report.push(
        Row::value(
            &id("etcd_growth"),
            &format!("state: etcd database growth, {steps}-resource create"),
            growth,
            "B",
        )
        .at_most(Stat::P50, MAX_ETCD_GROWTH)
        .note(format!(
            "db {} -> {} bytes (in use {} -> {})",
            before.db_size, after.db_size, before.db_size_in_use, after.db_size_in_use
        )),
    );
    ctx.report.push(Row::value(
        &id("etcd_peak_rss"),
        &format!("state: etcd peak resident memory, {steps}-resource create and delete"),
        etcd_peak_kib as f64 / 1024.0,
        "MiB",
    ));
    Ok(())
}

/// Runs a write under `Prefer: respond-async` and polls its operation until
/// it ends (a large stack's create or delete outlasts the API's synchronous
/// wait). Returns the wall time and the operation's final body; samples
/// etcd's peak resident memory meanwhile.
async fn operation(
    stack: &Stack,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    etcd_peak_kib: &mut u64,
) -> anyhow::Result<(Duration, Value)> {
    let started = Instant::now();
    let accepted = stack
        .ok(method, path, body, &[("Prefer", "respond-async")])
        .await?;
    let op = accepted["operationId"]
        .as_str()
        .with_context(|| format!("{path}: no operation id in {accepted}"))?
        .to_owned();
    loop {
        if let Some(m) = procfs::memory(stack.etcd.pid()) {
            *etcd_peak_kib = (*etcd_peak_kib).max(m.hwm_kib);
        }
        let body = stack
            .ok(
                reqwest::Method::GET,
                &format!("/api/v1/operation/{op}"),
                None,
                &[],
            )
            .await?;
        if body["state"] != "PENDING" {
            return Ok((started.elapsed(), body));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Median of raw `pulumi up` runs of the same stack.
async fn raw_floor(ctx: &mut Ctx, additional: &Value) -> anyhow::Result<f64> {
    let driver = ctx.driver(ctx.env.cache_dir.clone())?;
    let scenario = driver
        .prepare(&ctx.env.scenarios_dir.join("steps"))
        .await
        .context("compiling the steps example")?;
    let home = ctx.env.cache_dir.join("raw-pulumi-home");
    let additional = additional.to_string();
    let up = || {
        floor::raw_up(
            &ctx.env.pulumi,
            &scenario.binary,
            &home,
            "steps",
            Some(&additional),
        )
    };
    up().await?;
    let mut samples = Vec::new();
    for _ in 0..ctx.params.iterations {
        samples.push(up().await?);
    }
    Ok(p50(&samples))
}

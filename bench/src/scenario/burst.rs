//! A CTF-start burst on one pooled challenge, static pool against adaptive
//! pool (issue: players never wait for Pulumi).
//!
//! `--burst-claims` creates from `--clients` clients, spread evenly over
//! `--burst-secs`, on a challenge whose scenario takes about 2 s to deploy
//! (`steps`: 2 steps of 800 ms), `min: 2`, `max: 60`. Each player keeps
//! its instance `--burst-hold-secs`, then deletes it (so the live instances
//! stay within `max`, as players finishing a challenge do). One fresh stack
//! per mode (2 workers admitting 32 commands each with 4 Pulumi runs at
//! once, the janitor), the same machine, one run each.
//!
//! Reported per mode: the share of creates served from the pool (the
//! workers' `cm_pool_claims_total`), the latency of those (the fastest that
//! many creates: a pool claim is milliseconds, a deploy seconds) and of all
//! creates, the most instances alive at once, the pooled instances left
//! when the burst ends and how long the pool takes to drain back to `min`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::json;

use super::{Ctx, claim::wait_pool};
use crate::{
    report::{Row, Stat},
    scrape,
    stack::{Stack, StackConfig},
    stats::ms,
};

const CHALLENGE: &str = "ctf";
const MIN: usize = 2;
/// Commands each worker admits (`--concurrency`); Pulumi runs are bounded
/// apart, by `--worker-concurrency` (`CM_PULUMI_CONCURRENCY`).
const COMMANDS_PER_WORKER: usize = 32;
const MAX: usize = 60;
/// The targets for the adaptive pool.
const MIN_FROM_POOL_PCT: f64 = 90.0;
const MAX_POOL_CLAIM_P99_MS: f64 = 10.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    for mode in ["static", "adaptive"] {
        one(ctx, mode).await?;
    }
    Ok(())
}

async fn one(ctx: &mut Ctx, mode: &str) -> anyhow::Result<()> {
    let p = ctx.params.clone();
    // Commands admitted freely, Pulumi runs bounded (the configuration a
    // pooled CTF wants: a claim never waits behind deploys); both modes alike.
    let config = StackConfig {
        workers: 2,
        janitor: true,
        worker_concurrency: COMMANDS_PER_WORKER,
        env: vec![
            (
                "CM_PULUMI_CONCURRENCY".into(),
                p.worker_concurrency.to_string(),
            ),
            // A refill may use every Pulumi turn of its worker.
            (
                "CM_REFILL_SLOTS".into(),
                (2 * p.worker_concurrency).to_string(),
            ),
            ("CM_REFILL_BATCH".into(), p.worker_concurrency.to_string()),
        ],
    };
    let stack = Arc::new(Stack::start(&ctx.env, &config).await?);
    stack
        .challenge(json!({
            "id": CHALLENGE, "scenario": "steps", "timeout": "3600s",
            "min": MIN, "max": MAX, "pool": mode,
            "additional": {"steps": "2", "step_ms": "800"},
        }))
        .await?;
    // The first deploy compiles the scenario.
    wait_pool(&stack, CHALLENGE, MIN, Duration::from_secs(300)).await?;
    let before = scrape_workers(&stack).await?;

    let (most_total, sampling) = sample_total(stack.clone());
    let started = Instant::now();
    let spacing = Duration::from_secs_f64(p.burst_secs as f64 / p.burst_claims.max(1) as f64);
    let clients = p.clients.min(p.burst_claims).max(1);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let stack = stack.clone();
        let (claims, hold) = (p.burst_claims, Duration::from_secs(p.burst_hold_secs));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut deletes = Vec::new();
            for i in (c..claims).step_by(clients) {
                tokio::time::sleep_until((started + spacing * i as u32).into()).await;
                let source = format!("player-{i}");
                latencies.push(ms(stack.create(CHALLENGE, &source).await?));
                let stack = stack.clone();
                deletes.push(tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    let path = format!("/api/v1/instance/{CHALLENGE}/{source}");
                    stack.ok(reqwest::Method::DELETE, &path, None, &[]).await
                }));
            }
            for d in deletes {
                d.await.context("a delete task")??;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.context("a client task")??);
    }
    let burst_over = started.elapsed();
    let left_over = pooled(&stack).await?;
    let after = scrape_workers(&stack).await?;
    let served = |how: &str| {
        let labels = [("challenge", CHALLENGE), ("served", how)];
        (scrape::sum(&after, "cm_pool_claims_total", &labels)
            - scrape::sum(&before, "cm_pool_claims_total", &labels))
        .max(0.0) as usize
    };
    let (from_pool, on_demand) = (served("pool"), served("deploy"));

    // Claims stopped: how long until the pool is back at min.
    let drain_started = Instant::now();
    let limit = Duration::from_secs(p.burst_drain_limit_secs);
    let drained = loop {
        if pooled(&stack).await? <= MIN {
            break Some(drain_started.elapsed());
        }
        if drain_started.elapsed() >= limit {
            break None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    sampling.store(true, Ordering::Relaxed);

    let name = |what: &str| format!("burst ({mode}): {what}");
    let id = |what: &str| format!("burst.{mode}.{what}");
    let total = latencies.len().max(1);
    let share = 100.0 * from_pool as f64 / total as f64;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let fastest = &sorted[..from_pool.min(sorted.len())];
    let adaptive = mode == "adaptive";
    let verdict = if share >= MIN_FROM_POOL_PCT {
        "met"
    } else {
        "missed"
    };
    let target = if adaptive {
        format!("target >= {MIN_FROM_POOL_PCT}%: {verdict}; ")
    } else {
        String::new()
    };
    let share_row = Row::value(&id("from_pool"), &name("creates served from the pool"), share, "%")
        .n(total)
        .note(format!(
            "{target}{from_pool} from the pool, {on_demand} deployed on demand (workers' cm_pool_claims_total); {} creates over {}s from {clients} clients took {:.0}s",
            latencies.len(),
            p.burst_secs,
            burst_over.as_secs_f64()
        ));
    ctx.report.push(share_row);
    if !fastest.is_empty() {
        let mut row = Row::latency(
            &id("pool_claims"),
            &name("claim latency, served from the pool"),
            fastest,
        )
        .note("the fastest creates, as many as the pool served");
        if adaptive {
            row = row.at_most(Stat::P99, MAX_POOL_CLAIM_P99_MS);
        }
        ctx.report.push(row);
    }
    ctx.report.push(Row::latency(
        &id("all_claims"),
        &name("create latency, all"),
        &latencies,
    ));
    ctx.report.push(
        Row::value(
            &id("most_instances"),
            &name("most instances alive at once"),
            most_total.load(Ordering::Relaxed) as f64,
            "inst",
        )
        .note("pooled + claimed, sampled every 250 ms; max (60) bounds what refills deploy, not creates on demand (chall-manager's semantics), nor deleted instances whose destroy still waits"),
    );
    ctx.report.push(Row::value(
        &id("left_over"),
        &name("pooled instances left when the burst ends"),
        left_over as f64,
        "inst",
    ));
    let drain_row = match drained {
        Some(d) => Row::value(
            &id("drain"),
            &name("time for the pool to drain back to min"),
            d.as_secs_f64(),
            "s",
        ),
        None => Row::value(
            &id("drain"),
            &name("time for the pool to drain back to min"),
            f64::NAN,
            "s",
        )
        .note(format!("not drained within {}s", limit.as_secs())),
    };
    ctx.report.push(drain_row);
    Ok(())
}

async fn pooled(stack: &Stack) -> anyhow::Result<usize> {
    Ok(stack.store.list_pooled(CHALLENGE).await?.len())
}

/// Every worker's `/metrics`, concatenated (the sums add their series).
async fn scrape_workers(stack: &Stack) -> anyhow::Result<String> {
    let mut all = String::new();
    for w in &stack.workers {
        all.push_str(&scrape::fetch(&stack.http, &w.metrics).await?);
        all.push('\n');
    }
    Ok(all)
}

/// The most instances (pooled and claimed) of the challenge seen at once,
/// sampled every 250 ms until the flag is set.
fn sample_total(stack: Arc<Stack>) -> (Arc<AtomicUsize>, Arc<AtomicBool>) {
    let most = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (m, s) = (most.clone(), stop.clone());
    tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            if let Ok(all) = stack.store.list_instances(CHALLENGE).await {
                m.fetch_max(all.len(), Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    (most, stop)
}

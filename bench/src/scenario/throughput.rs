//! Throughput: `--instances` fresh instances created by `--clients`
//! concurrent clients, with 1 then 2 worker processes (a fresh stack each),
//! in instances per minute. Meanwhile `/proc` is sampled: CPU share of
//! Pulumi (the workers' reaped children) against our processes, nats+etcd,
//! the bench's clients and everything else on the machine, and resident
//! memory of ours against the sum of the Pulumi processes — which is what
//! says whether a second worker can help on this many cores.

use std::time::Instant;

use anyhow::bail;
use futures::StreamExt;
use serde_json::json;

use super::Ctx;
use crate::{
    report::Row,
    sampler::{Load, LoadResult},
    stack::{Stack, StackConfig},
    stats::ms,
};

const KIB_PER_MIB: f64 = 1024.0;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.compiled().await?;
    let mut rates = Vec::new();
    for workers in [1usize, 2] {
        let (rate, load) = phase(ctx, workers).await?;
        rates.push((rate, load.cpu.machine_busy, load.cpu.pulumi));
    }
    if let [(one, busy, pulumi), (two, _, _)] = rates[..] {
        let verdict = if two / one >= 1.5 {
            "a second worker helps: one worker left the machine idle"
        } else if busy >= 85.0 {
            "a second worker cannot help much: with one worker the machine was already busy, mostly running Pulumi"
        } else {
            "a second worker adds little although the machine had idle time: look at the latency rows (queueing in Pulumi or locks)"
        };
        ctx.report.note(format!(
            "throughput: 2 workers give {:.2}x the rate of 1; with 1 worker the machine was {busy:.0}% busy, Pulumi alone {pulumi:.0}% — {verdict}",
            two / one
        ));
    }
    Ok(())
}

/// One phase: a stack with `workers` workers; (instances/min, load).
async fn phase(ctx: &mut Ctx, workers: usize) -> anyhow::Result<(f64, LoadResult)> {
    let p = &ctx.params;
    let config = StackConfig {
        janitor: true,
        ..StackConfig::workers(workers, p.worker_concurrency)
    };
    let stack = Stack::start(&ctx.env, &config).await?;
    stack
        .challenge(json!({"id": "tp", "scenario": super::EXAMPLE, "timeout": "3600s"}))
        .await?;
    // One create per worker first, so each has run Pulumi once.
    for w in 0..workers {
        stack.create("tp", &format!("warm-{w}")).await?;
    }
    let load = Load::start(&stack);
    let started = Instant::now();
    let results: Vec<anyhow::Result<std::time::Duration>> = futures::stream::iter(0..p.instances)
        .map(|n| {
            let stack = &stack;
            async move { stack.create("tp", &format!("c{n}")).await }
        })
        .buffer_unordered(p.clients.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();
    let load = load.finish();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(d) => latencies.push(ms(d)),
            Err(e) => failures.push(e),
        }
    }
    if let Some(e) = failures.first() {
        bail!(
            "{} of {} creates failed with {workers} worker(s); first: {e:#}",
            failures.len(),
            p.instances
        );
    }
    let rate = latencies.len() as f64 / elapsed.as_secs_f64() * 60.0;
    let label = if workers == 1 {
        "1 worker".to_owned()
    } else {
        format!("{workers} workers")
    };
    let id = format!("throughput.w{workers}");
    let mut row = Row::value(
        &id,
        &format!("throughput: creates/min, {label}, {} clients", p.clients),
        rate,
        "inst/min",
    )
    .n(latencies.len())
    .note(format!(
        "{} instances in {:.1} s; worker concurrency {}",
        latencies.len(),
        elapsed.as_secs_f64(),
        p.worker_concurrency
    ));
    if workers > 1
        && let Some(one) = ctx.report.find("throughput.w1").map(|r| r.p50)
    {
        row = row.ratio(rate / one, "1 worker");
    }
    ctx.report.push(row);
    ctx.report.push(Row::latency(
        &format!("{id}.latency"),
        &format!("throughput: create latency under load, {label}"),
        &latencies,
    ));

    let cpu = &load.cpu;
    let per = |secs: f64| secs / latencies.len().max(1) as f64 * 1e3;
    for (key, name, value, note) in [
        (
            "machine",
            "CPU busy, whole machine",
            cpu.machine_busy,
            Some(format!(
                "Pulumi {:.0}% + ours {:.0}% + nats/etcd {:.0}% + bench clients {:.0}% + others {:.0}% (other tenants of the machine)",
                cpu.pulumi, cpu.ours_total, cpu.infra, cpu.bench, cpu.others
            )),
        ),
        (
            "pulumi",
            "CPU Pulumi (workers' children)",
            cpu.pulumi,
            Some(format!("{:.0} ms CPU per instance", per(cpu.pulumi_secs))),
        ),
        (
            "ours",
            "CPU ours (api + workers + janitor)",
            cpu.ours_total,
            Some(format!(
                "{:.1} ms CPU per instance; {}",
                per(cpu.ours_secs),
                cpu.ours
                    .iter()
                    .map(|(n, v)| format!("{n} {v:.1}%"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ),
    ] {
        let mut row = Row::value(
            &format!("{id}.cpu.{key}"),
            &format!("throughput: {name}, {label}"),
            value,
            "% of cores",
        );
        if let Some(note) = note {
            row = row.note(note);
        }
        ctx.report.push(row);
    }

    // Resident memory under load.
    let mut ours_total: Vec<f64> = Vec::new();
    for (name, (samples, hwm)) in &load.rss {
        let mib: Vec<f64> = samples.iter().map(|k| *k as f64 / KIB_PER_MIB).collect();
        for (i, v) in mib.iter().enumerate() {
            match ours_total.get_mut(i) {
                Some(t) => *t += v,
                None => ours_total.push(*v),
            }
        }
        ctx.report.push(
            Row::samples(
                &format!("rss.load.w{workers}.{name}"),
                &format!("rss under load ({label}): {name}"),
                &mib,
                "MiB",
            )
            .note(format!("VmHWM {:.1} MiB", *hwm as f64 / KIB_PER_MIB)),
        );
    }
    let pulumi: Vec<f64> = load
        .pulumi_rss
        .iter()
        .map(|k| *k as f64 / KIB_PER_MIB)
        .collect();
    let pulumi_row = Row::samples(
        &format!("rss.load.w{workers}.pulumi"),
        &format!("rss under load ({label}): Pulumi processes, sum"),
        &pulumi,
        "MiB",
    )
    .note(format!(
        "up to {} Pulumi processes at once (pulumi, language host, program)",
        load.pulumi_max_processes
    ));
    let pulumi_p50 = pulumi_row.p50;
    ctx.report.push(pulumi_row);
    let ours_row = Row::samples(
        &format!("rss.load.w{workers}.ours"),
        &format!("rss under load ({label}): ours, sum"),
        &ours_total,
        "MiB",
    );
    let ratio = ours_row.p50 / pulumi_p50;
    ctx.report
        .push(ours_row.ratio(ratio, "Pulumi processes p50"));
    Ok((rate, load))
}

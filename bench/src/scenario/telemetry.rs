//! What tracing costs: the same stack twice, spans not exported, then every
//! span of the API and the worker exported over OTLP/HTTP to a receiver in
//! this process. Compared: the renew write p50 and the worker's command
//! throughput (`--fast-iterations` challenge creates queued at once, no
//! Pulumi, timed until the consumer has drained them).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use reqwest::Method;
use serde_json::json;

use super::{Ctx, write};
use crate::{
    report::Row,
    stack::{Stack, StackConfig},
    stats::p50,
};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.compiled().await?;
    let sink = otlp_sink().await?;
    let mut base: Option<(f64, f64)> = None;
    for on in [false, true] {
        let mut config = StackConfig::workers(1, ctx.params.worker_concurrency);
        if on {
            config.env = vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), sink.clone()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
            ];
        }
        let stack = Stack::start(&ctx.env, &config).await?;
        let n = ctx.params.fast_iterations;
        write::prepare(&stack).await?;
        let writes = write::timed(&stack, Method::PATCH, &[], n).await?;
        let rate = burst(&stack, n).await?;
        let mode = if on { "on" } else { "off" };
        let label = if on {
            "spans exported (OTLP/HTTP)"
        } else {
            "spans not exported"
        };
        let mut w = Row::latency(
            &format!("telemetry.{mode}.renew"),
            &format!("telemetry {mode}: renew write, {label}"),
            &writes,
        );
        let mut t = Row::value(
            &format!("telemetry.{mode}.commands"),
            &format!("telemetry {mode}: worker commands/s, {label}"),
            rate,
            "cmd/s",
        )
        .n(n);
        match base {
            None => base = Some((p50(&writes), rate)),
            Some((w0, r0)) => {
                let (wr, rr) = (w.p50 / w0, rate / r0);
                w = w.ratio(wr, "off");
                t = t.ratio(rr, "off");
            }
        }
        ctx.report.push(w);
        ctx.report.push(t);
    }
    Ok(())
}

/// `n` challenge creates accepted at once (`Prefer: respond-async`), timed
/// until the workers' consumer has drained them; commands per second.
async fn burst(stack: &Stack, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut requests = futures::stream::iter(0..n)
        .map(|i| async move {
            let body = json!({"id": format!("t{i}"), "scenario": super::EXAMPLE});
            stack
                .call(
                    Method::POST,
                    "/api/v1/challenge",
                    Some(&body),
                    &[("Prefer", "respond-async")],
                )
                .await
        })
        .buffer_unordered(32);
    while let Some(r) = requests.next().await {
        let (status, body) = r?;
        if status != 202 {
            bail!("an async challenge create answered {status}: {body}");
        }
    }
    let drained = cm_testkit::wait::drained(
        &stack.nats.url,
        Duration::from_millis(20),
        Duration::from_secs(600),
    )
    .await?;
    if !drained {
        bail!("the queue did not drain\n{}", stack.logs(15));
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// An OTLP/HTTP receiver that accepts and drops everything; its base URL.
async fn otlp_sink() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the OTLP receiver")?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(|| async { "" }))
        .route("/v1/metrics", axum::routing::post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

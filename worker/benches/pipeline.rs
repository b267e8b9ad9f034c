//! Bench of the command pipeline's own overhead (no Pulumi in the measured
//! path): real nats-server and etcd, the API and one worker in-process.
//!
//! `cargo bench -p cm-worker --bench pipeline` (`CM_BENCH_ITERS`, default 500).
//! - read: `GET /api/v1/instance/{c}/{s}` (one etcd read);
//! - write: `PATCH /api/v1/instance/{c}/{s}` (renew): API validation, pending
//!   operation record, JetStream publish + ack, worker consume, two locks,
//!   reads and a guarded write in etcd, operation record, result event,
//!   reply routed back to the waiting request. No Pulumi run.
//!
//! Telemetry cost: the bench runs twice, as two processes — tracing off
//! (logs and metrics, no span export), then tracing on with every span exported over
//! OTLP/HTTP to a receiver inside the bench — and prints both tables and the
//! ratio of the write p50s.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} {:>6} {:>9.2}ms {:>9.2}ms {:>9.2}ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

/// An OTLP/HTTP endpoint that accepts and drops spans.
async fn otlp_sink() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::main]
async fn main() {
    let tracing_on = std::env::var("CM_BENCH_TRACING").is_ok_and(|v| v == "on");
    if std::env::var_os("CM_BENCH_CHILD").is_none() {
        // Parent: run both configurations as children, then compare.
        let exe = std::env::current_exe().expect("bench binary");
        let mut p50 = Vec::new();
        let mut throughput = Vec::new();
        for mode in ["off", "on"] {
            let out = std::process::Command::new(&exe)
                .env("CM_BENCH_CHILD", "1")
                .env("CM_BENCH_TRACING", mode)
                .output()
                .expect("bench child");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            print!("{text}");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let write_p50 = text
                .lines()
                .find(|l| l.starts_with("write: PATCH"))
                .and_then(|l| l.split_whitespace().nth(7))
                .and_then(|v| v.trim_end_matches("ms").parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            p50.push(write_p50);
            throughput.push(
                text.lines()
                    .find(|l| l.starts_with("worker throughput"))
                    .and_then(|l| l.split(" = ").nth(1))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN),
            );
        }
        println!();
        println!(
            "telemetry cost: write p50 {:.2} ms with tracing exported vs {:.2} ms without ({:+.1}%)",
            p50[1],
            p50[0],
            (p50[1] / p50[0] - 1.0) * 100.0
        );
        println!(
            "telemetry cost: worker throughput {:.0}/s with tracing exported vs {:.0}/s without ({:+.1}%)",
            throughput[1],
            throughput[0],
            (throughput[1] / throughput[0] - 1.0) * 100.0
        );
        return;
    }
    let _telemetry = if tracing_on {
        let sink = otlp_sink().await;
        let provider =
            cm_core::telemetry::otlp_provider_to("cm-bench", "http/protobuf", Some(&sink))
                .expect("otlp");
        Some(cm_core::telemetry::install("cm-bench", Some(provider)))
    } else {
        // Same logging, no span export.
        Some(cm_core::telemetry::install("cm-bench", None))
    };
    let iters: usize = std::env::var("CM_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let nats = cm_testkit::server::nats();
    let etcd = cm_testkit::server::etcd();
    let (_cache_guard, cache) = cm_testkit::worker_cache();
    let worker = support::worker_config(&nats.url, &etcd.url, cache.clone());
    tokio::spawn(cm_worker::run(worker, std::future::pending()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let api = support::api_config(&nats.url, &etcd.url);
    tokio::spawn(cm_api::run(api, listener, std::future::pending()));
    let http = reqwest::Client::new();
    support::wait_healthy(&http, &base).await;
    let ok = |r: reqwest::Response| {
        assert!(r.status().is_success(), "{}", r.status());
    };
    ok(http
        .post(format!("{base}/api/v1/challenge"))
        .json(&json!({"id": "bench", "scenario": "identity", "timeout": "3600s"}))
        .send()
        .await
        .expect("challenge"));
    ok(http
        .post(format!("{base}/api/v1/instance"))
        .json(&json!({"challengeId": "bench", "sourceId": "s"}))
        .send()
        .await
        .expect("instance"));

    let url = format!("{base}/api/v1/instance/bench/s");
    let mut reads = Vec::with_capacity(iters);
    for _ in 0..iters {
        let started = Instant::now();
        ok(http.get(&url).send().await.expect("read"));
        reads.push(started.elapsed());
    }
    let mut writes = Vec::with_capacity(iters);
    for _ in 0..iters {
        let started = Instant::now();
        ok(http.patch(&url).send().await.expect("renew"));
        writes.push(started.elapsed());
    }
    let mut accepted = Vec::with_capacity(iters);
    for _ in 0..iters {
        let started = Instant::now();
        ok(http
            .patch(&url)
            .header("Prefer", "respond-async")
            .send()
            .await
            .expect("renew async"));
        accepted.push(started.elapsed());
    }
    println!();
    println!(
        "tracing: {}",
        if tracing_on {
            "on (OTLP/HTTP export of every span)"
        } else {
            "off"
        }
    );
    println!(
        "Pipeline overhead bench ({iters} sequential requests each, 1 worker in-process, no Pulumi)"
    );
    println!(
        "{:<44} {:>6} {:>11} {:>11} {:>11}",
        "request", "n", "p50", "p99", "max"
    );
    row("read: GET instance (etcd read)", reads);
    row("write: PATCH instance (renew, full pipeline)", writes);
    row("write accepted: PATCH + Prefer: respond-async", accepted);

    // Worker throughput: commands queued at once (challenge creates, no
    // Pulumi run), timed until the consumer has none left.
    let burst = iters;
    let started = Instant::now();
    let mut requests = futures::stream::iter(0..burst)
        .map(|n| {
            http.post(format!("{base}/api/v1/challenge"))
                .header("Prefer", "respond-async")
                .json(&json!({"id": format!("t{n}"), "scenario": "identity"}))
                .send()
        })
        .buffer_unordered(32);
    while let Some(r) = requests.next().await {
        assert_eq!(r.expect("queue").status(), 202);
    }
    assert!(
        support::wait_drained(
            &nats.url,
            Duration::from_millis(20),
            Duration::from_secs(600)
        )
        .await,
        "the queue never drained"
    );
    let elapsed = started.elapsed();
    println!(
        "worker throughput: {burst} commands in {:.2} s = {:.0} commands/s (1 worker, concurrency 4)",
        elapsed.as_secs_f64(),
        burst as f64 / elapsed.as_secs_f64()
    );
    println!("reproduce: cargo bench -p cm-worker --bench pipeline (CM_BENCH_ITERS={iters})");
}

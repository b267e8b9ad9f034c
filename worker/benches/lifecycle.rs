//! Bench of the instance lifecycle features: the janitor's tick cost as the
//! store grows (1k, 10k, 100k instances, 10 expired) and the latency of a
//! pool claim end to end.
//!
//! `cargo bench -p cm-worker --bench lifecycle` (`CM_BENCH_POOL`, default 30
//! pooled instances claimed). Real nats-server and etcd; API and one worker
//! in-process.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime};

use cm_core::{
    Identity,
    model::{InstanceRecord, InstanceStatus, to_timestamp},
    queue::QueueConfig,
    store::{Expect, Store, StoreOptions},
};
use futures::StreamExt;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn seed(store: &Store, from: usize, to: usize, expired: usize) {
    let now = SystemTime::now();
    futures::stream::iter(from..to)
        .map(|n| {
            let until = if n < expired {
                now - Duration::from_secs(60)
            } else {
                now + Duration::from_secs(86_400)
            };
            let rec = InstanceRecord {
                challenge_id: format!("bench-{}", n % 100),
                identity: Identity::random(),
                source_id: Some(format!("team-{n}")),
                status: InstanceStatus::Ready,
                since: to_timestamp(now),
                last_renew: to_timestamp(now),
                until: Some(to_timestamp(until)),
                connection_info: "nc host 1".into(),
                flags: vec![],
                additional: Default::default(),
                command_id: "seed".into(),
            };
            async move {
                store
                    .put_instance(&rec, None, Expect::Any, None)
                    .await
                    .expect("seed")
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
}

#[tokio::main]
async fn main() {
    let nats = cm_testkit::server::nats();
    let etcd = cm_testkit::server::etcd();
    let store = Store::connect(
        std::slice::from_ref(&etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    let client = async_nats::connect(nats.url.as_str()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    cm_core::queue::ensure_streams(&js, &QueueConfig::default())
        .await
        .expect("streams");
    let janitor = cm_janitor::Janitor::new(store.clone(), js, 1000);

    println!();
    println!("Janitor tick (collect expired + publish 10 expiry commands), 20 ticks each");
    println!(
        "{:>10} {:>9} {:>11} {:>11}",
        "stored", "expired", "p50", "p99"
    );
    let mut seeded = 0;
    for total in [1_000usize, 10_000, 100_000] {
        seed(&store, seeded, total, 10).await;
        seeded = total;
        let mut samples = Vec::new();
        for _ in 0..20 {
            let started = Instant::now();
            let expired = janitor
                .collect(&to_timestamp(SystemTime::now()))
                .await
                .expect("collect");
            assert_eq!(expired.len(), 10);
            janitor.publish(expired).await.expect("publish");
            samples.push(started.elapsed());
        }
        samples.sort();
        println!(
            "{total:>10} {:>9} {:>9.2}ms {:>9.2}ms",
            10,
            ms(percentile(&samples, 0.5)),
            ms(percentile(&samples, 0.99))
        );
    }

    // Pool claims, end to end through the API.
    let pool: usize = std::env::var("CM_BENCH_POOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let (_cache_guard, cache) = cm_testkit::worker_cache();
    let nats2 = cm_testkit::server::nats();
    let etcd2 = cm_testkit::server::etcd();
    let worker = support::worker_config(&nats2.url, &etcd2.url, cache.clone());
    tokio::spawn(cm_worker::run(worker, std::future::pending()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let api = support::api_config(&nats2.url, &etcd2.url);
    tokio::spawn(cm_api::run(api, listener, std::future::pending()));
    let http = reqwest::Client::new();
    support::wait_healthy(&http, &base).await;
    let store2 = Store::connect(
        std::slice::from_ref(&etcd2.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    let resp = http
        .post(format!("{base}/api/v1/challenge"))
        .json(&json!({"id": "pool", "scenario": "identity", "min": pool, "max": 0}))
        .send()
        .await
        .expect("challenge");
    assert!(resp.status().is_success());
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ready = store2
            .list_pooled("pool")
            .await
            .expect("store")
            .iter()
            .filter(|v| v.value.status == InstanceStatus::Ready)
            .count();
        if ready >= pool {
            break;
        }
        assert!(Instant::now() < deadline, "pool not filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut claims = Vec::new();
    for n in 0..pool {
        let started = Instant::now();
        let resp = http
            .post(format!("{base}/api/v1/instance"))
            .json(&json!({"challengeId": "pool", "sourceId": format!("p{n}")}))
            .send()
            .await
            .expect("claim");
        assert!(resp.status().is_success(), "{}", resp.status());
        claims.push(started.elapsed());
    }
    claims.sort();
    println!();
    println!(
        "Pool claim end to end (POST /api/v1/instance on a ready pool; the refill runs meanwhile)"
    );
    println!(
        "claims: {:>4}  p50 {:>7.2}ms  p99 {:>7.2}ms  max {:>7.2}ms",
        claims.len(),
        ms(percentile(&claims, 0.5)),
        ms(percentile(&claims, 0.99)),
        ms(*claims.last().unwrap_or(&Duration::ZERO))
    );
    println!("reproduce: cargo bench -p cm-worker --bench lifecycle (CM_BENCH_POOL={pool})");
}

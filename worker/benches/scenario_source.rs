//! Bench: creating an instance from a cold scenario cache vs a warm one, per
//! scenario source, end to end through the API (real nats-server, etcd,
//! `docker-registry`, pulumi; API and worker in-process).
//!
//! `cargo bench -p cm-worker --bench scenario_source` (`CM_BENCH_ITERS`,
//! default 3). Sources: a directory under `--scenarios-dir`, the same Go
//! source pushed to the registry, chall-manager's prebuilt layout (a `main`
//! built with `go build` + `Pulumi.yaml` with `runtime.options.binary`), and
//! an archive uploaded to the object store. Each iteration starts a worker on
//! an empty cache and times two instance creates: the first (cold: fetch,
//! verify, compile unless prebuilt, `pulumi up`) and the second (warm: the
//! tag re-resolved at the registry, content and build cached, `pulumi up`).
//! Go's own build cache stays warm across iterations, as on a real worker.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use cm_core::oci::{self, Client, ClientConfig, Reference};
use serde_json::json;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

type Worker = (
    tempfile::TempDir,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), cm_worker::WorkerError>>,
);

/// An in-process worker on an empty cache, reaching `registry` over HTTP.
fn start_worker(nats: &str, etcd: &str, registry: &str) -> Worker {
    let cache = tempfile::tempdir().expect("tempdir");
    let mut config = support::worker_config(nats, etcd, cache.path().to_owned());
    config.oci.insecure_registries = vec![registry.to_owned()];
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(cm_worker::run(config, async {
        let _ = rx.await;
    }));
    (cache, tx, task)
}

/// Waits until a worker consumes: a renew of nothing goes through the worker
/// without Pulumi and answers 404.
async fn ready(http: &reqwest::Client, base: &str) {
    let r = http
        .patch(format!("{base}/api/v1/instance/none/none"))
        .send()
        .await
        .expect("probe");
    assert_eq!(r.status(), 404);
}

#[tokio::main]
async fn main() {
    let iters: usize = std::env::var("CM_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let registry = cm_testkit::registry::start();
    let client = Client::new(ClientConfig {
        insecure_registries: vec![registry.host.clone()],
        ..ClientConfig::default()
    });
    let identity = cm_testkit::example("identity");
    let source_ref = Reference::parse(&registry.reference("bench/identity:v1")).expect("ref");
    oci::push(&client, &identity, &source_ref)
        .await
        .expect("push source");
    let prebuilt_dir = tempfile::tempdir().expect("tempdir");
    let built = std::process::Command::new(cm_testkit::go())
        .args(["build", "-trimpath", "-o"])
        .arg(prebuilt_dir.path().join("main"))
        .arg(".")
        .current_dir(&identity)
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0")
        .status()
        .expect("go build");
    assert!(built.success());
    std::fs::write(
        prebuilt_dir.path().join("Pulumi.yaml"),
        "name: identity\nruntime:\n  name: go\n  options:\n    binary: ./main\n",
    )
    .expect("Pulumi.yaml");
    let binary_size = std::fs::metadata(prebuilt_dir.path().join("main"))
        .expect("main")
        .len();
    let prebuilt_ref = Reference::parse(&registry.reference("bench/prebuilt:v1")).expect("ref");
    oci::push(&client, prebuilt_dir.path(), &prebuilt_ref)
        .await
        .expect("push prebuilt");

    let nats = cm_testkit::server::nats();
    let etcd = cm_testkit::server::etcd();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut api = support::api_config(&nats.url, &etcd.url);
    api.oci.insecure_registries = vec![registry.host.clone()];
    tokio::spawn(cm_api::run(api, listener, std::future::pending()));
    let http = reqwest::Client::new();
    support::wait_healthy(&http, &base).await;

    let archive = cm_core::archive::pack_dir(&identity).expect("pack");
    let uploaded: serde_json::Value = http
        .post(format!("{base}/api/v1/scenario"))
        .body(archive)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    let object_ref = uploaded["scenario"].as_str().expect("reference").to_owned();

    let sources = [
        ("directory (examples/identity)", "identity".to_owned()),
        ("OCI, Go source", source_ref.to_string()),
        ("OCI, prebuilt main + Pulumi.yaml", prebuilt_ref.to_string()),
        ("object store upload (tar.gz)", object_ref),
    ];
    // The challenges are registered by a worker whose cache is then dropped.
    let (setup_cache, stop, task) = start_worker(&nats.url, &etcd.url, &registry.host);
    for (n, (_, scenario)) in sources.iter().enumerate() {
        let r = http
            .post(format!("{base}/api/v1/challenge"))
            .json(&json!({"id": format!("c{n}"), "scenario": scenario, "timeout": "3600s"}))
            .send()
            .await
            .expect("challenge");
        assert!(r.status().is_success(), "{scenario}: {}", r.status());
    }
    let _ = stop.send(());
    let _ = task.await;
    drop(setup_cache);

    let mut results = Vec::new();
    for (n, (name, _)) in sources.iter().enumerate() {
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for i in 0..iters {
            let (cache, stop, task) = start_worker(&nats.url, &etcd.url, &registry.host);
            ready(&http, &base).await;
            for (source, samples) in [("cold", &mut cold), ("warm", &mut warm)] {
                let started = Instant::now();
                let r = http
                    .post(format!("{base}/api/v1/instance"))
                    .json(&json!({"challengeId": format!("c{n}"), "sourceId": format!("{source}-{i}")}))
                    .send()
                    .await
                    .expect("instance");
                assert!(r.status().is_success(), "{name}: {}", r.status());
                samples.push(started.elapsed());
            }
            let _ = stop.send(());
            let _ = task.await;
            drop(cache);
        }
        results.push((name, median(cold), median(warm)));
    }

    println!();
    println!(
        "Instance create, cold vs warm scenario cache (median of {iters}; 1 worker in-process, 2 cores; prebuilt main {:.1} MB)",
        binary_size as f64 / 1e6
    );
    println!(
        "{:<36} {:>12} {:>12} {:>8}",
        "source", "cold", "warm", "cold/warm"
    );
    for (name, cold, warm) in results {
        println!(
            "{name:<36} {:>10.0}ms {:>10.0}ms {:>8.2}",
            ms(cold),
            ms(warm),
            cold.as_secs_f64() / warm.as_secs_f64()
        );
    }
    println!(
        "reproduce: cargo bench -p cm-worker --bench scenario_source (CM_BENCH_ITERS={iters})"
    );
}

//! The queue-lag alert end to end: a real Prometheus scrapes the queue
//! exporter; with no worker running and commands queued, the oldest-pending
//! age rises and the alert fires; once a worker runs, it resolves.

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn alert_state(http: &reqwest::Client, prometheus: &str) -> Option<String> {
    let body: Value = http
        .get(format!("{prometheus}/api/v1/alerts"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["data"]["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == "CmQueueOldestPendingTooOld")
        .and_then(|a| a["state"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_lag_alert_fires_without_workers_and_resolves_with_them() {
    let mut stack = Stack::start(0).await;
    let dir = tempfile::tempdir().expect("tempdir");

    let exporter_port = cm_testkit::server::free_port();
    let _exporter = Killed(
        Command::new(env!("CARGO_BIN_EXE_cm-worker"))
            .arg("queue-exporter")
            .env("CM_NATS_URL", &stack.nats.url)
            .env("CM_ETCD_ENDPOINTS", &stack.etcd.url)
            .env("CM_METRICS_LISTEN", format!("127.0.0.1:{exporter_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("queue exporter"),
    );

    // The alert as shipped, with test-sized thresholds and hold time.
    std::fs::write(
        dir.path().join("rules.yml"),
        "groups:\n- name: test\n  interval: 1s\n  rules:\n  - alert: CmQueueOldestPendingTooOld\n    \
         expr: max(cm_queue_oldest_pending_age_seconds{stream=\"CM_COMMANDS\"}) > 3\n    for: 2s\n",
    )
    .expect("rules");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\n\
             scrape_configs:\n- job_name: cm-worker\n  static_configs:\n  - targets: ['127.0.0.1:{exporter_port}']\n"
        ),
    )
    .expect("config");
    let prom_port = cm_testkit::server::free_port();
    let _prometheus = Killed(
        Command::new(cm_testkit::server::require("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );
    let prometheus = format!("http://127.0.0.1:{prom_port}");

    // No worker: queue commands without waiting for them.
    for n in 0..3 {
        let (status, body) = stack
            .call_with(
                Method::POST,
                "/api/v1/challenge",
                Some(json!({"id": format!("lag-{n}"), "scenario": "identity"})),
                &[("Prefer", "respond-async")],
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if alert_state(&stack.http, &prometheus).await.as_deref() == Some("firing") {
            break;
        }
        assert!(Instant::now() < deadline, "the queue-lag alert never fired");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A worker drains the queue: the alert resolves.
    stack.spawn_worker();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if alert_state(&stack.http, &prometheus).await.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alert never resolved\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        stack
            .store
            .get_challenge("lag-2")
            .await
            .expect("store")
            .is_some(),
        "the queued commands ran"
    );
}

//! The on-call path end to end: the shipped alert rules in a real
//! Prometheus scraping a real worker and the queue-lag exporter, the shipped
//! routing in a real Alertmanager, and a webhook receiver standing in for the
//! pager. When every worker is gone while commands wait, the page
//! (`CmNoWorkerConsuming`, critical) reaches the receiver firing, and
//! resolved once a worker is back and the queue drained. Prints the time to
//! fire and the time to resolve.
//!
//! Only the addresses change from what `deploy/monitoring` ships: the
//! webhook URLs point at the receiver, and Prometheus scrapes and evaluates
//! every second (the rules' `for:` hold times are the shipped ones, so this
//! test takes about six minutes).

mod support;

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use cm_testkit::server::{free_port, require};
use serde_json::{Value, json};

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the receiver got: (when, route path, notification).
type Received = Arc<Mutex<Vec<(Instant, String, Value)>>>;

async fn receive(
    State(received): State<Received>,
    axum::extract::Path(route): axum::extract::Path<String>,
    Json(body): Json<Value>,
) {
    received
        .lock()
        .expect("received")
        .push((Instant::now(), route, body));
}

/// Whether a notification of `route` says `alertname` is `status`.
fn notified(received: &Received, route: &str, alertname: &str, status: &str) -> Option<Instant> {
    received
        .lock()
        .expect("received")
        .iter()
        .find(|(_, r, body)| {
            r == route
                && body["alerts"].as_array().is_some_and(|alerts| {
                    alerts
                        .iter()
                        .any(|a| a["labels"]["alertname"] == alertname && a["status"] == status)
                })
        })
        .map(|(at, _, _)| *at)
}

async fn wait_ready(http: &reqwest::Client, url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} not ready at {url}");
}

fn spawn_worker(stack: &support::Stack, metrics: u16, log: &std::path::Path) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    Proc(
        support::worker_command(&stack.nats.url, &stack.etcd.url)
            .env("CM_METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
            .stderr(log)
            .spawn()
            .expect("spawn cm-worker"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_reaches_the_receiver_when_no_worker_consumes_and_resolves_when_one_returns() {
    let root = cm_testkit::workspace_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();

    // The receiver.
    let received: Received = Arc::default();
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_addr = hook.local_addr().expect("addr");
    let app = Router::new()
        .route("/ctf-instancer/{route}", post(receive))
        .with_state(received.clone());
    tokio::spawn(async move {
        let _ = axum::serve(hook, app).await;
    });

    // The system: no worker in the stack itself; one started here with its
    // /metrics, and the queue-lag exporter.
    let mut stack = support::Stack::start(0).await;
    let worker_metrics = free_port();
    let mut worker = Some(spawn_worker(
        &stack,
        worker_metrics,
        &dir.path().join("worker-0.log"),
    ));
    let exporter_metrics = free_port();
    let _exporter = Proc(
        Command::new(env!("CARGO_BIN_EXE_cm-worker"))
            .args(["--dev", "queue-exporter", "--metrics-listen"])
            .arg(format!("127.0.0.1:{exporter_metrics}"))
            .env("CM_NATS_URL", &stack.nats.url)
            .env("CM_ETCD_ENDPOINTS", &stack.etcd.url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("exporter.log")).expect("log"))
            .spawn()
            .expect("spawn the exporter"),
    );

    // Alertmanager with the shipped routing, the webhooks pointed here.
    let am_port = free_port();
    let shipped = std::fs::read_to_string(root.join("deploy/monitoring/alertmanager.yml"))
        .expect("alertmanager.yml");
    let am_config = shipped.replace(
        "http://alert-webhook.example.invalid",
        &format!("http://{hook_addr}"),
    );
    assert_ne!(am_config, shipped, "the shipped receivers moved");
    std::fs::write(dir.path().join("alertmanager.yml"), am_config).expect("write");
    let _alertmanager = Proc(
        Command::new(require("prometheus-alertmanager"))
            .arg(format!(
                "--config.file={}",
                dir.path().join("alertmanager.yml").display()
            ))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("am").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("alertmanager.log")).expect("log"))
            .spawn()
            .expect("spawn alertmanager"),
    );

    // Prometheus with the shipped rules.
    let prom_port = free_port();
    let rules = ["alerts.yml", "recording.yml", "thresholds.yml"]
        .iter()
        .map(|f| {
            format!(
                "  - {}",
                root.join("deploy/monitoring/rules").join(f).display()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let prom_config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n{rules}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"127.0.0.1:{am_port}\"]\n\
         scrape_configs:\n\
         \x20 - job_name: cm-worker\n    static_configs:\n      - targets: [\"127.0.0.1:{worker_metrics}\"]\n\
         \x20 - job_name: cm-queue-exporter\n    static_configs:\n      - targets: [\"127.0.0.1:{exporter_metrics}\"]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), prom_config).expect("write");
    let _prometheus = Proc(
        Command::new(require("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
            .spawn()
            .expect("spawn prometheus"),
    );
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{am_port}/-/ready"),
        "alertmanager",
    )
    .await;
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{prom_port}/-/ready"),
        "prometheus",
    )
    .await;
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{worker_metrics}/metrics"),
        "the worker's /metrics",
    )
    .await;

    // Normal work first: one instance deployed.
    let (status, body) = stack
        .call(
            reqwest::Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "oncall", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = stack
        .call(
            reqwest::Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "oncall", "sourceId": "p0"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Every worker gone, commands waiting.
    drop(worker.take());
    let outage = Instant::now();
    for i in 1..4 {
        let (status, body) = stack
            .call_with(
                reqwest::Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "oncall", "sourceId": format!("p{i}")})),
                &[("Prefer", "respond-async")],
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let logs = |dir: &std::path::Path| {
        ["prometheus.log", "alertmanager.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {f}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let fired = loop {
        if let Some(at) = notified(&received, "pager", "CmNoWorkerConsuming", "firing") {
            break at;
        }
        assert!(
            outage.elapsed() < Duration::from_secs(420),
            "the page did not reach the receiver within 7 minutes; received: {:?}\n{}",
            received.lock().expect("received"),
            logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let to_fire = fired - outage;

    // A worker back: the queue drains, the page resolves.
    let back = Instant::now();
    worker = Some(spawn_worker(
        &stack,
        worker_metrics,
        &dir.path().join("worker-1.log"),
    ));
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(200),
            Duration::from_secs(120)
        )
        .await,
        "the queue did not drain once a worker was back"
    );
    let resolved = loop {
        if let Some(at) = notified(&received, "pager", "CmNoWorkerConsuming", "resolved") {
            break at;
        }
        assert!(
            back.elapsed() < Duration::from_secs(420),
            "the page was not resolved within 7 minutes; received: {:?}\n{}",
            received.lock().expect("received"),
            logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let to_resolve = resolved - back;
    eprintln!(
        "on-call: CmNoWorkerConsuming reached the pager {to_fire:?} after the last worker died \
         (rule hold 3m, route group_wait 10s), resolved {to_resolve:?} after a worker returned \
         (route group_interval 2m)"
    );
    // What else reached the pager, for the report (the consequences of the
    // outage are inhibited by the page; a whole job down pages on its own).
    let mut paged: Vec<String> = received
        .lock()
        .expect("received")
        .iter()
        .filter(|(_, route, _)| route == "pager")
        .flat_map(|(_, _, body)| {
            body["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|a| {
                    Some(format!(
                        "{} {}",
                        a["labels"]["alertname"].as_str()?,
                        a["status"].as_str()?
                    ))
                })
        })
        .collect();
    paged.sort();
    paged.dedup();
    eprintln!("on-call: the pager received {paged:?}");
    assert!(
        !paged
            .iter()
            .any(|p| p.starts_with("CmQueueOldestPendingTooOld")
                || p.starts_with("CmConsumerStalled")),
        "consequences of the outage paged besides its cause: {paged:?}"
    );
    stack.stop_api().await;
    drop(worker);
}

//! The on-call path for tests: the shipped alert rules in a real Prometheus,
//! the shipped routing in a real Alertmanager, and a webhook receiver
//! standing in for the pager. Only addresses change from what
//! `deploy/monitoring` ships: the webhook URLs point at the receiver, and
//! Prometheus scrapes and evaluates every second (the rules' `for:` hold
//! times are the shipped ones).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use cm_testkit::server::{free_port, require};
use serde_json::Value;

/// A process killed on drop.
pub struct Proc(pub Child);

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

/// Prometheus and Alertmanager running the shipped configuration, and the
/// receiver their pages reach.
pub struct OnCall {
    received: Received,
    dir: PathBuf,
    _prometheus: Proc,
    _alertmanager: Proc,
}

impl OnCall {
    /// Starts the receiver, Alertmanager, and Prometheus scraping `jobs`
    /// (`(job name, "host:port" targets)`) every second; files and logs go
    /// under `dir`. Returns once both answer `/-/ready`.
    pub async fn start(dir: &Path, jobs: &[(&str, Vec<String>)]) -> Self {
        let root = cm_testkit::workspace_root();
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

        let am_port = free_port();
        let shipped = std::fs::read_to_string(root.join("deploy/monitoring/alertmanager.yml"))
            .expect("alertmanager.yml");
        let am_config = shipped.replace(
            "http://alert-webhook.example.invalid",
            &format!("http://{hook_addr}"),
        );
        assert_ne!(am_config, shipped, "the shipped receivers moved");
        std::fs::write(dir.join("alertmanager.yml"), am_config).expect("write");
        let alertmanager = Proc(
            Command::new(require("prometheus-alertmanager"))
                .arg(format!(
                    "--config.file={}",
                    dir.join("alertmanager.yml").display()
                ))
                .arg(format!("--storage.path={}", dir.join("am").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
                .arg("--cluster.listen-address=")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("alertmanager.log")).expect("log"))
                .spawn()
                .expect("spawn alertmanager"),
        );

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
        let scrapes: String = jobs
            .iter()
            .map(|(job, targets)| {
                let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
                format!(
                    "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                    targets.join(", ")
                )
            })
            .collect();
        let prom_config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"127.0.0.1:{am_port}\"]\n\
             scrape_configs:\n{scrapes}"
        );
        std::fs::write(dir.join("prometheus.yml"), prom_config).expect("write");
        let prometheus = Proc(
            Command::new(require("prometheus"))
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
                .spawn()
                .expect("spawn prometheus"),
        );
        let http = reqwest::Client::new();
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
        Self {
            received,
            dir: dir.to_owned(),
            _prometheus: prometheus,
            _alertmanager: alertmanager,
        }
    }

    /// When a notification of `route` said `alertname` was `status`.
    pub fn notified(&self, route: &str, alertname: &str, status: &str) -> Option<Instant> {
        self.received
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

    /// Waits (at most `limit`) until `route` was notified that `alertname`
    /// is `status`; panics with what was received and the services' logs.
    pub async fn wait_notified(
        &self,
        route: &str,
        alertname: &str,
        status: &str,
        limit: Duration,
    ) -> Instant {
        let started = Instant::now();
        loop {
            if let Some(at) = self.notified(route, alertname, status) {
                return at;
            }
            assert!(
                started.elapsed() < limit,
                "{alertname} {status} did not reach {route} within {limit:?}; received: {:?}\n{}",
                self.received.lock().expect("received"),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `alertname status` of every alert notified on `route`, sorted, once each.
    pub fn paged(&self, route: &str) -> Vec<String> {
        let mut paged: Vec<String> = self
            .received
            .lock()
            .expect("received")
            .iter()
            .filter(|(_, r, _)| r == route)
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
        paged
    }

    fn logs(&self) -> String {
        ["prometheus.log", "alertmanager.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {f}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Waits until `url` answers 2xx (60 s at most).
pub async fn wait_ready(http: &reqwest::Client, url: &str, what: &str) {
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

/// The queue-lag exporter (`cm-worker queue-exporter`) on `metrics_port`.
pub fn queue_exporter(nats_url: &str, etcd: &str, metrics_port: u16, log: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_cm-worker"))
            .args(["--dev", "queue-exporter", "--metrics-listen"])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("CM_NATS_URL", nats_url)
            .env("CM_ETCD_ENDPOINTS", etcd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("spawn the exporter"),
    )
}

//! The real system for `cmctl`'s tests: nats-server and etcd processes (from
//! cm-testkit), the API and workers in-process (their libraries' `run`, as
//! their binaries call it), and the built `cmctl` binary run as a process.

#![allow(dead_code)]

use std::{path::PathBuf, sync::OnceLock, time::Duration};

use cm_core::{
    queue::QueueConfig,
    store::{Store, StoreOptions},
};
use cm_testkit::server::{self, Server};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};

pub const PASSPHRASE: &str = "cmctl-test-passphrase";

/// A compiled-scenario cache shared by every test of this binary.
fn shared_cache() -> PathBuf {
    static CACHE: OnceLock<(Option<tempfile::TempDir>, PathBuf)> = OnceLock::new();
    CACHE.get_or_init(cm_testkit::worker_cache).1.clone()
}

/// Tunables of a test stack.
#[derive(Debug, Clone)]
pub struct Options {
    /// The command stream's de-duplication window (set when the API creates it).
    pub duplicate_window: Duration,
    /// Deliveries before a command is dead-lettered.
    pub max_deliver: i64,
    /// How long a worker waits for a lock before the command is retried.
    pub lock_timeout: Duration,
    /// Registries (`host:port`) the API and workers reach over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// A bearer token the API requires (open when `None`).
    pub api_token: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(120),
            max_deliver: 5,
            lock_timeout: Duration::from_secs(60),
            insecure_registries: Vec::new(),
            api_token: None,
        }
    }
}

/// One `cmctl` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout as the one JSON document `--output json` promises.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts success.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "cmctl failed: {self:#?}");
        self
    }

    /// Asserts exit code `code` and a one-line error on stderr.
    pub fn fails(self, code: i32) -> Self {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "errors are one line: {self:#?}"
        );
        assert!(self.stderr.starts_with("error: "), "{self:#?}");
        self
    }
}

pub struct Stack {
    pub nats: Server,
    pub etcd: Server,
    pub api: String,
    pub store: Store,
    options: Options,
    api_stop: Option<oneshot::Sender<()>>,
    workers: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Stack {
    /// nats + etcd + API + `workers` workers.
    pub async fn start(workers: usize, options: Options) -> Self {
        let nats = server::nats();
        let etcd = server::etcd();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let api = format!("http://{}", listener.local_addr().expect("addr"));
        let config = cm_api::ApiConfig {
            connection: cm_core::config::Connection {
                nats_url: nats.url.clone(),
                etcd_endpoints: vec![etcd.url.clone()],
                etcd_root: "/cm".into(),
                store: StoreOptions::default(),
                queue: queue_config(&options),
                nats: Default::default(),
            },
            result_timeout: Duration::from_secs(120),
            nats_service: false,
            oci: cm_core::oci::ClientConfig {
                insecure_registries: options.insecure_registries.clone(),
                ..Default::default()
            },
            max_upload: cm_api::DEFAULT_MAX_UPLOAD,
            auth: match &options.api_token {
                Some(token) => {
                    cm_api::auth::ApiAuth::tokens([&cm_core::Secret::new(token.clone())])
                        .expect("token")
                }
                None => cm_api::auth::ApiAuth::open(),
            },
            tls: None,
            metrics_listen: None,
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = cm_api::run(config, listener, shutdown).await {
                panic!("API failed: {e}");
            }
        });
        let store = Store::connect(
            std::slice::from_ref(&etcd.url),
            "/cm",
            &StoreOptions::default(),
        )
        .await
        .expect("store");
        let mut stack = Self {
            nats,
            etcd,
            api,
            store,
            options,
            api_stop: Some(tx),
            workers: Vec::new(),
        };
        stack.wait_healthy().await;
        for _ in 0..workers {
            stack.start_worker();
        }
        stack
    }

    /// Starts one more worker (in-process, the library `cm-worker run` calls).
    pub fn start_worker(&mut self) {
        let config = cm_worker::WorkerConfig {
            connection: cm_core::config::Connection {
                nats_url: self.nats.url.clone(),
                etcd_endpoints: vec![self.etcd.url.clone()],
                etcd_root: "/cm".into(),
                store: StoreOptions::default(),
                queue: queue_config(&self.options),
                nats: Default::default(),
            },
            concurrency: 4,
            pulumi_runs: 0,
            scenarios_dir: cm_testkit::workspace_root().join("examples"),
            driver: cm_worker::pulumi::DriverConfig {
                pulumi: cm_testkit::pulumi(),
                go: cm_testkit::go(),
                cache_dir: shared_cache(),
                passphrase: cm_core::Secret::new(PASSPHRASE.into()),
                niceness: cm_worker::pulumi::DEFAULT_NICENESS,
            },
            lock_timeout: self.options.lock_timeout,
            quota: Default::default(),
            lease_ttl: 10,
            checkpoint_interval: std::time::Duration::ZERO,
            shutdown_grace: Duration::from_secs(5),
            metrics_listen: None,
            pools: Default::default(),
            oci: cm_core::oci::ClientConfig {
                insecure_registries: self.options.insecure_registries.clone(),
                ..Default::default()
            },
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = cm_worker::run(config, shutdown).await {
                panic!("worker failed: {e}");
            }
        });
        self.workers.push((tx, task));
    }

    /// Stops every worker gracefully and waits for them.
    pub async fn stop_workers(&mut self) {
        for (tx, task) in self.workers.drain(..) {
            let _ = tx.send(());
            task.await.expect("worker task");
        }
    }

    async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{}/healthcheck", self.api)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("API at {} not healthy", self.api);
    }

    /// Runs the built `cmctl` against this stack.
    pub async fn cmctl(&self, args: &[&str]) -> Run {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cmctl"))
            .args(args)
            .env("CM_API_URL", &self.api)
            .env("CM_NATS_URL", &self.nats.url)
            .env_remove("CMCTL_OUTPUT")
            .env_remove("CMCTL_TIMEOUT")
            .env_remove("CMCTL_SHOW_FLAGS")
            .env_remove("CMCTL_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("run cmctl");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `cmctl` with a pseudo-terminal as stdin/stdout/stderr (util-linux
    /// `script`), returning everything it wrote there.
    pub async fn cmctl_on_tty(&self, args: &[&str]) -> Run {
        let script = server::require("script");
        let quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_cmctl"))
            .chain(args.iter().copied())
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        let out = tokio::process::Command::new(script)
            .args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"])
            .env("CM_API_URL", &self.api)
            .env("CM_NATS_URL", &self.nats.url)
            .env_remove("CMCTL_OUTPUT")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("run script");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn queue_config(options: &Options) -> QueueConfig {
    QueueConfig {
        duplicate_window: options.duplicate_window,
        ack_wait: Duration::from_secs(10),
        max_deliver: options.max_deliver,
        backoff: vec![Duration::from_millis(200)],
        ..QueueConfig::default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (tx, task) in self.workers.drain(..) {
            let _ = tx.send(());
            task.abort();
        }
        if let Some(tx) = self.api_stop.take() {
            let _ = tx.send(());
        }
    }
}

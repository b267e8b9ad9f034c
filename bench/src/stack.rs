//! The real local stack as processes: `nats-server` and `etcd` (from
//! testkit), then `cm-api`, N `cm-worker run` and optionally `cm-janitor`,
//! each its own process so `/proc` can tell its memory and CPU apart.
//!
//! Every service logs to a file in the run's log directory; dropping the
//! stack sends SIGTERM to each (they shut down gracefully), then SIGKILL to
//! whatever is still there after a bound.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use cm_core::store::{Store, StoreOptions};
use cm_testkit::server::{self, Server};
use serde_json::Value;

use crate::{bins::Bins, procfs};

/// Passphrase of the bench's Pulumi stacks (throw-away).
pub const PASSPHRASE: &str = "cm-bench-passphrase";

/// What every stack of a run shares.
#[derive(Debug, Clone)]
pub struct Env {
    pub bins: Bins,
    pub pulumi: PathBuf,
    pub go: PathBuf,
    /// Compiled scenarios and scratch workspaces, shared by the run's workers.
    pub cache_dir: PathBuf,
    pub scenarios_dir: PathBuf,
    /// Where service logs go (one file per process and stack).
    pub logs_dir: PathBuf,
}

/// The shape of one stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub workers: usize,
    pub janitor: bool,
    pub worker_concurrency: usize,
    /// Extra environment for the API and the workers (OTLP export, ...).
    pub env: Vec<(String, String)>,
}

impl StackConfig {
    pub fn workers(workers: usize, worker_concurrency: usize) -> Self {
        Self {
            workers,
            janitor: false,
            worker_concurrency,
            env: Vec::new(),
        }
    }
}

/// One service process.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Base URL of its `/metrics` endpoint.
    pub metrics: String,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmRSS`/`VmHWM` now (`None` once it died).
    pub fn memory(&self) -> Option<procfs::Memory> {
        procfs::memory(self.pid())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    fn reap(&mut self, deadline: Instant) {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(service = %self.name, "did not stop after SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nats, etcd and the service processes.
#[derive(Debug)]
pub struct Stack {
    pub nats: Server,
    pub etcd: Server,
    /// `http://127.0.0.1:port` of the API.
    pub base: String,
    pub http: reqwest::Client,
    pub store: Store,
    pub js: async_nats::jetstream::Context,
    pub api: Service,
    pub workers: Vec<Service>,
    pub janitor: Option<Service>,
}

impl Stack {
    /// Starts everything and waits until the API is healthy and every worker
    /// is pulling from the queue.
    pub async fn start(env: &Env, config: &StackConfig) -> anyhow::Result<Self> {
        let nats = server::nats();
        let etcd = server::etcd();
        static STACKS: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("stack{}", STACKS.fetch_add(1, Ordering::Relaxed));
        let connect = |cmd: &mut Command| {
            cmd.env("CM_NATS_URL", &nats.url)
                .env("CM_ETCD_ENDPOINTS", &etcd.url)
                .env("RUST_LOG", "info")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .env_remove("CM_LOG_FORMAT");
        };
        let port = server::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(&env.bins.api);
        // Loopback only: an open API (`--dev`), as the test stacks run it.
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--dev"]);
        connect(&mut cmd);
        cmd.envs(config.env.iter().map(|(k, v)| (k, v)));
        let api = spawn(cmd, "cm-api", &env.logs_dir, &tag, base.clone())?;

        let mut workers = Vec::new();
        for n in 0..config.workers {
            let metrics = server::free_port();
            let mut cmd = Command::new(&env.bins.worker);
            cmd.arg("run")
                .env("CM_SCENARIOS_DIR", &env.scenarios_dir)
                .env("CM_PULUMI", &env.pulumi)
                .env("CM_GO", &env.go)
                .env("CM_WORKER_CACHE_DIR", &env.cache_dir)
                .env("CM_PULUMI_PASSPHRASE", PASSPHRASE)
                .env(
                    "CM_WORKER_CONCURRENCY",
                    config.worker_concurrency.to_string(),
                )
                .env("CM_METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
                .env("CM_SHUTDOWN_GRACE", "5s");
            connect(&mut cmd);
            cmd.envs(config.env.iter().map(|(k, v)| (k, v)));
            workers.push(spawn(
                cmd,
                &format!("cm-worker-{n}"),
                &env.logs_dir,
                &tag,
                format!("http://127.0.0.1:{metrics}"),
            )?);
        }
        let janitor = if config.janitor {
            let metrics = server::free_port();
            let mut cmd = Command::new(&env.bins.janitor);
            cmd.args(["--interval", "5s"])
                .env("CM_METRICS_LISTEN", format!("127.0.0.1:{metrics}"));
            connect(&mut cmd);
            cmd.envs(config.env.iter().map(|(k, v)| (k, v)));
            Some(spawn(
                cmd,
                "cm-janitor",
                &env.logs_dir,
                &tag,
                format!("http://127.0.0.1:{metrics}"),
            )?)
        } else {
            None
        };

        let store = Store::connect(
            std::slice::from_ref(&etcd.url),
            "/cm",
            &StoreOptions::default(),
        )
        .await
        .context("connecting to etcd")?;
        let client = async_nats::connect(nats.url.as_str())
            .await
            .context("connecting to NATS")?;
        let stack = Self {
            nats,
            etcd,
            base,
            http: reqwest::Client::new(),
            store,
            js: async_nats::jetstream::new(client),
            api,
            workers,
            janitor,
        };
        let ready = async {
            cm_testkit::wait::healthy(&stack.http, &stack.base, Duration::from_secs(30)).await?;
            stack.wait_workers(Duration::from_secs(30)).await
        };
        if let Err(e) = ready.await {
            bail!("{e:#}\n{}", stack.logs(20));
        }
        Ok(stack)
    }

    /// Waits until every worker has a pull request waiting on the consumer.
    async fn wait_workers(&self, limit: Duration) -> anyhow::Result<()> {
        if self.workers.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + limit;
        loop {
            let waiting = async {
                let mut consumer = self
                    .js
                    .get_stream(cm_core::queue::COMMANDS_STREAM)
                    .await
                    .ok()?
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                        cm_core::queue::WORKERS_CONSUMER,
                    )
                    .await
                    .ok()?;
                consumer.info().await.ok().map(|i| i.num_waiting)
            }
            .await
            .unwrap_or(0);
            if waiting >= self.workers.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} of {} workers pulling after {limit:?}",
                    waiting,
                    self.workers.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the workers have acknowledged everything (so their
    /// `/metrics` count every command answered so far).
    pub async fn settle(&self) -> anyhow::Result<()> {
        let drained = cm_testkit::wait::drained(
            &self.nats.url,
            Duration::from_millis(10),
            Duration::from_secs(60),
        )
        .await?;
        if !drained {
            bail!("the workers did not drain the queue\n{}", self.logs(15));
        }
        Ok(())
    }

    /// The API, the workers and the janitor.
    pub fn services(&self) -> Vec<&Service> {
        std::iter::once(&self.api)
            .chain(&self.workers)
            .chain(&self.janitor)
            .collect()
    }

    /// The tail of every service's log, for error messages.
    pub fn logs(&self, lines: usize) -> String {
        self.services()
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.name, s.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `method path` with an optional JSON body: (status, body as JSON or string).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(body);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("requesting {path}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .with_context(|| format!("reading {path}"))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// Like [`Stack::call`], failing unless the status is 2xx.
    pub async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method.clone(), path, body, headers).await?;
        if !(200..300).contains(&status) {
            bail!(
                "{method} {path} answered {status}: {value}\n{}",
                self.logs(15)
            );
        }
        Ok(value)
    }

    /// `POST /api/v1/challenge` with `body`.
    pub async fn challenge(&self, body: Value) -> anyhow::Result<()> {
        self.ok(reqwest::Method::POST, "/api/v1/challenge", Some(&body), &[])
            .await
            .map(drop)
    }

    /// `POST /api/v1/instance` for (`challenge`, `source`), timed.
    pub async fn create(&self, challenge: &str, source: &str) -> anyhow::Result<Duration> {
        let body = serde_json::json!({"challengeId": challenge, "sourceId": source});
        let started = Instant::now();
        self.ok(reqwest::Method::POST, "/api/v1/instance", Some(&body), &[])
            .await?;
        Ok(started.elapsed())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut services: Vec<&mut Service> = std::iter::once(&mut self.api)
            .chain(self.workers.iter_mut())
            .chain(self.janitor.iter_mut())
            .collect();
        for s in services.iter_mut() {
            s.terminate();
        }
        for s in services {
            s.reap(deadline);
        }
    }
}

fn spawn(
    mut cmd: Command,
    name: &str,
    logs: &std::path::Path,
    tag: &str,
    metrics: String,
) -> anyhow::Result<Service> {
    let log = logs.join(format!("{tag}-{name}.log"));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Service {
        name: name.to_owned(),
        child,
        log,
        metrics,
    })
}

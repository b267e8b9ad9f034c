//! The whole system for end-to-end tests: real nats-server and etcd, the API
//! in-process on a free port, and worker **processes** (the real binary).

#![allow(dead_code)]

pub mod oncall;
pub mod services;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use cm_core::store::{Store, StoreOptions};
use cm_testkit::server::{self, Server};
use serde_json::Value;

pub const PASSPHRASE: &str = "e2e-test-passphrase";

/// The configuration of an in-process worker against these servers.
pub fn worker_config(nats: &str, etcd: &str, cache: PathBuf) -> cm_worker::WorkerConfig {
    cm_worker::WorkerConfig {
        connection: cm_core::config::Connection::plain(nats, &[etcd.to_owned()]),
        concurrency: 4,
        pulumi_runs: 0,
        scenarios_dir: cm_testkit::workspace_root().join("examples"),
        oci: Default::default(),
        driver: cm_worker::pulumi::DriverConfig {
            pulumi: cm_testkit::pulumi(),
            go: cm_testkit::go(),
            cache_dir: cache,
            passphrase: cm_core::Secret::new(PASSPHRASE.into()),
            niceness: cm_worker::pulumi::DEFAULT_NICENESS,
        },
        lock_timeout: Duration::from_secs(60),
        quota: Default::default(),
        lease_ttl: 10,
        checkpoint_interval: std::time::Duration::ZERO,
        shutdown_grace: Duration::from_secs(5),
        metrics_listen: None,
        pools: Default::default(),
    }
}

/// `cm-worker run` against these servers (comma-separated URLs for
/// clusters), with the test settings every end-to-end test shares; stdin and
/// stdout closed, stderr left to the caller.
pub fn worker_command(nats_url: &str, etcd_endpoints: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cm-worker"));
    command
        .arg("run")
        .env("CM_NATS_URL", nats_url)
        .env("CM_ETCD_ENDPOINTS", etcd_endpoints)
        .env(
            "CM_SCENARIOS_DIR",
            cm_testkit::workspace_root().join("examples"),
        )
        .env("CM_PULUMI", cm_testkit::pulumi())
        .env("CM_WORKER_CACHE_DIR", shared_cache())
        .env("CM_PULUMI_PASSPHRASE", PASSPHRASE)
        .env("CM_ACK_WAIT", "10s")
        .env("RUST_LOG", "info")
        .env("CM_METRICS_LISTEN", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// An in-process janitor's configuration against this stack: expiry ticks
/// every `interval`, no sweeps, no pool reviews (set them on the result).
pub fn janitor_config(stack: &Stack, interval: Duration) -> cm_janitor::JanitorConfig {
    cm_janitor::JanitorConfig {
        connection: cm_core::config::Connection {
            nats_url: stack.nats.url.clone(),
            nats: Default::default(),
            etcd_endpoints: vec![stack.etcd.url.clone()],
            etcd_root: "/cm".into(),
            store: StoreOptions::default(),
            queue: Default::default(),
        },
        interval,
        once: false,
        batch: 1000,
        metrics_listen: None,
        state_sweep: None,
        orphan_sweep: None,
        pool_review: None,
    }
}

/// The configuration of an in-process API against these servers.
pub fn api_config(nats: &str, etcd: &str) -> cm_api::ApiConfig {
    cm_api::ApiConfig {
        connection: cm_core::config::Connection::plain(nats, &[etcd.to_owned()]),
        result_timeout: Duration::from_secs(120),
        nats_service: true,
        oci: Default::default(),
        max_upload: cm_api::DEFAULT_MAX_UPLOAD,
        auth: cm_api::auth::ApiAuth::open(),
        tls: None,
        metrics_listen: None,
    }
}

/// Waits (polling every `poll`, at most `limit`) until the workers' consumer
/// has nothing pending or unacknowledged; whether it got there.
pub async fn wait_drained(nats_url: &str, poll: Duration, limit: Duration) -> bool {
    cm_testkit::wait::drained(nats_url, poll, limit)
        .await
        .expect("queue state")
}

/// Waits until the API at `base` answers its health check.
pub async fn wait_healthy(http: &reqwest::Client, base: &str) {
    cm_testkit::wait::healthy(http, base, Duration::from_secs(10))
        .await
        .expect("API healthy");
}

/// A compiled-scenario cache shared by every test of this binary.
pub fn shared_cache() -> PathBuf {
    static CACHE: OnceLock<(Option<tempfile::TempDir>, PathBuf)> = OnceLock::new();
    CACHE.get_or_init(cm_testkit::worker_cache).1.clone()
}

pub struct Stack {
    pub nats: Server,
    pub etcd: Server,
    pub api: String,
    pub http: reqwest::Client,
    pub store: Store,
    pub logs: tempfile::TempDir,
    workers: Vec<Child>,
    worker_env: Vec<(String, String)>,
    api_stop: Option<tokio::sync::oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<()>>,
}

impl Stack {
    /// nats + etcd + API (in-process) + `workers` worker processes.
    pub async fn start(workers: usize) -> Self {
        Self::start_with(workers, &[]).await
    }

    /// Same, with extra environment for the workers (`CM_LOCK_TIMEOUT`, ...).
    /// [`Stack::start_with`] with the failpoint `pause:<pause>` armed in
    /// its workers; the directory where the pause announces itself and is
    /// resumed (see [`Stack::wait_paused`] and [`resume`]) lives as long as
    /// the returned `TempDir`.
    pub async fn start_paused(
        workers: usize,
        pause: &str,
        worker_env: &[(&str, &str)],
    ) -> (Self, tempfile::TempDir) {
        Self::start_paused_at(workers, &[pause], worker_env).await
    }

    /// [`Stack::start_paused`] with several pauses armed at once.
    pub async fn start_paused_at(
        workers: usize,
        pauses: &[&str],
        worker_env: &[(&str, &str)],
    ) -> (Self, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_str().expect("utf-8").to_owned();
        let armed = pauses
            .iter()
            .map(|p| format!("pause:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut env = vec![
            ("CM_FAILPOINT", armed.as_str()),
            ("CM_FAILPOINT_DIR", path.as_str()),
        ];
        env.extend_from_slice(worker_env);
        (Self::start_with(workers, &env).await, dir)
    }

    pub async fn start_with(workers: usize, worker_env: &[(&str, &str)]) -> Self {
        Self::start_custom(workers, worker_env, |_| {}).await
    }

    /// Same, with the API's configuration adjusted by `configure`.
    pub async fn start_custom(
        workers: usize,
        worker_env: &[(&str, &str)],
        configure: impl FnOnce(&mut cm_api::ApiConfig),
    ) -> Self {
        let nats = server::nats();
        let etcd = server::etcd();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let api = format!("http://{}", listener.local_addr().expect("addr"));
        let mut config = api_config(&nats.url, &etcd.url);
        configure(&mut config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let api_task = tokio::spawn(async move {
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
            http: reqwest::Client::new(),
            store,
            logs: tempfile::tempdir().expect("tempdir"),
            workers: Vec::new(),
            worker_env: worker_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            api_stop: Some(tx),
            api_task: Some(api_task),
        };
        for _ in 0..workers {
            stack.spawn_worker();
        }
        stack.wait_healthy().await;
        stack
    }

    /// Starts one more worker process.
    pub fn spawn_worker(&mut self) {
        self.spawn_worker_with(&[]);
    }

    /// Starts one more worker process with extra environment (on top of the
    /// stack's), e.g. `CM_FAILPOINT` or a short `CM_LEASE_TTL`.
    pub fn spawn_worker_with(&mut self, extra_env: &[(&str, &str)]) {
        let n = self.workers.len();
        let log =
            std::fs::File::create(self.logs.path().join(format!("worker-{n}.log"))).expect("log");
        let child = worker_command(&self.nats.url, &self.etcd.url)
            .envs(self.worker_env.iter().map(|(k, v)| (k, v)))
            .envs(extra_env.iter().copied())
            .stderr(log)
            .spawn()
            .expect("spawn cm-worker");
        self.workers.push(child);
    }

    /// Kills worker `n` with SIGKILL.
    pub fn kill_worker(&mut self, n: usize) {
        let _ = self.workers[n].kill();
        let _ = self.workers[n].wait();
    }

    /// The process id of worker `n`.
    pub fn worker_pid(&self, n: usize) -> u32 {
        self.workers[n].id()
    }

    /// Whether worker `n` has exited, and how (`None` while it runs).
    pub fn worker_exit(&mut self, n: usize) -> Option<std::process::ExitStatus> {
        self.workers[n].try_wait().ok().flatten()
    }

    /// The stored Pulumi state of a stack, read through its pointer. A
    /// running deploy replaces the object its pointer names (the empty
    /// state recorded before its first run, by its first checkpoint): an
    /// object gone while its pointer moved on is read again through the new
    /// pointer; one gone under an unchanged pointer fails the test.
    pub async fn stack_state_bytes(
        &self,
        cid: &str,
        identity: &cm_core::Identity,
    ) -> Option<Vec<u8>> {
        loop {
            let before = self.store.get_stack(cid, identity).await.expect("store");
            match self.read_stack_state(cid, identity).await? {
                Ok(bytes) => return Some(bytes),
                Err(e) => {
                    let now = self.store.get_stack(cid, identity).await.expect("store");
                    assert_ne!(
                        format!("{before:?}"),
                        format!("{now:?}"),
                        "state object: {e:?}"
                    );
                }
            }
        }
    }

    /// The stored Pulumi state of a stack (`None`: no stack key), or why the
    /// object its pointer names does not read back.
    pub async fn read_stack_state(
        &self,
        cid: &str,
        identity: &cm_core::Identity,
    ) -> Option<Result<Vec<u8>, cm_core::stack_store::StackStoreError>> {
        let stored = self.store.get_stack(cid, identity).await.expect("store")?;
        match stored {
            cm_core::store::StoredStack::Inline(bytes) => Some(Ok(bytes)),
            cm_core::store::StoredStack::Pointer(p) => {
                let nats = async_nats::connect(self.nats.url.as_str())
                    .await
                    .expect("nats");
                let js = async_nats::jetstream::new(nats);
                let states = cm_core::stack_store::StackStore::open(&js, self.store.root())
                    .await
                    .expect("state bucket");
                Some(states.get(&p).await)
            }
        }
    }

    /// The workers' logs, for failure messages.
    pub fn worker_logs(&self) -> String {
        let mut out = String::new();
        for n in 0..self.workers.len() {
            let path = self.logs.path().join(format!("worker-{n}.log"));
            out.push_str(&format!("--- worker {n} ---\n"));
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        out
    }

    async fn wait_healthy(&self) {
        wait_healthy(&self.http, &self.api).await;
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_with(method, path, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.api));
        if let Some(body) = body {
            req = req.json(&body);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// A call that must answer 200 OK: its body (the workers' logs on
    /// failure).
    pub async fn call_ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, body) = self.call(method, path, body).await;
        assert_eq!(status, 200, "{body}\n{}", self.worker_logs());
        body
    }

    /// A raw body (for malformed-input tests).
    pub async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> (u16, String) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.api))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    /// Sends a command with `Prefer: respond-async`: its operation id (the
    /// answer must be 202 Accepted).
    pub async fn submit_async(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> String {
        let (status, body) = self
            .call_with(method, path, body, &[("Prefer", "respond-async")])
            .await;
        assert_eq!(status, 202, "{body}");
        body["operationId"]
            .as_str()
            .expect("operation id")
            .to_owned()
    }

    /// Waits until worker `n` has exited (a failpoint fired); fails after
    /// `limit` with `what` and the workers' logs.
    pub async fn wait_worker_exit(&mut self, n: usize, limit: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.worker_exit(n).is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}\n{}",
                self.worker_logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a worker has stopped at the pause `name`
    /// (`CM_PAUSE_DIR=dir`): the file `<name>.paused` appears.
    pub async fn wait_paused(&self, dir: &std::path::Path, name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !dir.join(format!("{name}.paused")).exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pause {name} was never reached\n{}",
                self.worker_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET /api/v1/operation/{id}` until the operation has ended
    /// (neither pending nor missing); its JSON. Fails after `limit`, with the
    /// workers' logs.
    pub async fn wait_operation(&self, id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (status, body) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/operation/{id}"),
                    None,
                )
                .await;
            if status == 200 && body["state"] != "PENDING" && !body["state"].is_null() {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation {id} not finished after {limit:?}: {status} {body}\n{}",
                self.worker_logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`Stack::wait_operation`], the operation required to have succeeded.
    pub async fn wait_succeeded(&self, id: &str, limit: Duration) -> Value {
        let done = self.wait_operation(id, limit).await;
        assert_eq!(done["state"], "SUCCEEDED", "{done}\n{}", self.worker_logs());
        done
    }

    /// How many events `CM_EVENTS` holds under `subject_filter`.
    pub async fn events(&self, subject_filter: &str) -> usize {
        let client = async_nats::connect(self.nats.url.as_str())
            .await
            .expect("nats");
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(cm_core::queue::EVENTS_STREAM)
            .await
            .expect("events");
        let info = stream
            .info_with_subjects(subject_filter)
            .await
            .expect("subjects");
        use futures::TryStreamExt;
        let subjects: Vec<(String, usize)> = info.try_collect().await.expect("collect");
        subjects.iter().map(|(_, n)| *n).sum()
    }

    /// Revokes the lease of every lock key held now (as etcd does to a
    /// worker paused past its TTL), at least one; returns how many leases.
    pub async fn revoke_lock_leases(&self) -> usize {
        let mut client = self.store.client();
        let locks = client
            .get(
                "/cm/lock/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("locks");
        let leases: std::collections::BTreeSet<i64> =
            locks.kvs().iter().map(|kv| kv.lease()).collect();
        assert!(!leases.is_empty(), "no lock is held");
        for lease in &leases {
            client.lease_revoke(*lease).await.expect("revoke");
        }
        leases.len()
    }

    pub async fn stop_api(&mut self) {
        if let Some(tx) = self.api_stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.api_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some(tx) = self.api_stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Lets a worker stopped at the pause `name` go on.
pub fn resume(dir: &std::path::Path, name: &str) {
    std::fs::write(dir.join(format!("{name}.resume")), b"go").expect("resume file");
}

/// Pulumi processes running for `identity` (its stack name is on their
/// command line).
pub fn pulumi_processes(identity: &cm_core::Identity) -> usize {
    processes()
        .iter()
        .filter(|(_, args)| {
            let text = args.join(" ");
            text.contains("pulumi") && text.contains(identity.as_str())
        })
        .count()
}

/// Every process alive now: its pid and its arguments (`/proc/<pid>/cmdline`;
/// zombies, which have none, are left out).
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() {
            found.push((pid, args));
        }
    }
    found
}

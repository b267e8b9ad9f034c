//! A randomized fault soak on clustered servers, with an invariant checker.
//!
//! Topology: a 3-node nats-server cluster (streams at replicas 3), a
//! 3-member etcd cluster, two APIs and two janitors (in-process), three
//! worker processes and the queue-lag exporter. Clients create, read, renew,
//! reset and delete instances on three challenges (one plain, whose
//! scenario, `tcp-flag`, runs a real TCP service per instance, one pooled
//! whose scenario an admin keeps updating, in place, by recreation or blue/
//! green at random, and whose pool it resizes, one
//! whose short timeout it changes and that the janitors expire), over REST
//! and over the NATS front door, while a nemesis, at random times, kills and
//! restarts workers, APIs, janitors, NATS nodes and etcd members, kills
//! scenarios' `pulumi` runs, revokes a worker's etcd lease, and pauses
//! workers past their lease (SIGSTOP, SIGCONT).
//!
//! Then the on-call path: a real Prometheus (the shipped rules, scraping
//! the workers and the exporter) and a real Alertmanager (the shipped
//! routing, its webhooks pointed at a receiver). Every worker is stopped
//! while commands wait: the page (`CmNoWorkerConsuming`) must reach the
//! receiver firing, and resolved once the workers are back. The report gives
//! the time to fire and to resolve.
//!
//! After the nemesis stops and the system quiesces, the checker reads the
//! store and the history of every request and answer and reports each
//! violation of the invariants (docs/invariants.md):
//! - I1: an identity is pooled or claimed by one source, never both or two;
//!   flags are unique;
//! - I3: every record has its stack state, and that state reads back
//!   whole (its object and every chunk of it are there); no stack state is
//!   left that no record names (the janitor's orphan sweep reclaims them);
//!   every `plain` instance's service answers on its recorded port with its
//!   flag, and no service started during the run is left that no record
//!   names (a leaked server process, a port nothing answers for);
//! - I4: the last answer a client saw stands (an instance created or reset,
//!   and not deleted or expired since, is still there with the same
//!   connection info; one deleted is gone), unless a later request's outcome
//!   is unknown;
//! - I2: no stack has two `pulumi` runs at once (sampled every 100 ms from
//!   the process table while the clients, the nemesis and the on-call phase
//!   run);
//! - I5: the queue is drained and no lock key is left;
//! - no flag of any instance appears in any process's log.
//!
//! Bounded and seeded: `CM_SOAK_SEED` replays a schedule (the seed is
//! printed), `CM_SOAK_DURATION` (default 60s) bounds the faults. The whole
//! history (JSON lines) and every process's log stay under the cargo target
//! tmp directory (`target/tmp/cm-soak-*`, printed at the end).
//!
//! A long run: `CM_SOAK_DURATION=30m cargo test -p cm-worker --test soak -- --nocapture`.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cm_core::{
    stack_store::StackStore,
    store::{Store, StoreOptions, StoredStack},
};
use cm_testkit::cluster::{EtcdCluster, NatsCluster};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

const WORKERS: usize = 3;
const LEASE_TTL: u64 = 4;
const SOURCES: usize = 5;
const CLIENTS: usize = 6;

/// One request and what came back.
#[derive(Debug, Clone, serde::Serialize)]
struct Op {
    at_ms: u128,
    client: usize,
    /// `rest` or `nats` (the front door the request went through).
    via: &'static str,
    kind: &'static str,
    challenge: String,
    source: String,
    /// HTTP status; 0 when no answer came (timeout, connection lost).
    status: u16,
    /// The instance's connection info, when the answer carried one.
    info: Option<String>,
}

impl Op {
    /// Whether the outcome is known (a definite success or refusal).
    fn definite(&self) -> bool {
        matches!(self.status, 200 | 400 | 404 | 409 | 412)
    }
}

#[derive(Debug, Default)]
struct Faults {
    counts: BTreeMap<&'static str, usize>,
}

fn seed() -> u64 {
    std::env::var("CM_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn duration() -> Duration {
    std::env::var("CM_SOAK_DURATION")
        .ok()
        .and_then(|s| humantime::parse_duration(&s).ok())
        .unwrap_or(Duration::from_secs(60))
}

struct Workers {
    children: Vec<Option<Child>>,
    /// Each worker slot's `/metrics` port (kept across restarts: Prometheus
    /// scrapes them).
    metrics: Vec<u16>,
    nats_url: String,
    etcd_endpoints: String,
    logs: std::path::PathBuf,
    started: usize,
}

impl Workers {
    fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.logs.join(format!("worker-{i}-{}.log", self.started)))
            .expect("log");
        self.started += 1;
        let child = support::worker_command(&self.nats_url, &self.etcd_endpoints)
            .env(
                "CM_METRICS_LISTEN",
                format!("127.0.0.1:{}", self.metrics[i]),
            )
            .env("CM_STREAM_REPLICAS", "3")
            .env("CM_LEASE_TTL", LEASE_TTL.to_string())
            .env("CM_LOCK_TIMEOUT", "20s")
            .env("CM_MAX_DELIVER", "8")
            .stderr(log)
            .spawn()
            .expect("spawn cm-worker");
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills (SIGKILL) the `pulumi` processes worker `i` runs; whether there
    /// was one.
    fn kill_pulumi(&self, i: usize) -> bool {
        let Some(c) = &self.children[i] else {
            return false;
        };
        // Its runs are its grandchildren, under their guards.
        let worker = c.id();
        let pids: Vec<String> = support::processes()
            .into_iter()
            .filter(|(pid, args)| {
                std::path::Path::new(&args[0])
                    .file_name()
                    .is_some_and(|f| f == "pulumi")
                    && parent_of(*pid)
                        .is_some_and(|p| p == worker || parent_of(p).is_some_and(|g| g == worker))
            })
            .map(|(pid, _)| pid.to_string())
            .collect();
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .status();
        }
        !pids.is_empty()
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.children[i] {
            let _ = std::process::Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.signal(i, "-CONT");
            self.kill(i);
        }
    }
}

/// The parent process of `pid`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1.to_owned();
    after.split_whitespace().nth(1)?.parse::<u32>().ok()
}

/// The worker of this soak that `pid` (a `pulumi` run) descends from: its
/// parent or grandparent (a run's guard sits between), known by the
/// `/metrics` port in its environment. Other tests' runs on the machine are
/// not this soak's business.
fn worker_of(pid: u32, ports: &[u16]) -> Option<u32> {
    let mut ancestor = pid;
    for _ in 0..2 {
        ancestor = parent_of(ancestor)?;
        let Ok(environ) = std::fs::read(format!("/proc/{ancestor}/environ")) else {
            continue;
        };
        let environ = String::from_utf8_lossy(&environ);
        if ports
            .iter()
            .any(|p| environ.contains(&format!("CM_METRICS_LISTEN=127.0.0.1:{p}\0")))
        {
            return Some(ancestor);
        }
    }
    None
}

/// The `pulumi` runs of this soak's workers alive now: (stack, pid) of every
/// process whose program is `pulumi` and whose arguments name a `--stack`.
fn pulumi_runs(ports: &[u16]) -> Vec<(String, u32)> {
    let mut runs = Vec::new();
    for (pid, args) in support::processes() {
        let is_pulumi = std::path::Path::new(&args[0])
            .file_name()
            .is_some_and(|f| f == "pulumi");
        if !is_pulumi {
            continue;
        }
        if let Some(i) = args.iter().position(|a| a == "--stack")
            && let Some(stack) = args.get(i + 1)
            && worker_of(pid, ports).is_some()
        {
            runs.push((stack.clone(), pid));
        }
    }
    runs
}

/// Up to `max` lines of this soak's logs that name `needle`, each prefixed
/// with its file's name, in file order (the last lines when there are more).
fn log_lines_naming(logs: &std::path::Path, needle: &str, max: usize) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(logs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut found = Vec::new();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
    {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        found.extend(
            text.lines()
                .filter(|l| l.contains(needle))
                .map(|l| format!("{name}: {l}")),
        );
    }
    let skip = found.len().saturating_sub(max);
    found.split_off(skip)
}

/// A sample in which one stack had two `pulumi` runs at once (I2).
#[derive(Debug, Default)]
struct Overlap {
    stack: String,
    /// ms since the soak's start.
    at_ms: u128,
    /// The runs' pids and their workers' pids.
    runs: Vec<(u32, Option<u32>)>,
}

/// A worker the nemesis stopped (SIGSTOP): its pid, from when, until when
/// (ms since the soak's start; `None` while stopped).
type Frozen = Arc<Mutex<Vec<(u32, u128, Option<u128>)>>>;

/// Whether one of an overlap's runs belongs to a worker the nemesis had
/// frozen then (or resumed less than 2 s before): named in the violation,
/// as that is what the guard of Pulumi runs (`worker/src/pulumi/guard.rs`)
/// exists to prevent.
fn frozen_holder(overlap: &Overlap, frozen: &[(u32, u128, Option<u128>)]) -> bool {
    overlap.runs.iter().any(|(_, worker)| {
        frozen.iter().any(|(pid, from, to)| {
            Some(*pid) == *worker
                && *from <= overlap.at_ms
                && to.is_none_or(|to| overlap.at_ms <= to + 2000)
        })
    })
}

/// Samples the `pulumi` runs every 100 ms until `stop`; returns each time
/// one stack had two runs at once (I2), and how many samples saw a run at
/// all (a check that saw none proved nothing).
async fn watch_pulumi_runs(
    start: Instant,
    ports: Vec<u16>,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<Overlap>, usize) {
    let mut seen = Vec::new();
    let mut busy = 0;
    while !stop.is_cancelled() {
        let mut by_stack: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (stack, pid) in pulumi_runs(&ports) {
            by_stack.entry(stack).or_default().push(pid);
        }
        busy += usize::from(!by_stack.is_empty());
        for (stack, pids) in by_stack {
            if pids.len() > 1 {
                seen.push(Overlap {
                    stack,
                    at_ms: start.elapsed().as_millis(),
                    runs: pids.iter().map(|p| (*p, worker_of(*p, &ports))).collect(),
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (seen, busy)
}

/// A janitor in-process; killed by aborting its task.
fn spawn_janitor(config: &cm_janitor::JanitorConfig) -> tokio::task::JoinHandle<()> {
    let config = config.clone();
    tokio::spawn(async move {
        let _ = cm_janitor::run(config, std::future::pending()).await;
    })
}

/// Revokes the etcd lease of one worker's locks, as if etcd had expired it:
/// the worker must notice, stop what it holds and take a new lease. Whether
/// a worker held a lock to revoke.
async fn revoke_a_worker_lease(client: &mut etcd_client::Client, rng: &mut StdRng) -> bool {
    let Ok(resp) = client
        .get(
            "/cm/lock/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
    else {
        return false;
    };
    let mut leases: Vec<i64> = resp
        .kvs()
        .iter()
        .map(|kv| kv.lease())
        .filter(|l| *l != 0)
        .collect();
    leases.sort_unstable();
    leases.dedup();
    if leases.is_empty() {
        return false;
    }
    let lease = leases[rng.gen_range(0..leases.len())];
    client.lease_revoke(lease).await.is_ok()
}

/// An API in-process, on its own listener; killed (its task aborted, every
/// connection dropped) and started again on the same port by the nemesis.
struct ApiServer {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    async fn start(addr: std::net::SocketAddr, config: &cm_api::ApiConfig) -> Self {
        // The port of a killed API may take a moment to be free again.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        let addr = listener.local_addr().expect("addr");
        let config = config.clone();
        // As a supervisor would (systemd, Kubernetes): an API that exits
        // with an error (e.g. JetStream not answering at start while the
        // cluster elects a leader) is started again.
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let l = match listener.take() {
                    Some(l) => l,
                    None => match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                match cm_api::run(config.clone(), l, std::future::pending()).await {
                    Ok(()) => return,
                    Err(e) => eprintln!("soak: an API exited ({e}); starting it again"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Self { addr, task }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request through the NATS front door (`cm.api.<name>`), its status as
/// REST would give it: 200, the service error code, or 0 with no answer.
async fn nats_request(nats: &async_nats::Client, name: &str, body: Value) -> (u16, Option<Value>) {
    let request = async_nats::Request::new()
        .payload(body.to_string().into())
        .timeout(Some(Duration::from_secs(60)));
    match nats.send_request(format!("cm.api.{name}"), request).await {
        Ok(reply) => {
            let code = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
                .and_then(|v| v.as_str().parse::<u16>().ok());
            (
                code.unwrap_or(200),
                serde_json::from_slice(&reply.payload).ok(),
            )
        }
        Err(_) => (0, None),
    }
}

async fn request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, Option<Value>) {
    request_with(http, method, url, body, &[]).await
}

async fn request_with(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Option<Value>) {
    let mut req = http.request(method, url).timeout(Duration::from_secs(60));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.ok())
        }
        Err(_) => (0, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_random_faults_keeps_the_invariants() {
    let seed = seed();
    let limit = duration();
    eprintln!("soak: seed {seed} (CM_SOAK_SEED={seed} replays it), faults for {limit:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    cm_testkit::provider_plugin("localservice");
    // The services deployed during the run, killed when it ends.
    let services = support::services::NewServers::since_now();

    let mut nats = NatsCluster::start(3).await;
    let mut etcd = EtcdCluster::start(3);
    let nats_url = nats.url();
    let logs = tempfile::Builder::new()
        .prefix("cm-soak-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("logs")
        .keep();

    // Two APIs, in-process, on their own listeners.
    let mut api_config = support::api_config(&nats_url, &etcd.urls[0]);
    api_config.connection.etcd_endpoints = etcd.urls.clone();
    api_config.connection.queue.replicas = 3;
    api_config.result_timeout = Duration::from_secs(45);
    let mut api_servers = Vec::new();
    for _ in 0..2 {
        api_servers.push(ApiServer::start("127.0.0.1:0".parse().expect("addr"), &api_config).await);
    }
    let apis: Vec<String> = api_servers
        .iter()
        .map(|a| format!("http://{}", a.addr))
        .collect();
    let mut workers = Workers {
        children: (0..WORKERS).map(|_| None).collect(),
        metrics: (0..WORKERS)
            .map(|_| cm_testkit::server::free_port())
            .collect(),
        nats_url: nats_url.clone(),
        etcd_endpoints: etcd.urls.join(","),
        logs: logs.clone(),
        started: 0,
    };
    for i in 0..WORKERS {
        workers.spawn(i);
    }
    let janitor_config = cm_janitor::JanitorConfig {
        connection: cm_core::config::Connection {
            nats_url: nats_url.clone(),
            nats: Default::default(),
            etcd_endpoints: etcd.urls.clone(),
            etcd_root: "/cm".into(),
            store: StoreOptions::default(),
            queue: cm_core::queue::QueueConfig {
                replicas: 3,
                ..Default::default()
            },
        },
        interval: Duration::from_secs(2),
        once: false,
        batch: 100,
        metrics_listen: None,
        state_sweep: Some(Duration::from_secs(10)),
        orphan_sweep: Some(Duration::from_secs(5)),
        pool_review: None,
    };
    let mut janitors: Vec<tokio::task::JoinHandle<()>> =
        (0..2).map(|_| spawn_janitor(&janitor_config)).collect();
    let exporter_port = cm_testkit::server::free_port();
    let _exporter = support::oncall::queue_exporter(
        &nats_url,
        &etcd.urls.join(","),
        exporter_port,
        &logs.join("exporter.log"),
    );
    let oncall = support::oncall::OnCall::start(
        &logs,
        &[
            (
                "cm-worker",
                workers
                    .metrics
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}"))
                    .collect(),
            ),
            (
                "cm-queue-exporter",
                vec![format!("127.0.0.1:{exporter_port}")],
            ),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    // Under load a clustered start takes a while (streams at replicas 3).
    for api in &apis {
        cm_testkit::wait::healthy(&http, api, Duration::from_secs(60))
            .await
            .expect("API healthy");
    }

    // The challenges.
    let challenges = [
        json!({"id": "plain", "scenario": "tcp-flag"}),
        json!({"id": "pooled", "scenario": "steps", "min": "1", "max": "3",
               "additional": {"steps": "2", "step_ms": "200"}}),
        json!({"id": "short", "scenario": "identity", "timeout": "8s"}),
    ];
    for c in &challenges {
        let (status, body) = request(
            &http,
            reqwest::Method::POST,
            format!("{}/api/v1/challenge", apis[0]),
            Some(c.clone()),
        )
        .await;
        // A first compile of the scenario on a cold cache may outlast the
        // API's wait (504, the operation still running): poll it then.
        let operation = body
            .as_ref()
            .and_then(|b| b["message"].as_str())
            .and_then(|m| m.rsplit_once("/api/v1/operation/"))
            .map(|(_, id)| id.to_owned());
        match (status, operation) {
            (200, _) => {}
            (504, Some(id)) => {
                let deadline = Instant::now() + Duration::from_secs(600);
                loop {
                    let (_, op) = request(
                        &http,
                        reqwest::Method::GET,
                        format!("{}/api/v1/operation/{id}", apis[0]),
                        None,
                    )
                    .await;
                    let state = op.as_ref().and_then(|o| o["state"].as_str()).unwrap_or("");
                    if state == "SUCCEEDED" {
                        break;
                    }
                    assert!(
                        !state.ends_with("FAILED") && Instant::now() < deadline,
                        "registering {c}: {op:?}"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            _ => panic!("registering {c}: {status} {body:?}"),
        }
    }

    // Clients.
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let start = Instant::now();
    let stop_clients = tokio_util::sync::CancellationToken::new();
    let mut client_tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client as u64 + 1));
        let (http, apis, history, stop) = (
            http.clone(),
            apis.clone(),
            history.clone(),
            stop_clients.clone(),
        );
        let nats_client = cm_core::nats::connect(&nats_url, "soak-client", &Default::default())
            .await
            .expect("nats client");
        client_tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                // A third of the instance requests go through the NATS front door.
                let via_nats = rng.gen_range(0..3) == 0;
                let api = &apis[rng.gen_range(0..apis.len())];
                let challenge = ["plain", "pooled", "short"][rng.gen_range(0..3)];
                let source = format!("s{}", rng.gen_range(0..SOURCES));
                let roll = rng.gen_range(0..100);
                let (kind, method, url, body) = match roll {
                    0..40 => (
                        "create",
                        reqwest::Method::POST,
                        format!("{api}/api/v1/instance"),
                        Some(json!({"challengeId": challenge, "sourceId": source})),
                    ),
                    40..60 => (
                        "get",
                        reqwest::Method::GET,
                        format!("{api}/api/v1/instance/{challenge}/{source}"),
                        None,
                    ),
                    60..80 => (
                        "delete",
                        reqwest::Method::DELETE,
                        format!("{api}/api/v1/instance/{challenge}/{source}"),
                        None,
                    ),
                    80..87 => (
                        "renew",
                        reqwest::Method::PATCH,
                        format!("{api}/api/v1/instance/{challenge}/{source}"),
                        Some(json!({})),
                    ),
                    87..90 => (
                        "reset",
                        reqwest::Method::POST,
                        format!("{api}/api/v1/instance/{challenge}/{source}/reset"),
                        None,
                    ),
                    90..93 => {
                        let min = rng.gen_range(0..3);
                        let max = min + rng.gen_range(1..3);
                        (
                            "resize-pool",
                            reqwest::Method::PATCH,
                            format!("{api}/api/v1/challenge/pooled"),
                            Some(json!({"min": min.to_string(), "max": max.to_string(),
                                        "updateMask": "min,max"})),
                        )
                    }
                    93..95 => (
                        "change-timeout",
                        reqwest::Method::PATCH,
                        format!("{api}/api/v1/challenge/short"),
                        Some(json!({"timeout": format!("{}s", rng.gen_range(5..15)),
                                    "updateMask": "timeout"})),
                    ),
                    _ => {
                        let steps = rng.gen_range(2..5).to_string();
                        let strategy =
                            ["update_in_place", "recreate", "blue_green"][rng.gen_range(0..3)];
                        (
                            "update-challenge",
                            reqwest::Method::PATCH,
                            format!("{api}/api/v1/challenge/pooled"),
                            Some(json!({"additional": {"steps": steps, "step_ms": "300"},
                                        "updateStrategy": strategy,
                                        "updateMask": "additional"})),
                        )
                    }
                };
                let nats_name = match kind {
                    "create" => Some("instance.create"),
                    "get" => Some("instance.get"),
                    "delete" => Some("instance.delete"),
                    "renew" => Some("instance.renew"),
                    "reset" => Some("instance.reset"),
                    _ => None,
                };
                let (status, answer) = match nats_name {
                    Some(name) if via_nats => {
                        let key = json!({"challengeId": challenge, "sourceId": source});
                        nats_request(&nats_client, name, key).await
                    }
                    _ => request(&http, method, url, body).await,
                };
                let info = answer
                    .as_ref()
                    .and_then(|a| a.get("connectionInfo"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let (challenge, source) = match kind {
                    "update-challenge" | "resize-pool" => ("pooled".to_owned(), String::new()),
                    "change-timeout" => ("short".to_owned(), String::new()),
                    _ => (challenge.to_owned(), source),
                };
                history.lock().expect("history").push(Op {
                    at_ms: start.elapsed().as_millis(),
                    client,
                    via: if via_nats && nats_name.is_some() {
                        "nats"
                    } else {
                        "rest"
                    },
                    kind,
                    challenge,
                    source,
                    status,
                    info,
                });
                tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
            }
        }));
    }

    // I2, watched while anything runs.
    let frozen: Frozen = Arc::default();
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let run_watch = tokio::spawn(watch_pulumi_runs(
        start,
        workers.metrics.clone(),
        stop_watch.clone(),
    ));

    // The nemesis.
    let mut faults = Faults::default();
    let mut nemesis_etcd = etcd_client::Client::connect(&etcd.urls, None)
        .await
        .expect("etcd");
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2000..5000))).await;
        match rng.gen_range(0..8) {
            0 => {
                let i = rng.gen_range(0..WORKERS);
                workers.kill(i);
                *faults.counts.entry("kill -9 worker").or_default() += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3000))).await;
                workers.spawn(i);
            }
            1 => {
                let i = rng.gen_range(0..3);
                nats.kill(i);
                *faults.counts.entry("kill -9 nats node").or_default() += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..4000))).await;
                nats.start_member(i);
                nats.wait_jetstream().await;
            }
            2 => {
                let i = rng.gen_range(0..3);
                etcd.kill(i);
                *faults.counts.entry("kill -9 etcd member").or_default() += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..4000))).await;
                etcd.start_member(i);
            }
            3 => {
                let i = rng.gen_range(0..api_servers.len());
                let addr = api_servers[i].addr;
                api_servers[i].task.abort();
                *faults.counts.entry("kill an API").or_default() += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3000))).await;
                api_servers[i] = ApiServer::start(addr, &api_config).await;
            }
            6 => {
                let i = rng.gen_range(0..janitors.len());
                janitors[i].abort();
                *faults.counts.entry("kill a janitor").or_default() += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3000))).await;
                janitors[i] = spawn_janitor(&janitor_config);
            }
            7 => {
                if revoke_a_worker_lease(&mut nemesis_etcd, &mut rng).await {
                    *faults.counts.entry("revoke a worker's lease").or_default() += 1;
                }
            }
            4 => {
                // A scenario's pulumi run killed under its worker.
                let i = rng.gen_range(0..WORKERS);
                if workers.kill_pulumi(i) {
                    *faults.counts.entry("kill -9 a pulumi run").or_default() += 1;
                }
            }
            _ => {
                let i = rng.gen_range(0..WORKERS);
                let pid = workers.children[i].as_ref().map(Child::id);
                let from = start.elapsed().as_millis();
                workers.signal(i, "-STOP");
                *faults
                    .counts
                    .entry("SIGSTOP worker past its lease")
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_secs(LEASE_TTL + 2)).await;
                workers.signal(i, "-CONT");
                if let Some(pid) = pid {
                    frozen.lock().expect("frozen").push((
                        pid,
                        from,
                        Some(start.elapsed().as_millis()),
                    ));
                }
            }
        }
    }
    stop_clients.cancel();
    for t in client_tasks {
        let _ = t.await;
    }

    // The on-call path: from a drained queue (the outage, not the faults'
    // backlog, is what pages), every worker gone while commands wait.
    let drained_before_outage = support::wait_drained(
        &nats_url,
        Duration::from_millis(500),
        Duration::from_secs(300),
    )
    .await;
    for i in 0..WORKERS {
        workers.kill(i);
    }
    let outage = Instant::now();
    for i in 0..3 {
        let (status, body) = request_with(
            &http,
            reqwest::Method::POST,
            format!("{}/api/v1/instance", apis[0]),
            Some(json!({"challengeId": "plain", "sourceId": format!("oncall-{i}")})),
            &[("Prefer", "respond-async")],
        )
        .await;
        assert_eq!(status, 202, "{body:?}");
    }
    let fired = oncall
        .wait_notified(
            "pager",
            "CmNoWorkerConsuming",
            "firing",
            Duration::from_secs(420),
        )
        .await;
    let back = Instant::now();
    for i in 0..WORKERS {
        workers.spawn(i);
    }
    let resolved = oncall
        .wait_notified(
            "pager",
            "CmNoWorkerConsuming",
            "resolved",
            Duration::from_secs(420),
        )
        .await;
    let (to_fire, to_resolve) = (fired - outage, resolved - back);
    let paged = oncall.paged("pager");

    // Quiescence: the queue drained, then no lock left once leases of
    // killed holders expired.
    let drained = support::wait_drained(
        &nats_url,
        Duration::from_millis(500),
        Duration::from_secs(300),
    )
    .await;
    let store = Store::connect(&etcd.urls, "/cm", &StoreOptions::default())
        .await
        .expect("store");
    let states = StackStore::open(
        &async_nats::jetstream::new(
            cm_core::nats::connect(&nats_url, "cm-soak-checker", &Default::default())
                .await
                .expect("nats"),
        ),
        "/cm",
    )
    .await
    .expect("the state bucket");
    let mut etcd_client = etcd_client::Client::connect(&etcd.urls, None)
        .await
        .expect("etcd");
    let mut locks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(LEASE_TTL * 3 + 30);
    while Instant::now() < deadline {
        let resp = etcd_client
            .get(
                "/cm/lock/",
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .expect("locks");
        locks = resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        if locks.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // I3: no stack without a record once the janitors' orphan sweep (every
    // 5 s here) and the workers have had their turn.
    let mut orphans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        orphans = store.orphan_stacks().await.expect("orphans");
        if orphans.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for j in &janitors {
        j.abort();
    }

    // The checker.
    stop_watch.cancel();
    let history = history.lock().expect("history").clone();
    let (overlaps, samples_with_runs) = run_watch.await.unwrap_or_default();
    let frozen = frozen.lock().expect("frozen").clone();
    let mut violations: Vec<String> = overlaps
        .iter()
        .map(|o| {
            format!(
                "I2: stack {} had {} pulumi runs at once at {} ms (pid, worker pid: {:?}){}",
                o.stack,
                o.runs.len(),
                o.at_ms,
                o.runs,
                if frozen_holder(o, &frozen) {
                    ", one of them a frozen worker's"
                } else {
                    ""
                }
            )
        })
        .collect();
    if samples_with_runs == 0 {
        violations.push("I2: the sampler never saw a pulumi run of these workers".into());
    }
    if !drained_before_outage {
        violations.push("I5: the commands stream did not drain after the faults".into());
    }
    if !drained {
        violations.push("I5: the commands stream did not drain".into());
    }
    if !locks.is_empty() {
        violations.push(format!("I5: lock keys left: {locks:?}"));
    }
    // Identities an I3 violation names: their log lines are printed with
    // the report (which step removed a state, which run wrote it).
    let mut trail: BTreeSet<String> = BTreeSet::new();
    if !orphans.is_empty() {
        trail.extend(orphans.iter().map(|(_, i)| i.to_string()));
        violations.push(format!(
            "I3: stacks no record names were never reclaimed: {orphans:?}"
        ));
    }
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut flags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut present: BTreeMap<(String, String), String> = BTreeMap::new();
    for cid in ["plain", "pooled", "short"] {
        let records = store.list_instances(cid).await.expect("instances");
        let pooled: BTreeSet<String> = store
            .list_pooled(cid)
            .await
            .expect("pooled")
            .into_iter()
            .map(|v| v.value.identity.to_string())
            .collect();
        for r in &records {
            let who = r.source_id.clone().unwrap_or_else(|| "pool".into());
            owners
                .entry(format!("{cid}/{}", r.identity))
                .or_default()
                .push(who.clone());
            for f in &r.flags {
                flags
                    .entry(f.clone())
                    .or_default()
                    .push(format!("{cid}/{who}"));
            }
            if let Some(sid) = &r.source_id {
                if pooled.contains(&r.identity.to_string()) {
                    violations.push(format!(
                        "I1: {cid}/{} is claimed by {sid} and pooled at once",
                        r.identity
                    ));
                }
                present.insert((cid.to_owned(), sid.clone()), r.connection_info.clone());
            }
            match store.get_stack(cid, &r.identity).await {
                Ok(Some(StoredStack::Pointer(p))) => {
                    if let Err(e) = states.get(&p).await {
                        trail.insert(r.identity.to_string());
                        violations.push(format!(
                            "I3: the stack state of {cid}/{} ({who}) does not read back: {e}",
                            r.identity
                        ));
                    }
                }
                Ok(Some(StoredStack::Inline(_))) => {}
                Ok(None) => violations.push(format!(
                    "I3: {cid}/{} ({who}) has a record but no stack state",
                    r.identity
                )),
                Err(e) => {
                    violations.push(format!("reading the stack of {cid}/{}: {e}", r.identity))
                }
            }
        }
    }
    // I3 on the live side: every `plain` instance's service answers its
    // flag on the recorded port; no service is running that no record names.
    let mut served_ports = BTreeSet::new();
    for r in store.list_instances("plain").await.expect("instances") {
        let who = r.source_id.clone().unwrap_or_else(|| "pool".into());
        let Some(port) = support::services::try_port_of(&r.connection_info) else {
            violations.push(format!(
                "I3: plain/{} ({who}) has no service address: {:?}",
                r.identity, r.connection_info
            ));
            continue;
        };
        served_ports.insert(port);
        match support::services::read_answer(port).await {
            Ok(answer) if r.flags.iter().any(|f| answer == format!("{f}\n")) => {}
            // The answer may be another instance's flag: print its length only.
            Ok(answer) => violations.push(format!(
                "I3: plain/{} ({who}): the service on port {port} answers another text ({} bytes)",
                r.identity,
                answer.len()
            )),
            Err(e) => violations.push(format!(
                "I3: plain/{} ({who}): no service on its port {port}: {e}",
                r.identity
            )),
        }
    }
    // Every running service must be a record's (a create interrupted after
    // its service started is converged before a destroy: see
    // `Driver::destroy_with`).
    for (pid, port) in services.started() {
        if served_ports.contains(&port) {
            continue;
        }
        if let Some(stack) = support::services::owner_stack(pid) {
            trail.insert(stack);
        }
        violations.push(format!(
            "I3: a service (pid {pid}, port {port}) is running that no record names"
        ));
    }
    let (services_recorded, services_running) = (served_ports.len(), services.started().len());
    for (identity, who) in &owners {
        if who.len() > 1 {
            violations.push(format!("I1: {identity} is held by {who:?}"));
        }
    }
    for (flag, who) in &flags {
        if who.len() > 1 {
            violations.push(format!(
                "I1: one flag shared by {who:?} ({} chars)",
                flag.len()
            ));
        }
    }
    // I4, for the challenges nothing expires on: the last definite answer of
    // each (challenge, source) stands unless a later request's outcome is
    // unknown, or a later admin update may have changed the connection info.
    for cid in ["plain", "pooled"] {
        for s in 0..SOURCES {
            let sid = format!("s{s}");
            let ops: Vec<&Op> = history
                .iter()
                .filter(|o| o.challenge == cid && o.source == sid && o.kind != "get")
                .collect();
            let Some(last_definite) = ops.iter().rposition(|o| o.definite()) else {
                continue;
            };
            if ops[last_definite + 1..].iter().any(|o| !o.definite()) {
                continue; // a later outcome is unknown: either state is fine
            }
            let last = ops[last_definite];
            let now = present.get(&(cid.to_owned(), sid.clone()));
            match (last.kind, last.status, now) {
                ("create", 200, None) => violations.push(format!(
                    "I4: {cid}/{sid} was created (op at {} ms, client {}) and never deleted, but is gone",
                    last.at_ms, last.client
                )),
                ("reset", 200, None) => violations.push(format!(
                    "I4: {cid}/{sid} was reset (op at {} ms, client {}) and never deleted, but is gone",
                    last.at_ms, last.client
                )),
                ("reset", 200, Some(info)) if cid == "plain" && last.info.as_deref() != Some(info) => {
                    violations.push(format!(
                        "I4: {cid}/{sid} was reset to {:?} (op at {} ms) but is now {info}",
                        last.info, last.at_ms
                    ))
                }
                ("delete", 200, Some(info)) => violations.push(format!(
                    "I4: {cid}/{sid} was deleted (op at {} ms, client {}) but exists ({info})",
                    last.at_ms, last.client
                )),
                ("create", 200, Some(info)) if cid == "plain" && last.info.as_deref() != Some(info) => {
                    violations.push(format!(
                        "I4: {cid}/{sid} was created as {:?} (op at {} ms) but is now {info}",
                        last.info, last.at_ms
                    ))
                }
                _ => {}
            }
        }
    }

    // No flag in telemetry: the workers' and the exporter's logs (the
    // processes that handle flags log to files here) hold none of them.
    if let Ok(entries) = std::fs::read_dir(&logs) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for (flag, who) in &flags {
                if text.contains(flag.as_str()) {
                    violations.push(format!("a flag of {who:?} is in {}", path.display()));
                }
            }
        }
    }
    // The on-call path: the cause paged, not its consequences (inhibited).
    for p in &paged {
        if p.starts_with("CmQueueOldestPendingTooOld") || p.starts_with("CmConsumerStalled") {
            violations.push(format!("on-call: a consequence of the outage paged: {p}"));
        }
    }

    // The report.
    let history_file = logs.join(format!("history-{seed}.jsonl"));
    let lines: Vec<String> = history
        .iter()
        .filter_map(|o| serde_json::to_string(o).ok())
        .collect();
    std::fs::write(&history_file, lines.join("\n")).expect("history");
    let mut by_kind: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for o in &history {
        *by_kind.entry((o.kind, o.status)).or_default() += 1;
    }
    eprintln!(
        "soak: seed {seed}, {} operations in {:?}",
        history.len(),
        start.elapsed()
    );
    eprintln!("  {:<18} {:>6} {:>6}", "operation", "status", "count");
    for ((kind, status), n) in &by_kind {
        eprintln!("  {kind:<18} {status:>6} {n:>6}");
    }
    eprintln!("  faults injected:");
    for (fault, n) in &faults.counts {
        eprintln!("    {fault:<32} {n}");
    }
    eprintln!(
        "  on-call: CmNoWorkerConsuming paged {to_fire:?} after the last worker died \
         (rule hold 3m, group_wait 10s), resolved {to_resolve:?} after they returned \
         (group_interval 2m); the pager received {paged:?}"
    );
    eprintln!("  I2 sampler: {samples_with_runs} samples (100 ms apart) saw pulumi runs");
    eprintln!(
        "  I2: {} worker freezes past the lease, {} samples with two runs of one stack",
        frozen.len(),
        overlaps.len()
    );
    eprintln!(
        "  I3 services: {services_recorded} recorded by plain instances, {services_running} running"
    );
    eprintln!(
        "  I3: {} destroys ran `up` first to take over an interrupted create",
        log_lines_naming(
            &logs,
            "interrupted while creating: running `up` first",
            usize::MAX
        )
        .len()
    );
    eprintln!("  violations: {}", violations.len());
    for v in &violations {
        eprintln!("    {v}");
    }
    for identity in &trail {
        eprintln!("  log lines naming {identity}:");
        for line in log_lines_naming(&logs, identity, 60) {
            eprintln!("    {line}");
        }
    }
    eprintln!(
        "  history: {}, logs: {}",
        history_file.display(),
        logs.display()
    );

    drop(api_servers);
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
}

//! A randomized fault soak on clustered servers, with an invariant checker.
//!
//! Topology: a 3-node nats-server cluster (streams at replicas 3), a
//! 3-member etcd cluster, two APIs (in-process), three worker processes and
//! a janitor. Clients create, read, renew and delete instances on three
//! challenges (one plain, one pooled whose scenario an admin keeps updating
//! in place, one with a short timeout that the janitor expires), over REST
//! and over the NATS front door, while a nemesis, at random times, kills and
//! restarts workers, APIs, NATS nodes and etcd members, kills scenarios'
//! `pulumi` runs, and pauses workers past their lease (SIGSTOP, SIGCONT).
//!
//! After the nemesis stops and the system quiesces, the checker reads the
//! store and the history of every request and answer and reports each
//! violation of the invariants (docs/invariants.md):
//! - I1: an identity is pooled or claimed by one source, never both or two;
//!   flags are unique;
//! - I3: every record has its stack state;
//! - I4: the last answer a client saw stands (an instance created, and not
//!   deleted or expired since, is still there with the same identity; one
//!   deleted is gone), unless a later request's outcome is unknown;
//! - I5: the queue is drained and no lock key is left.
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

use cm_core::store::{Store, StoreOptions};
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
        let Ok(out) = std::process::Command::new("pgrep")
            .args(["-P", &c.id().to_string(), "-x", "pulumi"])
            .output()
        else {
            return false;
        };
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
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
    let mut req = http.request(method, url).timeout(Duration::from_secs(60));
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
    api_config.etcd_endpoints = etcd.urls.clone();
    api_config.queue.replicas = 3;
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
        nats_url: nats_url.clone(),
        etcd_endpoints: etcd.urls.join(","),
        logs: logs.clone(),
        started: 0,
    };
    for i in 0..WORKERS {
        workers.spawn(i);
    }
    let janitor_stop = tokio_util::sync::CancellationToken::new();
    {
        let config = cm_janitor::JanitorConfig {
            nats_url: nats_url.clone(),
            nats: Default::default(),
            etcd_endpoints: etcd.urls.clone(),
            etcd_root: "/cm".into(),
            store: StoreOptions::default(),
            queue: cm_core::queue::QueueConfig {
                replicas: 3,
                ..Default::default()
            },
            interval: Duration::from_secs(2),
            once: false,
            batch: 100,
            metrics_listen: None,
        };
        let stop = janitor_stop.clone();
        tokio::spawn(async move {
            let _ = cm_janitor::run(config, stop.cancelled_owned()).await;
        });
    }
    let http = reqwest::Client::new();
    // Under load a clustered start takes a while (streams at replicas 3).
    for api in &apis {
        cm_testkit::wait::healthy(&http, api, Duration::from_secs(60))
            .await
            .expect("API healthy");
    }

    // The challenges.
    let challenges = [
        json!({"id": "plain", "scenario": "identity"}),
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
        assert_eq!(status, 200, "registering {c}: {body:?}");
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
                    80..92 => (
                        "renew",
                        reqwest::Method::PATCH,
                        format!("{api}/api/v1/instance/{challenge}/{source}"),
                        Some(json!({})),
                    ),
                    _ => {
                        let steps = rng.gen_range(2..5).to_string();
                        (
                            "update-challenge",
                            reqwest::Method::PATCH,
                            format!("{api}/api/v1/challenge/pooled"),
                            Some(json!({"additional": {"steps": steps, "step_ms": "300"},
                                        "updateStrategy": "update_in_place",
                                        "updateMask": "additional"})),
                        )
                    }
                };
                let nats_name = match kind {
                    "create" => Some("instance.create"),
                    "get" => Some("instance.get"),
                    "delete" => Some("instance.delete"),
                    "renew" => Some("instance.renew"),
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
                let (challenge, source) = if kind == "update-challenge" {
                    ("pooled".to_owned(), String::new())
                } else {
                    (challenge.to_owned(), source)
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

    // The nemesis.
    let mut faults = Faults::default();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2000..5000))).await;
        match rng.gen_range(0..6) {
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
            4 => {
                // A scenario's pulumi run killed under its worker.
                let i = rng.gen_range(0..WORKERS);
                if workers.kill_pulumi(i) {
                    *faults.counts.entry("kill -9 a pulumi run").or_default() += 1;
                }
            }
            _ => {
                let i = rng.gen_range(0..WORKERS);
                workers.signal(i, "-STOP");
                *faults
                    .counts
                    .entry("SIGSTOP worker past its lease")
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_secs(LEASE_TTL + 2)).await;
                workers.signal(i, "-CONT");
            }
        }
    }
    stop_clients.cancel();
    for t in client_tasks {
        let _ = t.await;
    }

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
    janitor_stop.cancel();

    // The checker.
    let history = history.lock().expect("history").clone();
    let mut violations: Vec<String> = Vec::new();
    if !drained {
        violations.push("I5: the commands stream did not drain".into());
    }
    if !locks.is_empty() {
        violations.push(format!("I5: lock keys left: {locks:?}"));
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
                Ok(Some(_)) => {}
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
    eprintln!("  violations: {}", violations.len());
    for v in &violations {
        eprintln!("    {v}");
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

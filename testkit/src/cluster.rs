//! Clustered servers on loopback: a nats-server cluster with JetStream and an
//! etcd cluster, each member its own process and data directory, killed
//! (SIGKILL, as a crash) and started again one by one.
//!
//! Readiness is read from each member's log, as for single servers; a NATS
//! cluster is ready once JetStream has a meta leader (it answers an account
//! info request), an etcd cluster once every member serves.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};

use crate::server::{nats_server, require, tempdir, wait_for_line};

/// A loopback port below the kernel's ephemeral range (32768 and up on
/// Linux), free when picked. Cluster members are started again on the same
/// ports after a kill, and peers are configured with them up front, so a
/// port handed out by the OS (ephemeral) could meanwhile be taken by some
/// outgoing connection; one picked below that range cannot.
fn stable_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let salt = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (salt.wrapping_add(n.wrapping_mul(7919)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range")
}

/// How long a cluster may take to elect its leaders.
const CLUSTER_READY: Duration = Duration::from_secs(60);

/// One member of a cluster: its process (while it runs), its data directory
/// and what starts it again.
#[derive(Debug)]
struct Member {
    child: Option<Child>,
    /// Kept (and removed) with the member: its configuration and data.
    _dir: tempfile::TempDir,
    args: Vec<String>,
    name: String,
}

impl Member {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A nats-server cluster with JetStream, `n` members on loopback.
#[derive(Debug)]
pub struct NatsCluster {
    members: Vec<Member>,
    /// Client port of each member.
    pub ports: Vec<u16>,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.members.iter_mut().for_each(Member::kill);
    }
}

impl NatsCluster {
    /// Starts `n` (at least 3 for JetStream replicas 3) members routed to each
    /// other, and waits until JetStream has a meta leader.
    pub async fn start(n: usize) -> Self {
        let ports: Vec<u16> = (0..n).map(|_| stable_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| stable_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut members = Vec::new();
        for i in 0..n {
            let dir = tempdir("cm-nats-cluster-");
            let name = format!("n{i}");
            let conf = dir.path().join("nats.conf");
            let config = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{ name: cm, listen: \"127.0.0.1:{route}\", routes: [{route_urls}] }}\n",
                port = ports[i],
                store = dir.path().join("js").display(),
                route = routes[i],
            );
            std::fs::write(&conf, config)
                .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
            let args = vec!["-c".to_owned(), conf.to_string_lossy().into_owned()];
            members.push(Member {
                child: None,
                _dir: dir,
                args,
                name,
            });
        }
        let mut cluster = Self { members, ports };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster.wait_jetstream().await;
        cluster
    }

    /// Every member's client URL, comma-separated (what `--nats-url` takes).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server name of member `i` (`n0`, `n1`, ...), as stream infos name
    /// their leader.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// The index of the member named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// Kills member `i` (SIGKILL); its data stays.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Starts member `i` again with its data and waits until it serves
    /// clients (it catches up with the cluster on its own).
    pub fn start_member(&mut self, i: usize) {
        let member = &mut self.members[i];
        member.kill();
        let mut child = Command::new(nats_server())
            .args(&member.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        wait_for_line(&mut child, "nats-server", |line| {
            line.contains("Listening for client connections on")
                .then_some(())
        });
        member.child = Some(child);
    }

    /// Waits until JetStream answers through every running member (a meta
    /// leader is elected and each member knows it).
    pub async fn wait_jetstream(&self) {
        let deadline = Instant::now() + CLUSTER_READY;
        for (i, port) in self.ports.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let url = format!("nats://127.0.0.1:{port}");
            loop {
                // A stream lookup answers "not found" only once the meta
                // leader is known; before, the request fails or times out.
                let last = match async_nats::connect(&url).await {
                    Ok(client) => {
                        let js = async_nats::jetstream::new(client);
                        match js.get_stream("cm-readiness-probe").await {
                            Ok(_) => break,
                            Err(e) => match e.kind() {
                                GetStreamErrorKind::JetStream(err)
                                    if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                                {
                                    break;
                                }
                                _ => e.to_string(),
                            },
                        }
                    }
                    Err(e) => e.to_string(),
                };
                assert!(
                    Instant::now() < deadline,
                    "JetStream of the NATS cluster not ready through {url} within {CLUSTER_READY:?}: {last}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// An etcd cluster, `n` members on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Client URL of each member.
    pub urls: Vec<String>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.members.iter_mut().for_each(Member::kill);
    }
}

impl EtcdCluster {
    /// Starts `n` members (3 survives the loss of one) and waits until each
    /// serves clients.
    pub fn start(n: usize) -> Self {
        let clients: Vec<u16> = (0..n).map(|_| stable_port()).collect();
        let peers: Vec<u16> = (0..n).map(|_| stable_port()).collect();
        let initial = (0..n)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..n {
            let dir = tempdir("cm-etcd-cluster-");
            let client = format!("http://127.0.0.1:{}", clients[i]);
            let peer = format!("http://127.0.0.1:{}", peers[i]);
            let args = vec![
                "--name".to_owned(),
                format!("e{i}"),
                "--data-dir".to_owned(),
                dir.path().join("data").to_string_lossy().into_owned(),
                "--listen-client-urls".to_owned(),
                client.clone(),
                "--advertise-client-urls".to_owned(),
                client,
                "--listen-peer-urls".to_owned(),
                peer.clone(),
                "--initial-advertise-peer-urls".to_owned(),
                peer,
                "--initial-cluster".to_owned(),
                initial.clone(),
                "--initial-cluster-token".to_owned(),
                "cm-test-cluster".to_owned(),
                // Fast elections on loopback (defaults: 100 ms, 1000 ms).
                "--heartbeat-interval".to_owned(),
                "50".to_owned(),
                "--election-timeout".to_owned(),
                "500".to_owned(),
            ];
            members.push(Member {
                child: None,
                _dir: dir,
                args,
                name: format!("e{i}"),
            });
        }
        let urls = clients
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let mut cluster = Self { members, urls };
        // Every member must be running before any can be ready (quorum).
        let mut children = Vec::new();
        for i in 0..n {
            children.push(cluster.spawn(i));
        }
        for (i, mut child) in children.into_iter().enumerate() {
            wait_for_line(&mut child, "etcd", |line| {
                line.contains("ready to serve client requests")
                    .then_some(())
            });
            cluster.members[i].child = Some(child);
        }
        cluster
    }

    fn spawn(&self, i: usize) -> Child {
        Command::new(require("etcd"))
            .args(&self.members[i].args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
    }

    /// The member names (`e0`, ...), as etcd's member list names them.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Kills member `i` (SIGKILL); its data stays.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Starts member `i` again with its data and waits until it serves (the
    /// others must hold a quorum).
    pub fn start_member(&mut self, i: usize) {
        self.members[i].kill();
        let mut child = self.spawn(i);
        wait_for_line(&mut child, "etcd", |line| {
            line.contains("ready to serve client requests")
                .then_some(())
        });
        self.members[i].child = Some(child);
    }

    /// The index of the current leader, asked of the first running member.
    pub async fn leader(&self) -> Option<usize> {
        for (i, url) in self.urls.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let Ok(mut client) = etcd_client::Client::connect([url.as_str()], None).await else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let leader = status.leader();
            let Ok(members) = client.member_list().await else {
                continue;
            };
            let name = members
                .members()
                .iter()
                .find(|m| m.id() == leader)
                .map(|m| m.name().to_owned())?;
            return self.members.iter().position(|m| m.name == name);
        }
        None
    }
}

//! Real `nats-server` and `etcd` processes for tests.
//!
//! Each is started on port 0 where the server supports it, or on a port the
//! OS handed out, and its readiness is read from its own log (the line naming
//! its listen address) rather than waited for with a sleep.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use cm_core::tools;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process killed on drop, with its data directory.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    kind: Kind,
    /// The client URL (`nats://127.0.0.1:port`, `http://127.0.0.1:port`).
    pub url: String,
}

/// What was started, so that it can be started again the same way.
#[derive(Debug, Clone)]
enum Kind {
    Nats {
        port: u16,
    },
    Etcd {
        client: u16,
        peer: u16,
        extra: Vec<String>,
        scheme: &'static str,
    },
    /// Started elsewhere (see [`Server::new`]).
    Other,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Server {
    /// Wraps a started, ready child with its data directory (a server that
    /// [`Server::start`] cannot start again).
    pub fn new(child: Child, dir: tempfile::TempDir, url: String) -> Self {
        Self {
            child: Some(child),
            dir,
            kind: Kind::Other,
            url,
        }
    }

    /// The process id, for tests that stop or kill it (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the server (SIGKILL, as a crash); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data, and
    /// waits until it is ready.
    pub fn start(&mut self) {
        self.stop();
        self.child = Some(match &self.kind {
            Kind::Nats { port } => launch_nats(self.dir.path(), &port.to_string()).0,
            Kind::Etcd {
                client,
                peer,
                extra,
                scheme,
            } => launch_etcd(self.dir.path(), *client, *peer, extra, scheme),
            Kind::Other => panic!("this server cannot be started again"),
        });
    }
}

/// A required program on PATH; panics with the setup command when missing.
pub fn require(name: &'static str) -> std::path::PathBuf {
    tools::on_path(name)
        .unwrap_or_else(|| panic!("this test needs {name} on PATH; {}", tools::SETUP_HINT))
}

/// The `nats-server` the tests run (see `cm_core::tools::find_nats_server`);
/// panics with the setup command when missing.
pub fn nats_server() -> std::path::PathBuf {
    tools::find_nats_server().unwrap_or_else(|e| panic!("this test needs nats-server: {e}"))
}

/// A loopback port the OS just handed out (for servers that cannot bind port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Starts `nats-server -js` on a random loopback port with file storage.
pub fn nats() -> Server {
    nats_configured("", false)
}

/// Starts `nats-server -js` like [`nats`], with `config` (nats-server's
/// configuration syntax: `tls { ... }`, `authorization { ... }`) as its
/// configuration file. With `tls`, the URL is `tls://`.
pub fn nats_configured(config: &str, tls: bool) -> Server {
    let dir = tempdir("cm-nats-");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, config).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    let (child, port) = launch_nats(dir.path(), "-1");
    let scheme = if tls { "tls" } else { "nats" };
    Server {
        child: Some(child),
        dir,
        kind: Kind::Nats { port },
        url: format!("{scheme}://127.0.0.1:{port}"),
    }
}

/// Runs nats-server with `<dir>/nats.conf` and its store in `dir`.
fn launch_nats(dir: &std::path::Path, port: &str) -> (Child, u16) {
    let bin = nats_server();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("nats.conf"))
        .args(["-js", "-a", "127.0.0.1", "-p", port, "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
    // nats-server logs "Listening for client connections on 127.0.0.1:PORT".
    let port = wait_for_line(&mut child, "nats-server", |line| {
        line.split("Listening for client connections on ")
            .nth(1)
            .and_then(|addr| addr.trim().rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
    });
    (child, port)
}

/// etcd with a space quota of `quota_bytes` (`--quota-backend-bytes`), to
/// drive it out of space.
pub fn etcd_with_quota(quota_bytes: u64) -> Server {
    etcd_with(vec![format!("--quota-backend-bytes={quota_bytes}")], "http")
}

/// Starts a single-node `etcd` on loopback ports handed out by the OS.
pub fn etcd() -> Server {
    etcd_with(Vec::new(), "http")
}

/// Starts a single-node `etcd` serving clients over TLS with the
/// certificates of `pki` (URL `https://`). With `client_cert_auth`, clients
/// must present a certificate signed by the CA. `auth_token_ttl`: lifetime
/// in seconds of the simple auth tokens (etcd's default is 300).
pub fn etcd_tls(pki: &crate::pki::Pki, client_cert_auth: bool, auth_token_ttl: u32) -> Server {
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut args = vec![
        "--cert-file".to_owned(),
        path(&pki.server_cert),
        "--key-file".to_owned(),
        path(&pki.server_key),
        "--trusted-ca-file".to_owned(),
        path(&pki.ca),
        "--auth-token-ttl".to_owned(),
        auth_token_ttl.to_string(),
    ];
    if client_cert_auth {
        args.push("--client-cert-auth".to_owned());
    }
    etcd_with(args, "https")
}

fn etcd_with(extra: Vec<String>, scheme: &'static str) -> Server {
    let dir = tempdir("cm-etcd-");
    // The ports are free when picked but may be taken before etcd binds them
    // (tests run in parallel): pick new ones and try again.
    let mut attempts = 0;
    loop {
        let (client, peer) = (free_port(), free_port());
        match try_launch_etcd(dir.path(), client, peer, &extra, scheme) {
            Ok(child) => {
                return Server {
                    child: Some(child),
                    dir,
                    kind: Kind::Etcd {
                        client,
                        peer,
                        extra,
                        scheme,
                    },
                    url: format!("{scheme}://127.0.0.1:{client}"),
                };
            }
            Err(log) if log.contains("address already in use") && attempts < 5 => {
                attempts += 1;
                let _ = std::fs::remove_dir_all(dir.path().join("data"));
            }
            Err(log) => panic!("etcd exited before it was ready:\n{log}"),
        }
    }
}

fn launch_etcd(
    dir: &std::path::Path,
    client: u16,
    peer: u16,
    extra: &[String],
    scheme: &str,
) -> Child {
    try_launch_etcd(dir, client, peer, extra, scheme)
        .unwrap_or_else(|log| panic!("etcd exited before it was ready:\n{log}"))
}

/// Starts etcd and waits until it serves; its log when it exits first.
fn try_launch_etcd(
    dir: &std::path::Path,
    client: u16,
    peer: u16,
    extra: &[String],
    scheme: &str,
) -> Result<Child, String> {
    let bin = require("etcd");
    let client_url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut child = Command::new(bin)
        // The hygiene every shipped deployment has (deploy/, scripts/dev.sh).
        .args([
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--name", "test", "--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    try_wait_for_line(&mut child, "etcd", |line| {
        line.contains("ready to serve client requests")
            .then_some(())
    })?;
    Ok(child)
}

pub(crate) fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// Reads the child's stderr until `probe` finds what it looks for, then keeps
/// draining it in the background so the child never blocks on a full pipe.
pub(crate) fn wait_for_line<T: Send + 'static>(
    child: &mut Child,
    name: &str,
    probe: impl Fn(&str) -> Option<T> + Send + 'static,
) -> T {
    try_wait_for_line(child, name, probe)
        .unwrap_or_else(|log| panic!("{name} exited before it was ready:\n{log}"))
}

/// [`wait_for_line`], answering the child's log when it exits first.
fn try_wait_for_line<T: Send + 'static>(
    child: &mut Child,
    name: &str,
    probe: impl Fn(&str) -> Option<T> + Send + 'static,
) -> Result<T, String> {
    let stderr = child
        .stderr
        .take()
        .unwrap_or_else(|| panic!("{name} has no stderr"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(found) = probe(&line) {
                    let _ = tx.send(Ok(found));
                    sent = true;
                } else {
                    log.push(line);
                }
            }
        }
        if !sent {
            let _ = tx.send(Err(log.join("\n")));
        }
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(result) => result,
        Err(_) => panic!("{name} was not ready within {READY_TIMEOUT:?}"),
    }
}

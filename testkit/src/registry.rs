//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry, `/usr/bin/docker-registry`) with filesystem
//! storage in a per-test directory, on a loopback port it picks itself
//! (`http.addr: 127.0.0.1:0`, read back from its log), plain HTTP, and
//! optionally `htpasswd` (bcrypt) basic authentication.

use std::process::{Command, Stdio};

use crate::server::{self, Server};

/// A running registry, killed on drop.
#[derive(Debug)]
pub struct Registry {
    server: Server,
    /// `127.0.0.1:<port>`: the registry part of references, and the entry
    /// for `--oci-insecure-registries`.
    pub host: String,
    storage: std::path::PathBuf,
}

impl Registry {
    /// `<host>/<repository>` for a reference.
    pub fn reference(&self, repository_and_tag: &str) -> String {
        format!("{}/{repository_and_tag}", self.host)
    }

    /// Where the registry keeps the blob `sha256:<hex>` on disk (for tests
    /// that tamper with stored content).
    pub fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// The registry's base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.server.url
    }
}

/// The `docker-registry` binary; panics with the install hint when missing.
pub fn binary() -> std::path::PathBuf {
    cm_core::tools::on_path("docker-registry")
        .or_else(|| {
            Some(std::path::PathBuf::from("/usr/bin/docker-registry")).filter(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "this test needs the OCI registry /usr/bin/docker-registry (Debian package docker-registry); {}",
                cm_core::tools::SETUP_HINT
            )
        })
}

/// An anonymous registry.
pub fn start() -> Registry {
    launch(None)
}

/// A registry that requires `user`/`password` (basic auth from an htpasswd
/// file with a bcrypt hash, generated here).
pub fn start_with_user(user: &str, password: &str) -> Registry {
    let hash = bcrypt::hash(password, 4)
        .unwrap_or_else(|e| panic!("cannot hash the registry password: {e}"));
    launch(Some(format!("{user}:{hash}\n")))
}

fn launch(htpasswd: Option<String>) -> Registry {
    let bin = binary();
    let dir = server::tempdir("cm-registry-");
    let root = dir.path();
    let auth = match &htpasswd {
        Some(content) => {
            let path = root.join("htpasswd");
            std::fs::write(&path, content)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            format!(
                "auth:\n  htpasswd:\n    realm: cm-test\n    path: {}\n",
                path.display()
            )
        }
        None => String::new(),
    };
    let config = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:0\n  secret: cm-test-registry\n{auth}",
        root.join("data").display()
    );
    let config_path = root.join("config.yml");
    std::fs::write(&config_path, config)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
    let mut child = Command::new(bin)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start docker-registry: {e}"));
    // It logs `listening on 127.0.0.1:PORT`.
    let port = server::wait_for_line(&mut child, "docker-registry", |line| {
        line.split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(['"', ' ']).next())
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
    });
    let host = format!("127.0.0.1:{port}");
    let storage = root.join("data");
    Registry {
        storage,
        server: Server::new(child, dir, format!("http://{host}")),
        host,
    }
}

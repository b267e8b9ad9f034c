//! Finding the external programs the system drives (`pulumi`, `go`) and the
//! servers its tests and benchmarks start (`nats-server`).
//!
//! Order: an explicit path, then `PATH`, then the cache that
//! `scripts/install-pulumi.sh` fills (`$CM_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/ctf-instancer`, else `~/.cache/ctf-instancer`).

use std::path::{Path, PathBuf};

/// The setup command to name when a tool is missing.
pub const SETUP_HINT: &str = "run `scripts/dev.sh install` (it installs etcd, protoc and docker-registry, and builds nats-server and Pulumi)";

/// A required program that could not be found.
#[derive(Debug, thiserror::Error)]
#[error("{tool} not found (looked in: {looked}); {hint}", hint = SETUP_HINT)]
pub struct ToolNotFound {
    /// The program's name.
    pub tool: &'static str,
    /// Where it was looked for.
    pub looked: String,
}

/// Looks `name` up on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The project's cache root.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("CM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("ctf-instancer")
}

/// Finds the `pulumi` CLI that has `pulumi-language-go` beside it.
pub fn find_pulumi(explicit: Option<&Path>) -> Result<PathBuf, ToolNotFound> {
    let mut looked = Vec::new();
    if let Some(p) = explicit {
        if is_executable(p) {
            return Ok(p.to_owned());
        }
        looked.push(p.display().to_string());
    }
    if let Some(p) = on_path("pulumi") {
        return Ok(p);
    }
    looked.push("PATH".into());
    let cache = cache_root().join("pulumi");
    if let Ok(entries) = std::fs::read_dir(&cache) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin/pulumi"))
            .filter(|p| is_executable(p) && is_executable(&p.with_file_name("pulumi-language-go")))
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    looked.push(cache.display().to_string());
    Err(ToolNotFound {
        tool: "pulumi",
        looked: looked.join(", "),
    })
}

/// Finds `nats-server`: `$CM_NATS_SERVER`, then the build
/// `scripts/install-nats.sh` caches (the pinned release, newest first),
/// then `PATH` (a distribution's may be too old: see that script).
pub fn find_nats_server() -> Result<PathBuf, ToolNotFound> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os("CM_NATS_SERVER").map(PathBuf::from) {
        if is_executable(&p) {
            return Ok(p);
        }
        looked.push(p.display().to_string());
    }
    let cache = cache_root().join("nats-server");
    if let Ok(entries) = std::fs::read_dir(&cache) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin/nats-server"))
            .filter(|p| is_executable(p))
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    looked.push(cache.display().to_string());
    if let Some(p) = on_path("nats-server") {
        return Ok(p);
    }
    looked.push("PATH".into());
    Err(ToolNotFound {
        tool: "nats-server",
        looked: looked.join(", "),
    })
}

/// Finds the `go` toolchain.
pub fn find_go(explicit: Option<&Path>) -> Result<PathBuf, ToolNotFound> {
    if let Some(p) = explicit.filter(|p| is_executable(p)) {
        return Ok(p.to_owned());
    }
    on_path("go")
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|p| is_executable(p)))
        .ok_or(ToolNotFound {
            tool: "go",
            looked: "PATH, /usr/local/go/bin".into(),
        })
}

//! Scenarios: a directory holding a Pulumi project (`Pulumi.yaml`) whose
//! runtime is Go, identified by the digest of its content.
//!
//! Preparing a scenario validates its `Pulumi.yaml`, then either compiles the
//! Go program once per digest (`go build`, cached under
//! `<cache>/scenarios/<digest>/main`) or, for chall-manager's prebuilt layout
//! (`runtime.options.binary` naming a file shipped with the scenario), uses the
//! shipped binary as it is. Every later operation runs the prebuilt binary, so
//! no deploy pays for compilation.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use super::DriverError;

/// Largest `Pulumi.yaml` accepted.
const MAX_PROJECT_FILE: u64 = 64 * 1024;

/// A scenario ready to run: validated and compiled.
#[derive(Debug, Clone)]
pub struct PreparedScenario {
    /// `sha256:<hex>` of the scenario's files (paths and contents).
    pub digest: String,
    /// The Pulumi project name (`name` in `Pulumi.yaml`), the config namespace.
    pub project: String,
    /// The executable Pulumi program.
    pub binary: PathBuf,
}

/// The parts of `Pulumi.yaml` the driver needs.
#[derive(Debug, Deserialize)]
struct ProjectFile {
    name: String,
    runtime: Runtime,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Runtime {
    Name(String),
    Detailed {
        name: String,
        #[serde(default)]
        options: BTreeMap<String, serde_yaml::Value>,
    },
}

/// What `Pulumi.yaml` says about how to run the program.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ProjectInfo {
    pub name: String,
    /// `runtime.options.binary`, relative to the scenario directory.
    pub prebuilt_binary: Option<String>,
}

/// Reads and validates `<dir>/Pulumi.yaml` (or `Pulumi.yml`).
pub(crate) async fn read_project(dir: &Path) -> Result<ProjectInfo, DriverError> {
    let path = ["Pulumi.yaml", "Pulumi.yml"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| DriverError::invalid("no Pulumi.yaml at the root of the scenario"))?;
    let len = tokio::fs::metadata(&path)
        .await
        .map_err(DriverError::io("reading", &path))?
        .len();
    if len > MAX_PROJECT_FILE {
        return Err(DriverError::invalid("Pulumi.yaml is larger than 64 KiB"));
    }
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(DriverError::io("reading", &path))?;
    parse_project(&text)
}

fn parse_project(text: &str) -> Result<ProjectInfo, DriverError> {
    let project: ProjectFile = serde_yaml::from_str(text).map_err(|e| {
        DriverError::invalid(format!("Pulumi.yaml is not a valid project file: {e}"))
    })?;
    let valid_name = !project.name.is_empty()
        && project.name.len() <= 100
        && project
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid_name {
        return Err(DriverError::invalid(
            "the project name in Pulumi.yaml must be 1-100 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    let (runtime, options) = match project.runtime {
        Runtime::Name(name) => (name, BTreeMap::new()),
        Runtime::Detailed { name, options } => (name, options),
    };
    if runtime != "go" {
        return Err(DriverError::invalid(format!(
            "runtime {runtime:?} is not supported (supported: go)"
        )));
    }
    let prebuilt_binary = match options.get("binary") {
        None => None,
        Some(serde_yaml::Value::String(b)) if is_safe_relative(b) => Some(b.clone()),
        Some(_) => {
            return Err(DriverError::invalid(
                "runtime.options.binary must be a relative path inside the scenario",
            ));
        }
    };
    Ok(ProjectInfo {
        name: project.name,
        prebuilt_binary,
    })
}

/// A relative path that stays inside its directory.
pub(crate) fn is_safe_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty()
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// `sha256:<hex>` over every regular file under `dir` (sorted relative paths,
/// each followed by its length and content), so that the same files always
/// give the same digest wherever they lie. `.git` is left out.
pub(crate) async fn digest_dir(dir: &Path) -> Result<String, DriverError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || digest_dir_blocking(&dir))
        .await
        .map_err(|e| DriverError::invalid(format!("digest task failed: {e}")))?
}

fn digest_dir_blocking(dir: &Path) -> Result<String, DriverError> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    for rel in &files {
        let path = dir.join(rel);
        let content = std::fs::read(&path).map_err(DriverError::io("reading", &path))?;
        hasher.update(rel.as_bytes());
        hasher.update([0]);
        hasher.update((content.len() as u64).to_be_bytes());
        hasher.update(&content);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), DriverError> {
    let entries = std::fs::read_dir(dir).map_err(DriverError::io("listing", dir))?;
    for entry in entries {
        let entry = entry.map_err(DriverError::io("listing", dir))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(DriverError::io("inspecting", &path))?;
        if entry.file_name() == ".git" {
            continue;
        }
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| DriverError::invalid("file outside the scenario directory"))?;
            let rel = rel
                .to_str()
                .ok_or_else(|| DriverError::invalid("scenario file names must be UTF-8"))?;
            out.push(rel.replace('\\', "/"));
        } else if kind.is_symlink() {
            return Err(DriverError::invalid(format!(
                "symbolic links are not allowed in a scenario ({})",
                path.display()
            )));
        }
    }
    Ok(())
}

/// What `go build` keeps of the worker's environment: where Go and its
/// caches are, how it reaches modules. Nothing else (no credentials of the
/// worker) reaches the toolchain.
const GO_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "GOROOT",
    "GOPATH",
    "GOMODCACHE",
    "GOCACHE",
    "GOENV",
    "GOTMPDIR",
    "GOPROXY",
    "GONOPROXY",
    "GOPRIVATE",
    "GONOSUMDB",
    "GOSUMDB",
    "GOINSECURE",
    "GOAUTH",
    "GOVCS",
    "GOTOOLCHAIN",
    "GOTELEMETRY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Compiles the Go program in `src` into `out` with `go build`.
pub(crate) async fn compile_go(go: &Path, src: &Path, out: &Path) -> Result<(), DriverError> {
    let tmp = out.with_extension("partial");
    let kept = GO_ENV
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|value| (*name, value)));
    let output = Command::new(go)
        .args(["build", "-trimpath", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(src)
        .env_clear()
        .envs(kept)
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| DriverError::EngineUnavailable {
            reason: format!("cannot run the Go toolchain {}: {e}", go.display()),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(DriverError::invalid(format!(
            "the Go program does not compile: {}",
            stderr.trim()
        )));
    }
    tokio::fs::rename(&tmp, out)
        .await
        .map_err(DriverError::io("moving the compiled program to", out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_detailed_go_runtimes() {
        let plain = parse_project("name: identity\nruntime: go\n").expect("plain");
        assert_eq!(
            plain,
            ProjectInfo {
                name: "identity".into(),
                prebuilt_binary: None
            }
        );
        let detailed = parse_project(
            "name: x\nruntime:\n  name: go\n  options:\n    binary: ./main\ndescription: d\n",
        )
        .expect("detailed");
        assert_eq!(detailed.prebuilt_binary.as_deref(), Some("./main"));
    }

    #[test]
    fn refuses_other_runtimes_bad_names_and_escaping_binaries() {
        for (text, expected) in [
            ("name: x\nruntime: nodejs\n", "not supported"),
            ("name: ''\nruntime: go\n", "project name"),
            ("name: 'a/b'\nruntime: go\n", "project name"),
            (
                "name: x\nruntime:\n  name: go\n  options:\n    binary: ../../bin/sh\n",
                "relative path",
            ),
            (
                "name: x\nruntime:\n  name: go\n  options:\n    binary: /bin/sh\n",
                "relative path",
            ),
            ("runtime: go\n", "not a valid project file"),
        ] {
            let err = parse_project(text).expect_err(text);
            assert!(err.to_string().contains(expected), "{text:?} gave {err}");
        }
    }

    #[tokio::test]
    async fn digest_depends_on_content_and_paths_only() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("sub")).expect("mkdir");
            std::fs::write(d.join("Pulumi.yaml"), "name: x\nruntime: go\n").expect("write");
            std::fs::write(d.join("sub/main.go"), "package main\n").expect("write");
        }
        let da = digest_dir(a.path()).await.expect("digest");
        assert_eq!(da, digest_dir(b.path()).await.expect("digest"));
        assert!(da.starts_with("sha256:") && da.len() == 7 + 64);
        std::fs::write(b.path().join("sub/main.go"), "package main // changed\n").expect("write");
        assert_ne!(da, digest_dir(b.path()).await.expect("digest"));
    }
}

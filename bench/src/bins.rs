//! Finding the real `cm-api`, `cm-worker` and `cm-janitor` binaries, built
//! with the same profile as this one.
//!
//! `cargo run -p cm-bench` builds only this package, so binaries lying next
//! to it may be stale (or absent). Unless `--bin-dir` names a directory, the
//! bench asks cargo to build them (a no-op when they are fresh) and takes the
//! paths cargo reports; without cargo or the source tree it falls back to the
//! directory holding this binary.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

pub const API: &str = "cm-api";
pub const WORKER: &str = "cm-worker";
pub const JANITOR: &str = "cm-janitor";

/// Paths of the three service binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    pub api: PathBuf,
    pub worker: PathBuf,
    pub janitor: PathBuf,
    /// How they were found, for the report.
    pub origin: String,
}

impl Bins {
    /// The binaries in `dir`, all of which must exist.
    pub fn in_dir(dir: &Path, origin: &str) -> anyhow::Result<Self> {
        let get = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} is missing; build it with `cargo build --release -p {name}` or pass --bin-dir",
                    p.display()
                )
            }
        };
        Ok(Self {
            api: get(API)?,
            worker: get(WORKER)?,
            janitor: get(JANITOR)?,
            origin: origin.to_owned(),
        })
    }

    /// `--bin-dir` when given; else built by cargo in `workspace` with this
    /// binary's profile; else next to this binary.
    pub fn locate(bin_dir: Option<&Path>, workspace: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = bin_dir {
            return Self::in_dir(dir, &format!("--bin-dir {}", dir.display()));
        }
        let exe = std::env::current_exe().context("locating this binary")?;
        let here = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let release = here.file_name().is_none_or(|n| n != "debug");
        if workspace.join("Cargo.toml").is_file() {
            match cargo_build(workspace, release) {
                Ok(bins) => return Ok(bins),
                Err(e) => {
                    tracing::warn!(error = %e, "cargo could not build the service binaries; looking next to cm-bench")
                }
            }
        }
        Self::in_dir(&here, &format!("next to {}", exe.display()))
    }
}

/// `cargo build [--release] -p cm-api -p cm-worker -p cm-janitor --bins`,
/// reading the executables' paths from cargo's JSON messages.
fn cargo_build(workspace: &Path, release: bool) -> anyhow::Result<Bins> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).arg("build");
    // Under `cargo run`, this process carries the package variables cargo
    // sets for it; build scripts (ring's) watch some of them, so passing
    // them on would rebuild half the dependency tree on every switch
    // between `cargo run` and running the binary directly.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            cmd.env_remove(&name);
        }
    }
    if release {
        cmd.arg("--release");
    }
    cmd.args(["-p", API, "-p", WORKER, "-p", JANITOR, "--bins"])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    tracing::info!(release, "building the service binaries with cargo");
    let mut child = cmd.spawn().context("running cargo")?;
    let stdout = child.stdout.take().context("cargo has no stdout")?;
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        if let Some(pair) = executable(&line) {
            found.push(pair);
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let get = |name: &str| {
        found
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("cargo built no {name} executable"))
    };
    Ok(Bins {
        api: get(API)?,
        worker: get(WORKER)?,
        janitor: get(JANITOR)?,
        origin: format!(
            "cargo build{} in {}",
            if release { " --release" } else { "" },
            workspace.display()
        ),
    })
}

/// Whether `cargo run` sets `name` for the program it runs (rather than the
/// user for cargo: `CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_BUILD_*`, ...).
fn set_by_cargo_run(name: &str) -> bool {
    const PREFIXES: [&str; 4] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CFG_",
        "CARGO_BIN_EXE_",
    ];
    const NAMES: [&str; 7] = [
        "CARGO",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_RUSTC_CURRENT_DIR",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `(target name, executable)` from one `compiler-artifact` message.
fn executable(line: &str) -> Option<(String, PathBuf)> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let exe = msg.get("executable")?.as_str()?;
    let name = msg.get("target")?.get("name")?.as_str()?;
    Some((name.to_owned(), PathBuf::from(exe)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_executables_from_cargo_messages() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"cm-api","kind":["bin"]},"executable":"/t/release/cm-api","fresh":true}"#;
        assert_eq!(
            executable(line),
            Some(("cm-api".into(), PathBuf::from("/t/release/cm-api")))
        );
        let lib = r#"{"reason":"compiler-artifact","target":{"name":"cm_core"},"executable":null}"#;
        assert_eq!(executable(lib), None);
        assert_eq!(
            executable(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(executable("not json"), None);
    }

    #[test]
    fn only_what_cargo_run_sets_is_dropped() {
        for dropped in ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR", "CARGO", "OUT_DIR"] {
            assert!(set_by_cargo_run(dropped), "{dropped}");
        }
        for kept in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
            "RUSTFLAGS",
        ] {
            assert!(!set_by_cargo_run(kept), "{kept}");
        }
    }

    #[test]
    fn a_directory_without_the_binaries_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Bins::in_dir(dir.path(), "test").expect_err("empty dir");
        assert!(
            err.to_string().contains("cargo build --release -p cm-api"),
            "{err}"
        );
    }
}

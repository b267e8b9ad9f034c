//! Running the `pulumi` CLI: one process per call, in a scratch workspace,
//! with a minimal environment built from scratch (nothing of the worker's own
//! environment, so no NATS, etcd or API credential reaches a scenario).
//!
//! The engine needs `PULUMI_CONFIG_PASSPHRASE`, but the Go language host it
//! starts, and so the scenario program, would inherit it. A small wrapper
//! written into the worker's cache ([`LANGUAGE_HOST_WRAPPER`]) comes first on
//! `PATH`, where Pulumi looks for `pulumi-language-go`: it unsets the
//! passphrase, then runs the real host. What a program sees is then only
//! `PATH`, `HOME`, `TMPDIR`, `CM_PROJECT`, the driver's
//! `CM_PULUMI_GO_BINARY` and the variables the engine sets (`PULUMI_*`
//! without the passphrase); `worker/tests/security.rs` checks it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use tokio::process::Command;

use super::{DriverError, guard::Guard, secrets::Crypter};

/// System directories kept on the scenario's `PATH` besides Pulumi's and Go's.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// util-linux's `setpriv`, used to have the kernel kill the CLI when the
/// worker dies (`--pdeathsig`): a killed worker must not leave a Pulumi run
/// going on that the worker taking its command over would race with.
const SETPRIV: &str = "/usr/bin/setpriv";

/// coreutils' `nice`, which runs the CLI at a lower priority.
const NICE: &str = "/usr/bin/nice";

/// Where the CLI, its language host and Go are.
#[derive(Debug, Clone)]
pub(crate) struct Cli {
    pulumi: PathBuf,
    /// `setpriv`, when the machine has it.
    setpriv: Option<PathBuf>,
    /// `nice` and the niceness the CLI runs at, when not 0.
    nice: Option<(PathBuf, String)>,
    path: OsString,
    pulumi_home: PathBuf,
    /// The dead man's switch every run goes through, when the driver
    /// runs under a lease (see `guard`).
    guard: Option<Guard>,
}

/// What a finished CLI run printed.
#[derive(Debug)]
pub(crate) struct CliOutput {
    pub success: bool,
    /// The signal that ended the process, when one did.
    pub killed_by: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// The error of a run a signal ended, with the reason its guard gave
    /// when the guard killed it (see `guard.rs`); `None` if no signal did.
    pub(crate) fn interrupted(&self) -> Option<DriverError> {
        let signal = self.killed_by?;
        let by = self
            .stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(super::guard::STOPPED))
            .map(|why| format!(" (its guard: {})", why.trim()))
            .unwrap_or_default();
        Some(DriverError::Interrupted { signal, by })
    }
}

/// The language-host wrapper: drops the passphrase, runs the real host.
const LANGUAGE_HOST_WRAPPER: &str = "#!/bin/sh
# Written by cm-worker (worker/src/pulumi/cli.rs): the Go language host, and so
# the scenario program, runs without the passphrase only the engine needs.
unset PULUMI_CONFIG_PASSPHRASE PULUMI_CONFIG_PASSPHRASE_FILE
exec @HOST@ \"$@\"
";

/// Writes the wrapper of `host` as `<dir>/pulumi-language-go`.
fn write_wrapper(dir: &Path, host: &Path) -> Result<(), DriverError> {
    let quoted = format!("'{}'", host.to_string_lossy().replace('\'', r"'\''"));
    install_script(
        &dir.join("pulumi-language-go"),
        &LANGUAGE_HOST_WRAPPER.replace("@HOST@", &quoted),
    )
}

/// Writes the executable `script` at `target`, atomically (workers sharing
/// a cache may do it at once), unless it is there already.
pub(super) fn install_script(target: &Path, script: &str) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read_to_string(target).is_ok_and(|current| current == script) {
        return Ok(());
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(DriverError::io("creating", dir))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(DriverError::io("writing in", dir))?;
    std::fs::write(tmp.path(), script).map_err(DriverError::io("writing", tmp.path()))?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(DriverError::io("setting permissions of", tmp.path()))?;
    tmp.persist(target)
        .map_err(|e| e.error)
        .map_err(DriverError::io("installing", target))?;
    Ok(())
}

impl Cli {
    /// Runs `pulumi`, with the language-host wrapper written into
    /// `wrapper_dir` first on `PATH`, then Pulumi's and Go's directories.
    pub(crate) fn new(
        pulumi: PathBuf,
        go: &Path,
        pulumi_home: PathBuf,
        wrapper_dir: &Path,
    ) -> Result<Self, DriverError> {
        let host = pulumi.with_file_name("pulumi-language-go");
        write_wrapper(wrapper_dir, &host)?;
        let mut dirs: Vec<PathBuf> = vec![wrapper_dir.to_owned()];
        for bin in [pulumi.as_path(), go] {
            if let Some(dir) = bin.parent().filter(|d| !d.as_os_str().is_empty())
                && !dirs.iter().any(|d| d == dir)
            {
                dirs.push(dir.to_owned());
            }
        }
        let mut path = std::env::join_paths(&dirs).unwrap_or_default();
        if !path.is_empty() {
            path.push(":");
        }
        path.push(SYSTEM_PATH);
        let setpriv = Path::new(SETPRIV).is_file().then(|| PathBuf::from(SETPRIV));
        if setpriv.is_none() {
            tracing::warn!(
                "{SETPRIV} not found: a Pulumi run outlives a killed worker (install util-linux)"
            );
        }
        Ok(Self {
            pulumi,
            setpriv,
            nice: None,
            path,
            pulumi_home,
            guard: None,
        })
    }

    /// Every run at `niceness` (0: the worker's own priority). Children
    /// inherit it: the language host, the program and the providers too.
    pub(crate) fn niced(self, niceness: i32) -> Self {
        let nice = (niceness != 0 && Path::new(NICE).is_file())
            .then(|| (PathBuf::from(NICE), niceness.to_string()));
        if niceness != 0 && nice.is_none() {
            tracing::warn!(
                "{NICE} not found: Pulumi runs at the worker's priority (install coreutils)"
            );
        }
        Self { nice, ..self }
    }

    /// Every run of this CLI through `guard`.
    pub(crate) fn guarded(self, guard: Guard) -> Self {
        Self {
            guard: Some(guard),
            ..self
        }
    }

    /// Runs `pulumi <args>` in `workspace` against its file backend.
    pub(crate) async fn run(
        &self,
        workspace: &Path,
        project: &str,
        crypter: &Crypter,
        args: &[&str],
    ) -> Result<CliOutput, DriverError> {
        let started = Instant::now();
        let mut backend = OsString::from("file://");
        backend.push(workspace);
        // [guard] [nice -n N] [setpriv --pdeathsig KILL --] pulumi: the
        // kernel kills the CLI when its parent (the guard, or the worker)
        // dies; `nice` and `setpriv` exec what follows in their own process,
        // so that parent stays the same. The guard keeps the worker's
        // priority: it must act on time.
        let mut argv: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(guard) = &self.guard {
            argv.push(guard.script().as_os_str());
        }
        if let Some((nice, niceness)) = &self.nice {
            argv.extend([nice.as_os_str(), "-n".as_ref(), niceness.as_ref()]);
        }
        if let Some(setpriv) = &self.setpriv {
            argv.push(setpriv.as_os_str());
            argv.extend(["--pdeathsig", "KILL", "--"].map(std::ffi::OsStr::new));
        }
        argv.push(self.pulumi.as_os_str());
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        command
            .args(args)
            .args(["--non-interactive", "--color", "never"])
            .current_dir(workspace)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.pulumi_home)
            .env("PULUMI_HOME", &self.pulumi_home)
            .env("TMPDIR", workspace)
            .env("PULUMI_BACKEND_URL", backend)
            .env("PULUMI_CONFIG_PASSPHRASE", crypter.passphrase().expose())
            .env("PULUMI_SKIP_UPDATE_CHECK", "true")
            .env("PULUMI_SKIP_CONFIRMATIONS", "true")
            .env("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
            .env("PULUMI_DIY_BACKEND_DISABLE_CHECKPOINT_BACKUPS", "true")
            .env("CM_PROJECT", project)
            .env("CM_PULUMI_GO_BINARY", "./main")
            .stdin(if self.guard.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let unavailable = |e: std::io::Error| DriverError::EngineUnavailable {
            reason: format!(
                "cannot run {}: {e}; run `scripts/dev.sh install` to build it",
                self.pulumi.display()
            ),
        };
        let mut child = command.spawn().map_err(unavailable)?;
        let stdin = child.stdin.take();
        let output = match (&self.guard, stdin) {
            (Some(guard), Some(stdin)) => tokio::select! {
                output = child.wait_with_output() => output,
                never = guard.feed(stdin) => match never {},
            },
            _ => child.wait_with_output().await,
        }
        .map_err(unavailable)?;
        let out = CliOutput {
            success: output.status.success(),
            killed_by: std::os::unix::process::ExitStatusExt::signal(&output.status),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        tracing::debug!(
            command = args.first().copied().unwrap_or_default(),
            success = out.success,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pulumi run"
        );
        Ok(out)
    }
}

/// The error messages of a failed run, in Pulumi's own words: each `error:`
/// entry of the `Diagnostics:` section with its continuation lines, joined
/// and whitespace-normalised; failing that, the last lines of stderr.
pub(crate) fn diagnostics(out: &CliOutput) -> String {
    let mut messages: Vec<String> = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut in_section = false;
    let text = format!("{}\n{}", out.stdout, out.stderr);
    for line in text.lines() {
        if line.trim_end() == "Diagnostics:" {
            in_section = true;
            continue;
        }
        if !in_section {
            continue;
        }
        let trimmed = line.trim();
        let indent = line.len() - line.trim_start().len();
        let is_continuation = matches!(&current, Some((at, _)) if indent >= *at)
            && !trimmed.is_empty()
            && !["error:", "warning:", "info:"]
                .iter()
                .any(|p| trimmed.starts_with(p));
        if is_continuation {
            if let Some((_, msg)) = current.as_mut() {
                msg.push(' ');
                msg.push_str(trimmed);
            }
            continue;
        }
        messages.extend(current.take().map(|(_, m)| m));
        if indent == 0 && !trimmed.is_empty() {
            in_section = false; // the next section ("Resources:", ...)
        } else if let Some(rest) = trimmed.strip_prefix("error: ") {
            current = Some((indent, rest.to_owned()));
        }
    }
    messages.extend(current.map(|(_, m)| m));
    let mut unique: Vec<String> = Vec::new();
    for msg in messages {
        let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
        if !msg.starts_with("update failed") && !unique.contains(&msg) {
            unique.push(msg);
        }
    }
    if !unique.is_empty() {
        return unique.join("; ");
    }
    let tail: Vec<&str> = out
        .stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    tail[tail.len().saturating_sub(5)..].join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_error_lines_from_diagnostics() {
        let out = CliOutput {
            success: false,
            killed_by: None,
            stdout: concat!(
                "Updating (abc):\n",
                " +  pulumi:pulumi:Stack fail-abc creating (0s) error: an unhandled error occurred: program failed:\n",
                "Diagnostics:\n",
                "  pulumi:pulumi:Stack (fail-abc):\n",
                "    error: an unhandled error occurred: program failed:\n",
                "    1 error occurred:\n",
                "    \t* this scenario fails on purpose (identity abc)\n",
                "\n",
                "    error: update failed\n",
                "Resources:\n",
                "    + 1 created\n",
            )
            .into(),
            stderr: String::new(),
        };
        assert_eq!(
            diagnostics(&out),
            "an unhandled error occurred: program failed: 1 error occurred: \
             * this scenario fails on purpose (identity abc)"
        );
        let stderr_only = CliOutput {
            success: false,
            killed_by: None,
            stdout: String::new(),
            stderr: "boom\n\nreally boom\n".into(),
        };
        assert_eq!(diagnostics(&stderr_only), "boom; really boom");
    }
}

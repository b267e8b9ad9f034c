//! The Pulumi driver: deploys, updates and destroys one stack per instance
//! with the real `pulumi` CLI, keeping no state of its own.
//!
//! Each operation lays out a scratch [`workspace`] (local file backend), writes
//! the stack's config and stored state into it directly, runs one CLI command
//! (`up` or `destroy`, `--skip-preview`), then reads the state and the outputs
//! back from the files the CLI left. The caller stores [`StackState`] and
//! hands it back for the next operation.
//!
//! Compatible with chall-manager scenarios: config `<project>:identity` and
//! `<project>:additional` (a JSON object), environment `CM_PROJECT`, outputs
//! `connection_info`, `flags` and the deprecated `flag`.

mod checkpoint;
mod cli;
mod error;
mod guard;
mod outputs;
mod scenario;
mod secrets;
mod workspace;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use cm_core::{Identity, Secret};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use checkpoint::CheckpointSink;
pub use error::DriverError;
pub use outputs::StackOutputs;
pub use scenario::PreparedScenario;
pub use secrets::Crypter;

use cli::{Cli, CliOutput};
use tokio_util::sync::CancellationToken;
use workspace::Workspace;

/// Where the driver finds its tools and keeps its caches.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The `pulumi` executable; `pulumi-language-go` must sit beside it.
    pub pulumi: PathBuf,
    /// The `go` executable, used to compile scenarios.
    pub go: PathBuf,
    /// Compiled scenarios (per digest), Pulumi's home (plugins) and scratch
    /// workspaces live here.
    pub cache_dir: PathBuf,
    /// Passphrase of Pulumi's passphrase secrets provider; never empty.
    pub passphrase: Secret<String>,
    /// The niceness Pulumi runs at (with its language host, program and
    /// providers): deploys are batch work, so the worker's own tasks and
    /// whatever shares the machine (claims, renewals, etcd, NATS) keep the
    /// CPU first. 0 runs them at the worker's priority.
    pub niceness: i32,
}

/// Pulumi's default niceness (`DriverConfig::niceness`).
pub const DEFAULT_NICENESS: i32 = 10;

/// A stack's state as the caller stores it between operations.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct StackState {
    /// Pulumi project name of the scenario that made it.
    pub project: String,
    /// Stack name (the instance identity).
    pub stack: String,
    /// The passphrase provider's salt state for this stack.
    pub encryption_salt: String,
    /// The file backend's checkpoint, as the CLI wrote it.
    pub checkpoint: Value,
    /// The program configuration (`identity`, `additional`, without the
    /// project prefix) of the run that wrote this state: what a destroy
    /// re-runs the program with when an interrupted create left something
    /// Pulumi does not know of (see [`Driver::destroy_with`]). Empty in
    /// states stored before it was kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// A checkpoint of an `up` that had not ended (taken while it ran, or
    /// left by a run that was killed): what that run made after it is in
    /// no state, so a destroy of it runs `up` first (see
    /// [`Driver::destroy_with`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mid_up: bool,
}

impl fmt::Debug for StackState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackState")
            .field("project", &self.project)
            .field("stack", &self.stack)
            .finish_non_exhaustive()
    }
}

impl StackState {
    /// How many resources the stack holds (the root stack resource included).
    pub fn resource_count(&self) -> usize {
        self.checkpoint
            .pointer("/checkpoint/latest/resources")
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    }

    /// Whether a destroy of this state has anything to do: it names
    /// resources, or it was taken before an `up` ended (that run may have
    /// made what it does not name yet).
    pub fn may_hold_resources(&self) -> bool {
        self.resource_count() > 0 || self.mid_up
    }

    /// The URNs of the resources the stack holds (what an operator must
    /// clean up by hand when the stack cannot be destroyed).
    pub fn resource_urns(&self) -> Vec<String> {
        self.checkpoint
            .pointer("/checkpoint/latest/resources")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r.get("urn").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The result of a successful `up`.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The scenario's outputs.
    pub outputs: StackOutputs,
    /// The state to store and pass to the next operation.
    pub state: StackState,
}

/// Written last into a compiled scenario's directory.
const READY_MARK: &str = ".ready";

/// Drives the `pulumi` CLI. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Driver {
    cli: Cli,
    go: PathBuf,
    scenarios_dir: PathBuf,
    scratch_dir: PathBuf,
    crypter: Crypter,
    compiling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulumi runs (`up`, `destroy`) at once in this process, when bounded.
    runs: Option<tokio::sync::Semaphore>,
    /// Where the scripts the driver writes live (language-host wrapper,
    /// run guard).
    bin_dir: PathBuf,
}

impl Driver {
    /// Checks the tools are there and the passphrase is set.
    pub fn new(config: DriverConfig) -> Result<Self, DriverError> {
        if config.passphrase.expose().is_empty() {
            return Err(DriverError::EngineUnavailable {
                reason: "the Pulumi passphrase is empty; set one (CM_PULUMI_PASSPHRASE)".into(),
            });
        }
        let host = config
            .pulumi
            .parent()
            .map(|d| d.join("pulumi-language-go"))
            .unwrap_or_default();
        for tool in [&config.pulumi, &host] {
            if !tool.is_file() {
                return Err(DriverError::EngineUnavailable {
                    reason: format!(
                        "{} not found; run `scripts/dev.sh install` to build Pulumi and its Go language host",
                        tool.display()
                    ),
                });
            }
        }
        let pulumi_home = config.cache_dir.join("pulumi-home");
        let bin_dir = config.cache_dir.join("bin");
        Ok(Self {
            cli: Cli::new(config.pulumi, &config.go, pulumi_home, &bin_dir)?.niced(config.niceness),
            bin_dir,
            go: config.go,
            scenarios_dir: config.cache_dir.join("scenarios"),
            scratch_dir: config.cache_dir.join("scratch"),
            crypter: Crypter::new(config.passphrase),
            compiling: Mutex::new(HashMap::new()),
            runs: None,
        })
    }

    /// This driver running at most `n` Pulumi operations at once (the
    /// others wait their turn): a worker admits more commands than it runs
    /// Pulumi for, so that commands without Pulumi (a pool claim, a renewal)
    /// never wait behind deploys.
    pub fn limit_runs(mut self, n: usize) -> Self {
        self.runs = Some(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// This driver's runs held to a lease: each run is killed once
    /// `valid_until` (the lease's known end, see
    /// `cm_core::lock::Session::valid_until`) passes without being moved
    /// on, by a guard process that outlives a paused worker (see `guard`).
    pub fn guarded(
        self,
        valid_until: tokio::sync::watch::Receiver<Option<std::time::SystemTime>>,
    ) -> Result<Self, DriverError> {
        let guard = guard::Guard::install(&self.bin_dir, valid_until)?;
        Ok(Self {
            cli: self.cli.guarded(guard),
            ..self
        })
    }

    /// A turn to run Pulumi (none needed when runs are not bounded).
    async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match &self.runs {
            Some(runs) => runs.acquire().await.ok(),
            None => None,
        }
    }

    /// Validates the scenario in `dir` and compiles it once per digest.
    ///
    /// The compiled scenario is built in a staging directory and renamed into
    /// `<cache>/scenarios/<digest>` in one step, so workers sharing a cache
    /// never see a half-built one; the first rename wins.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn prepare(&self, dir: &Path) -> Result<PreparedScenario, DriverError> {
        let project = scenario::read_project(dir).await?;
        let digest = scenario::digest_dir(dir).await?;
        let hex = digest.trim_start_matches("sha256:").to_owned();
        let target = self.scenarios_dir.join(&hex);
        let binary = match &project.prebuilt_binary {
            Some(rel) => target.join("src").join(rel),
            None => target.join("main"),
        };

        let lock = self.compile_lock(&hex);
        let _guard = lock.lock().await;
        if !target.join(READY_MARK).is_file() {
            self.build(dir, &project, &hex, &target).await?;
        }
        Ok(PreparedScenario {
            digest,
            project: project.name,
            binary,
        })
    }

    async fn build(
        &self,
        dir: &Path,
        project: &scenario::ProjectInfo,
        hex: &str,
        target: &Path,
    ) -> Result<(), DriverError> {
        tokio::fs::create_dir_all(&self.scenarios_dir)
            .await
            .map_err(DriverError::io("creating", &self.scenarios_dir))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!("{hex}.staging-"))
            .tempdir_in(&self.scenarios_dir)
            .map_err(DriverError::io(
                "creating a staging directory in",
                &self.scenarios_dir,
            ))?;
        let src = staging.path().join("src");
        copy_dir(dir, &src).await?;
        match &project.prebuilt_binary {
            Some(rel) => {
                let binary = src.join(rel);
                if !binary.is_file() {
                    return Err(DriverError::invalid(format!(
                        "runtime.options.binary names {rel}, which the scenario does not contain"
                    )));
                }
                make_executable(&binary).await?;
            }
            None => {
                tracing::info!(digest = hex, "compiling scenario");
                let started = std::time::Instant::now();
                let compiled =
                    scenario::compile_go(&self.go, &src, &staging.path().join("main")).await;
                observe("compile", started, &compiled);
                compiled?;
            }
        }
        let mark = staging.path().join(READY_MARK);
        tokio::fs::write(&mark, b"")
            .await
            .map_err(DriverError::io("writing", &mark))?;
        let staged = staging.keep();
        if tokio::fs::rename(&staged, target).await.is_ok() {
            return Ok(());
        }
        if target.join(READY_MARK).is_file() {
            // Another process finished first: keep its build, drop ours.
            let _ = tokio::fs::remove_dir_all(&staged).await;
            return Ok(());
        }
        // An incomplete directory from an older layout: replace it.
        let _ = tokio::fs::remove_dir_all(target).await;
        let moved = tokio::fs::rename(&staged, target).await;
        if moved.is_err() {
            let _ = tokio::fs::remove_dir_all(&staged).await;
        }
        moved.map_err(DriverError::io("moving the compiled scenario to", target))
    }

    /// Creates or updates the stack `identity` (in place), returning its
    /// outputs and the state to store. `previous` is the stored state of an
    /// existing stack, `None` for a new one.
    pub async fn up(
        &self,
        scenario: &PreparedScenario,
        identity: &Identity,
        additional: &BTreeMap<String, String>,
        previous: Option<&StackState>,
    ) -> Result<Deployment, DriverError> {
        self.up_with(scenario, identity, additional, previous, None)
            .await
    }

    /// [`Driver::up`], handing every checkpoint the run writes to `sink`
    /// (the last one, once the CLI has exited, included).
    #[tracing::instrument(name = "up", skip(self, scenario, additional, previous, sink), fields(project = %scenario.project), err(Display))]
    pub async fn up_with(
        &self,
        scenario: &PreparedScenario,
        identity: &Identity,
        additional: &BTreeMap<String, String>,
        previous: Option<&StackState>,
        sink: Option<&CheckpointSink>,
    ) -> Result<Deployment, DriverError> {
        let _turn = self.turn().await;
        let started = std::time::Instant::now();
        let result = self
            .run_up(scenario, identity, additional, previous, sink)
            .await;
        observe("up", started, &result);
        result
    }

    async fn run_up(
        &self,
        scenario: &PreparedScenario,
        identity: &Identity,
        additional: &BTreeMap<String, String>,
        previous: Option<&StackState>,
        sink: Option<&CheckpointSink>,
    ) -> Result<Deployment, DriverError> {
        let fresh;
        let previous = match previous {
            Some(p) => p,
            None => {
                fresh = self.new_stack(scenario, identity, additional).await?;
                &fresh
            }
        };
        let salt = &previous.encryption_salt;
        let config = program_config(identity, additional)?;
        let state = self
            .run_up_state(
                scenario,
                identity.as_str(),
                salt,
                &config,
                previous.checkpoint.clone(),
                sink,
            )
            .await?;
        let outputs = outputs::read_outputs(&state.checkpoint, salt, &self.crypter).await?;
        Ok(Deployment { outputs, state })
    }

    /// The state of a stack no run has touched yet: an empty checkpoint
    /// (written directly: no `pulumi stack init` run, ~0.35 s, is needed),
    /// a new salt, and the configuration its first `up` will run with. It
    /// is marked [`StackState::mid_up`]: stored before that `up` starts, it
    /// lets a destroy find what a run killed before its first checkpoint
    /// made.
    pub async fn new_stack(
        &self,
        scenario: &PreparedScenario,
        identity: &Identity,
        additional: &BTreeMap<String, String>,
    ) -> Result<StackState, DriverError> {
        Ok(StackState {
            project: scenario.project.clone(),
            stack: identity.to_string(),
            encryption_salt: self.crypter.salt_state().await?,
            checkpoint: serde_json::json!({"version": 3, "checkpoint": {
                "stack": format!("organization/{}/{identity}", scenario.project),
                "latest": null,
            }}),
            config: program_config(identity, additional)?,
            mid_up: true,
        })
    }

    /// One `up` of `stack` from `checkpoint` with the program configuration
    /// `config`, returning the state it left.
    async fn run_up_state(
        &self,
        scenario: &PreparedScenario,
        stack: &str,
        salt: &str,
        config: &BTreeMap<String, String>,
        mut checkpoint: Value,
        sink: Option<&CheckpointSink>,
    ) -> Result<StackState, DriverError> {
        let refresh = recover_interrupted(&mut checkpoint, stack);
        let ws = Workspace::create(
            &self.scratch_dir,
            scenario,
            stack,
            salt,
            config,
            Some(&checkpoint),
        )
        .await?;
        let mut args = vec!["up", "--yes", "--skip-preview", "--stack", stack];
        if refresh {
            args.push("--refresh");
        }
        let out = self
            .run_watched(&ws, &scenario.project, salt, &args, sink, true)
            .await?;
        let mut state = ws.read_state(salt).await?;
        if let Some(state) = state.as_mut() {
            state.mid_up = out.killed_by.is_some();
        }
        if let (Some(sink), Some(state)) = (sink, &state) {
            sink.send(state.clone());
        }
        if let Some(interrupted) = out.interrupted() {
            return Err(interrupted);
        }
        if !out.success {
            return Err(DriverError::ProgramFailed {
                message: cli::diagnostics(&out),
                state: state.map(Box::new),
            });
        }
        state.ok_or_else(|| DriverError::StateCorrupt {
            reason: "pulumi up succeeded but left no stack state".into(),
        })
    }

    /// Destroys every resource of the stack whose state is `state`, returning
    /// the (now empty) state the CLI left.
    pub async fn destroy(
        &self,
        scenario: &PreparedScenario,
        state: &StackState,
    ) -> Result<StackState, DriverError> {
        self.destroy_with(scenario, state, None).await
    }

    /// [`Driver::destroy`], handing every checkpoint the run writes to `sink`.
    #[tracing::instrument(name = "destroy", skip(self, scenario, state, sink), fields(project = %scenario.project, stack = %state.stack), err(Display))]
    pub async fn destroy_with(
        &self,
        scenario: &PreparedScenario,
        state: &StackState,
        sink: Option<&CheckpointSink>,
    ) -> Result<StackState, DriverError> {
        let _turn = self.turn().await;
        let started = std::time::Instant::now();
        let result = self.run_destroy(scenario, state, sink).await;
        observe("destroy", started, &result);
        result
    }

    async fn run_destroy(
        &self,
        scenario: &PreparedScenario,
        state: &StackState,
        sink: Option<&CheckpointSink>,
    ) -> Result<StackState, DriverError> {
        let converged;
        let state = match self.converge_pending_creates(scenario, state, sink).await? {
            Some(after) => {
                converged = after;
                &converged
            }
            None => state,
        };
        let mut checkpoint = state.checkpoint.clone();
        let refresh = recover_interrupted(&mut checkpoint, &state.stack);
        let ws = Workspace::create(
            &self.scratch_dir,
            scenario,
            &state.stack,
            &state.encryption_salt,
            &state.config,
            Some(&checkpoint),
        )
        .await?;
        let mut args = vec![
            "destroy",
            "--yes",
            "--skip-preview",
            "--stack",
            &state.stack,
        ];
        if refresh {
            args.push("--refresh");
        }
        let out = self
            .run_watched(
                &ws,
                &scenario.project,
                &state.encryption_salt,
                &args,
                sink,
                false,
            )
            .await?;
        if let (Some(sink), Ok(Some(after))) = (sink, ws.read_state(&state.encryption_salt).await) {
            sink.send(after);
        }
        if let Some(interrupted) = out.interrupted() {
            return Err(interrupted);
        }
        if !out.success {
            let state = ws.read_state(&state.encryption_salt).await?;
            return Err(DriverError::ProgramFailed {
                message: cli::diagnostics(&out),
                state: state.map(Box::new),
            });
        }
        let after = ws.read_state(&state.encryption_salt).await?;
        after.ok_or_else(|| DriverError::StateCorrupt {
            reason: "pulumi destroy succeeded but left no stack state".into(),
        })
    }

    /// Before a destroy: when an interrupted run left a pending *create*, the
    /// resource it asked for may exist, and no state names it (a pending
    /// create has no id), so `destroy` alone would leave it running. The
    /// same holds for a checkpoint taken in the middle of an `up`
    /// ([`StackState::mid_up`]: the run may have made more after it). An `up`
    /// with the configuration of the run that left it makes the resource
    /// again under the same URN, which lets the provider take over what
    /// the dead run left (the `localservice` provider stops the server of
    /// that URN first) and puts it in the state the destroy then empties.
    /// Returns the state to destroy instead, `None` when nothing was pending
    /// or the state does not say how its program was configured.
    async fn converge_pending_creates(
        &self,
        scenario: &PreparedScenario,
        state: &StackState,
        sink: Option<&CheckpointSink>,
    ) -> Result<Option<StackState>, DriverError> {
        let creates = checkpoint::pending_creates(&state.checkpoint);
        if creates.is_empty() && !state.mid_up {
            return Ok(None);
        }
        if state.config.is_empty() {
            tracing::warn!(
                stack = %state.stack,
                pending = ?creates,
                "a pending create cannot be converged before the destroy (the state predates its \
                 program configuration being kept): what it made may outlive the stack"
            );
            return Ok(None);
        }
        tracing::warn!(
            stack = %state.stack,
            pending = ?creates,
            mid_up = state.mid_up,
            "destroying a stack whose last run was interrupted while creating: running `up` first \
             so what that run made is known to Pulumi and destroyed"
        );
        let started = std::time::Instant::now();
        let result = self
            .run_up_state(
                scenario,
                &state.stack,
                &state.encryption_salt,
                &state.config,
                state.checkpoint.clone(),
                sink,
            )
            .await;
        observe("converge", started, &result);
        match result {
            Ok(after) => Ok(Some(after)),
            // The program failed part-way: destroy what it left, which
            // holds the pending resource if the provider took it over.
            Err(DriverError::ProgramFailed {
                message,
                state: after,
            }) => {
                tracing::warn!(
                    stack = %state.stack,
                    error = %message,
                    "the converging `up` before a destroy failed; destroying what it left"
                );
                Ok(after.map(|s| *s))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the CLI in `ws`, watching its checkpoint for `sink` meanwhile
    /// (each marked [`StackState::mid_up`] when the run is an `up`).
    async fn run_watched(
        &self,
        ws: &Workspace,
        project: &str,
        salt: &str,
        args: &[&str],
        sink: Option<&CheckpointSink>,
        mid_up: bool,
    ) -> Result<CliOutput, DriverError> {
        let run = self.cli.run(ws.path(), project, &self.crypter, args);
        let Some(sink) = sink else {
            return run.await;
        };
        let done = CancellationToken::new();
        let run = async {
            let out = run.await;
            done.cancel();
            out
        };
        let (out, ()) = tokio::join!(run, checkpoint::watch(ws, salt, sink, &done, mid_up));
        out
    }

    fn compile_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.compiling.lock() {
            Ok(mut map) => map.entry(digest.to_owned()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// The configuration a scenario's program sees (without the project
/// prefix): its identity and its `additional`, as one JSON object.
fn program_config(
    identity: &Identity,
    additional: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, DriverError> {
    let additional_json = serde_json::to_string(additional)
        .map_err(|e| DriverError::invalid(format!("additional cannot be encoded: {e}")))?;
    Ok(BTreeMap::from([
        ("identity".to_owned(), identity.to_string()),
        ("additional".to_owned(), additional_json),
    ]))
}

/// Prepares a stored checkpoint for a new run: drops the pending operations
/// an interrupted run left. Returns whether the run must refresh the stack
/// first (it must when something was pending).
fn recover_interrupted(checkpoint: &mut Value, stack: &str) -> bool {
    let cleared = checkpoint::clear_pending(checkpoint);
    if cleared.is_empty() {
        return false;
    }
    tracing::warn!(
        stack,
        pending = ?cleared,
        "resuming a stack whose last run was interrupted: pending operations cleared, refreshing"
    );
    cm_core::metrics::metrics().pulumi("recover", "success", 0.0);
    true
}

/// Records a Pulumi phase's duration and outcome.
fn observe<T>(phase: &str, started: std::time::Instant, result: &Result<T, DriverError>) {
    let outcome = if result.is_ok() { "success" } else { "failure" };
    cm_core::metrics::metrics().pulumi(phase, outcome, started.elapsed().as_secs_f64());
}

/// Copies a directory tree (regular files and directories only).
async fn copy_dir(from: &Path, to: &Path) -> Result<(), DriverError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || copy_dir_blocking(&from, &to))
        .await
        .map_err(|e| DriverError::invalid(format!("copy task failed: {e}")))?
}

fn copy_dir_blocking(from: &Path, to: &Path) -> Result<(), DriverError> {
    std::fs::create_dir_all(to).map_err(DriverError::io("creating", to))?;
    for entry in std::fs::read_dir(from).map_err(DriverError::io("listing", from))? {
        let entry = entry.map_err(DriverError::io("listing", from))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(DriverError::io("inspecting", &path))?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            if entry.file_name() != ".git" {
                copy_dir_blocking(&path, &dest)?;
            }
        } else if kind.is_file() {
            std::fs::copy(&path, &dest).map_err(DriverError::io("copying", &path))?;
        }
    }
    Ok(())
}

async fn make_executable(path: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = tokio::fs::metadata(path)
        .await
        .map_err(DriverError::io("inspecting", path))?
        .permissions();
    if perms.mode() & 0o111 == 0 {
        perms.set_mode(perms.mode() | 0o755);
        tokio::fs::set_permissions(path, perms)
            .await
            .map_err(DriverError::io("making executable", path))?;
    }
    Ok(())
}

//! Fault injection for the crash and race tests: named places where the
//! worker dies on the spot, as if killed, or pauses until a test lets it go,
//! when `CM_FAILPOINT` names them.
//!
//! `CM_FAILPOINT=after-up,before-ack` arms those points to abort;
//! `CM_FAILPOINT=pause:instance-update-before-write` arms a pause: the task
//! reaching it writes `<CM_FAILPOINT_DIR>/<name>.paused` and waits until
//! `<CM_FAILPOINT_DIR>/<name>.resume` exists (other tasks keep running), so a
//! test can order two handlers' steps deterministically. A pause fires once
//! per process: the first task to reach it waits, later ones (a redelivery
//! of the same command, say) pass. Unset (always, in
//! production), [`hit`] and [`pause`] are one cached lookup. The points:
//! - `after-up`: Pulumi finished a deploy, its record is not written yet;
//! - `before-ack`: a command's result is recorded and announced, not acked;
//! - `instance-create-before-write` (pause): a create's Pulumi run is done,
//!   the ready record not written yet;
//! - `instance-create-before-evict` (pause): a create holds its locks and is
//!   about to evict the source's oldest instance;
//! - `pool-refill-between-rounds` (pause): a refill deployed one instance
//!   and released its locks before the next round;
//! - `pool-refill-before-destroy` (pause): a refill is about to destroy a
//!   surplus pooled instance (its identity locked and re-read);
//! - `instance-update-before-write` (pause): an instance update's Pulumi run
//!   is done, its record not written yet.
//!
//! Pauses (`CM_PAUSE=<point>`, `CM_PAUSE_DIR=<dir>`, see [`hold`]) stop a
//! worker at a named step until the test releases it, for races that need
//! one delivery held while another runs:
//! - `received`: a command was pulled, before anything is read or run;
//! - `handler-start`: the settled check found nothing, the handler is about
//!   to run (no in-progress acks are sent while paused there).

use std::{path::PathBuf, sync::OnceLock, time::Duration};

/// The environment variable listing armed failpoints.
pub const ENV: &str = "CM_FAILPOINT";
/// The directory where pauses announce themselves and wait to be resumed.
pub const DIR_ENV: &str = "CM_FAILPOINT_DIR";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let names: Vec<String> = std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !names.is_empty() {
            tracing::warn!(failpoints = ?names, "failpoints armed: this worker will abort or pause on purpose");
        }
        names
    })
}

/// Logs the armed failpoints at start-up (so an operator sees them).
pub fn announce() {
    let _ = armed();
}

/// Aborts the process when `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|n| n == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// Waits here when `pause:<name>` is armed, until the test creates
/// `<name>.resume` in `CM_FAILPOINT_DIR`. Only the calling task waits.
pub async fn pause(name: &str) {
    if armed().is_empty()
        || !armed()
            .iter()
            .any(|n| n.strip_prefix("pause:") == Some(name))
    {
        return;
    }
    static FIRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    match FIRED.lock() {
        Ok(mut fired) if !fired.iter().any(|n| n == name) => fired.push(name.to_owned()),
        _ => return,
    }
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).unwrap_or_else(|| ".".into()));
    let resume = dir.join(format!("{name}.resume"));
    tracing::warn!(failpoint = name, "failpoint reached: pausing until resumed");
    let _ = std::fs::write(
        dir.join(format!("{name}.paused")),
        std::process::id().to_string(),
    );
    while !resume.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(failpoint = name, "failpoint resumed");
}

/// The environment variable naming the point where the worker pauses.
pub const PAUSE_ENV: &str = "CM_PAUSE";
/// The directory where a pause is announced and released.
pub const PAUSE_DIR_ENV: &str = "CM_PAUSE_DIR";

fn pause_point() -> Option<&'static (String, std::path::PathBuf)> {
    static POINT: OnceLock<Option<(String, std::path::PathBuf)>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let name = std::env::var(PAUSE_ENV).ok().filter(|n| !n.trim().is_empty())?;
            let dir = std::env::var_os(PAUSE_DIR_ENV)?;
            tracing::warn!(pause = %name, "pause point armed: this worker will stop there on purpose");
            Some((name.trim().to_owned(), std::path::PathBuf::from(dir)))
        })
        .as_ref()
}

/// Pauses at `name` when `CM_PAUSE` names it (and `CM_PAUSE_DIR` is set),
/// for the race tests: the worker appends `detail` (e.g. the command id) as
/// a line to `<dir>/<name>.reached`, then waits until `<dir>/<name>.release`
/// exists; once released, later hits pass straight through. Unarmed (always,
/// in production), one cached lookup.
pub async fn hold(name: &str, detail: &str) {
    let Some((armed, dir)) = pause_point() else {
        return;
    };
    if armed != name {
        return;
    }
    let release = dir.join(format!("{name}.release"));
    if release.exists() {
        return;
    }
    tracing::warn!(
        pause = name,
        detail,
        "pause point reached: waiting for its release"
    );
    // One line per paused command (several when the worker runs several).
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.reached")))
    {
        use std::io::Write as _;
        // One write per line: appends of concurrent pauses never interleave.
        let _ = f.write_all(format!("{detail}\n").as_bytes());
    }
    while !release.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(pause = name, "pause point released");
}

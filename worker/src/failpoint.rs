//! Fault injection for the crash tests: named places where the worker dies
//! on the spot, as if killed, when `CM_FAILPOINT` names them.
//!
//! `CM_FAILPOINT=after-up,before-ack` arms those points. Unset (always, in
//! production), [`hit`] is one cached lookup. The points:
//! - `after-up`: Pulumi finished a deploy, its record is not written yet;
//! - `before-ack`: a command's result is recorded and announced, not acked.
//!
//! Pauses (`CM_PAUSE=<point>`, `CM_PAUSE_DIR=<dir>`, see [`pause`]) stop a
//! worker at a named step until the test releases it, for races that need
//! one delivery held while another runs:
//! - `received`: a command was pulled, before anything is read or run;
//! - `handler-start`: the settled check found nothing, the handler is about
//!   to run (no in-progress acks are sent while paused there).

use std::sync::OnceLock;

/// The environment variable listing armed failpoints.
pub const ENV: &str = "CM_FAILPOINT";

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
            tracing::warn!(failpoints = ?names, "failpoints armed: this worker will abort on purpose");
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
pub async fn pause(name: &str, detail: &str) {
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

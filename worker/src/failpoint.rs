//! Fault injection for the crash tests: named places where the worker dies
//! on the spot, as if killed, when `CM_FAILPOINT` names them.
//!
//! `CM_FAILPOINT=after-up,before-ack` arms those points. Unset (always, in
//! production), [`hit`] is one cached lookup. The points:
//! - `after-up`: Pulumi finished a deploy, its record is not written yet;
//! - `before-ack`: a command's result is recorded and announced, not acked.

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

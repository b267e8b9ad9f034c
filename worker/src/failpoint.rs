//! Fault injection for the crash and race tests: named places where the
//! worker dies on the spot, as if killed, or pauses until a test lets it go,
//! when `CM_FAILPOINT` names them.
//!
//! `CM_FAILPOINT=after-up,before-ack` arms those points to abort ([`hit`]);
//! `CM_FAILPOINT=pause:<point>` arms a pause ([`pause`]), one mechanism for
//! every pause point: a task reaching it appends a line (its detail, e.g.
//! the command id) to `<CM_FAILPOINT_DIR>/<point>.paused` and waits until
//! `<CM_FAILPOINT_DIR>/<point>.resume` exists (other tasks keep running), so
//! a test can order two steps deterministically. Once resumed, the point
//! lets everyone through. Which arrivals wait is the point's own
//! ([`Waits`]): the first only (a redelivery of the same command passes),
//! or every one until the resume (several commands held at once). Unset
//! (always, in production), both are one cached lookup.
//!
//! The points:
//! - `after-up` (abort): Pulumi finished a deploy, its record is not written yet;
//! - `before-ack` (abort): a command's result is recorded and announced, not acked;
//! - `instance-delete-after-write` (abort): a delete destroyed the stack and
//!   deleted the records (the command answered in that transaction), and
//!   has not recorded nor acked anything else;
//! - `challenge-update-before-fan-out` (abort): a challenge update wrote the
//!   challenge, and has published none of its instances' updates;
//! - `received` (every arrival): a command was pulled, before anything is
//!   read or run;
//! - `handler-start` (every arrival): the settled check found nothing, the
//!   handler is about to run (no in-progress acks are sent while paused);
//! - `instance-create-before-write` (first): a create's Pulumi run is done,
//!   the ready record not written yet;
//! - `instance-create-before-evict` (first): a create holds its locks and is
//!   about to evict the source's oldest instance;
//! - `challenge-update-locked` (first): a challenge update holds the
//!   challenge's write lock and has read nothing yet;
//! - `pool-refill-before-locks` (first): a refill is about to take the
//!   pool's locks for its first round;
//! - `pool-refill-between-rounds` (first): a refill deployed one instance
//!   and released its locks before the next round;
//! - `pool-refill-before-done` (first): a refill's round found the pool at
//!   its size and holds the pool's locks, about to release them;
//! - `pool-refill-before-destroy` (first): a refill is about to destroy a
//!   surplus pooled instance (its identity locked and re-read);
//! - `instance-update-before-write` (first): an instance update's Pulumi run
//!   is done, its record not written yet;
//! - `instance-reset-before-retire` (first): a reset switched the record to
//!   its fresh identity and is about to destroy the old stack;
//! - `checkpoint-pointer-first` (first): a run's checkpoint writer is about
//!   to write the stack's pointer to the run's first checkpoint (the run
//!   itself goes on).
//!
//! `CM_FAILPOINT=lose-answer:<point>` loses the answer of the first write
//! at that point in this process and applies the write late ([`answer_lost`]):
//! - `instance-write`: an instance record written with a new stack state;
//! - `checkpoint-pointer`: a run's checkpoint pointer, applied once the
//!   stack's pointer has moved on to a later state (the run's final one).

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

/// Whether the write at `name` is to lose its answer and apply late
/// (`lose-answer:<name>` armed): true for the first write to reach it in
/// this process, as when etcd's leader dies holding the request and the next
/// one applies it after the writer gave up waiting.
pub fn answer_lost(name: &str) -> bool {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    armed()
        .iter()
        .any(|n| n.strip_prefix("lose-answer:") == Some(name))
        && !TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst)
}

/// Which arrivals at a pause point wait for its resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waits {
    /// The first task to reach it in this process; later ones pass.
    First,
    /// Every task that reaches it before it is resumed.
    Every,
}

/// Waits here when `pause:<name>` is armed, until the test creates
/// `<name>.resume` in `CM_FAILPOINT_DIR`; `detail` (e.g. the command id;
/// empty: the process id) is appended as a line to `<name>.paused` first. Only the calling task
/// waits.
pub async fn pause(name: &str, detail: &str, waits: Waits) {
    if armed().is_empty()
        || !armed()
            .iter()
            .any(|n| n.strip_prefix("pause:") == Some(name))
    {
        return;
    }
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).unwrap_or_else(|| ".".into()));
    let resume = dir.join(format!("{name}.resume"));
    if resume.exists() {
        return;
    }
    if waits == Waits::First {
        static FIRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        match FIRED.lock() {
            Ok(mut fired) if !fired.iter().any(|n| n == name) => fired.push(name.to_owned()),
            _ => return,
        }
    }
    tracing::warn!(
        failpoint = name,
        detail,
        "failpoint reached: pausing until resumed"
    );
    // One line per paused task (several when the worker runs several).
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.paused")))
    {
        use std::io::Write as _;
        // One write per line: appends of concurrent pauses never interleave.
        let line = if detail.is_empty() {
            std::process::id().to_string()
        } else {
            detail.to_owned()
        };
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
    while !resume.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(failpoint = name, "failpoint resumed");
}

//! A dead man's switch around every Pulumi run, outside the worker process.
//!
//! A run holds its stack's lock only as long as the worker's etcd lease
//! lives. The worker stops its runs when it learns the lease is lost, but a
//! worker that is paused (SIGSTOP, a frozen VM or container, a wedged
//! runtime) learns nothing: its `pulumi` child keeps running while the lease
//! expires and another worker takes the lock and starts its own run on the
//! same stack. So each run goes through a small script ([`GUARD_SCRIPT`],
//! written into the worker's cache): the worker feeds the script's stdin,
//! one line per change, the time until which its lease is known to live
//! minus [`MARGIN`]; the script kills the run once that time passes
//! without a newer line (the worker stopped renewing) or once its stdin
//! closes (the worker died). The script waits for the run itself (its end
//! is seen at once: a run costs a few milliseconds more, not a poll
//! period), while a watcher subshell beside it reads the deadlines every
//! 200 ms, spawning nothing. Job control is on in the script: a background
//! job of a plain script ignores SIGINT, which Pulumi sends its plugins to
//! stop them, and each run then waited seconds for their shutdown timeout.
//!
//! Owns: the script, the deadline line format, and feeding it to one run.
//! Must not know: how the lease is renewed (`cm_core::lock::Session`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::{io::AsyncWriteExt, process::ChildStdin, sync::watch};

use super::DriverError;

/// How long before the lease's known end a run is killed: covers the
/// script's poll period and the kill itself, so the run is gone before
/// etcd can expire the lease and let another worker take the lock.
pub(crate) const MARGIN: Duration = Duration::from_secs(1);

/// How the script's one line on stderr begins when it stops a run (the
/// reason follows).
pub(crate) const STOPPED: &str = "cm-worker pulumi guard: run stopped:";

/// The switch. Arguments: the command to run. Stdin: deadlines, one per
/// line, in Unix milliseconds (0: no lease). Exits as the command did (a
/// command ended by a signal ends the script by the same signal).
pub(crate) const GUARD_SCRIPT: &str = r#"#!/bin/bash
# Written by cm-worker (worker/src/pulumi/guard.rs): a dead man's switch around
# one Pulumi run. Stdin carries, one line each, the Unix time in ms until which
# the worker's locks are known to be held; the run is killed when that time
# passes without a newer line, or when stdin ends (the worker died). The run
# is waited for directly (its end is seen at once); a watcher beside it reads
# the deadlines. Job control on: the run does not inherit the SIGINT and
# SIGQUIT a background job otherwise ignores (Pulumi stops its plugins with
# SIGINT), and it leads its own process group.
set -m
exec 3<&0 0</dev/null
read -r -u 3 until_ms || exit 70
[[ $until_ms =~ ^[0-9]+$ ]] || exit 70
"$@" &
run=$!
(
  why= partial=
  while :; do
    if read -r -t 0.2 -u 3 line; then
      line=$partial$line partial=
      [[ $line =~ ^[0-9]+$ ]] && until_ms=$line
    elif (( $? > 128 )); then
      # A timeout in the middle of a line keeps what it read: the rest of
      # the line comes with the next read (alone, it is another number).
      partial+=$line
    else
      why="the worker is gone"
      break
    fi
    now=${EPOCHREALTIME/[.,]/}
    if (( ${now:0:-3} >= until_ms )); then
      why="the worker's lease was not renewed in time"
      break
    fi
  done
  echo "cm-worker pulumi guard: run stopped: $why" >&2
  kill -KILL -- "-$run" 2>/dev/null || kill -KILL "$run" 2>/dev/null
) &
watcher=$!
wait "$run" 2>/dev/null
status=$?
kill -KILL "$watcher" 2>/dev/null
wait "$watcher" 2>/dev/null
if (( status > 128 && status < 128 + 65 )); then
  kill -n $((status - 128)) $$
fi
exit "$status"
"#;

/// Where the switch is, and the lease deadlines it is fed.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    script: PathBuf,
    valid_until: watch::Receiver<Option<SystemTime>>,
}

impl Guard {
    /// Writes the script into `dir` (atomically, once) and guards runs
    /// with the deadlines `valid_until` publishes.
    pub(crate) fn install(
        dir: &Path,
        valid_until: watch::Receiver<Option<SystemTime>>,
    ) -> Result<Self, DriverError> {
        if !Path::new("/bin/bash").is_file() {
            return Err(DriverError::EngineUnavailable {
                reason: "/bin/bash not found: the guard of Pulumi runs needs it (install bash)"
                    .into(),
            });
        }
        let script = dir.join("cm-pulumi-guard");
        super::cli::install_script(&script, GUARD_SCRIPT)?;
        Ok(Self {
            script,
            valid_until,
        })
    }

    /// The script to run in place of the command.
    pub(crate) fn script(&self) -> &Path {
        &self.script
    }

    /// Feeds the guard of one run its deadlines until the run ends (the
    /// caller drops this future then). Never completes: a write that fails
    /// (the script is gone) leaves it waiting.
    pub(crate) async fn feed(&self, mut stdin: ChildStdin) -> std::convert::Infallible {
        let mut deadlines = self.valid_until.clone();
        loop {
            let line = deadline_line(*deadlines.borrow_and_update());
            if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
            if deadlines.changed().await.is_err() {
                // The session is gone: nothing renews the lease any more.
                let _ = stdin.write_all(deadline_line(None).as_bytes()).await;
                break;
            }
        }
        // Keep stdin open: closing it tells the script the worker died.
        let _keep = stdin;
        std::future::pending().await
    }
}

/// The line the script reads: `valid_until` minus [`MARGIN`], in Unix ms
/// (0 when there is no lease).
fn deadline_line(valid_until: Option<SystemTime>) -> String {
    let ms = valid_until
        .and_then(|t| t.checked_sub(MARGIN))
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis());
    format!("{ms}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use tokio::process::Command;

    /// The script installed in a fresh directory, running `command` with
    /// its stdin, stdout and stderr piped.
    fn spawn(command: &[&str]) -> (tempfile::TempDir, tokio::process::Child) {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("cm-pulumi-guard");
        super::super::cli::install_script(&script, GUARD_SCRIPT).expect("script");
        let child = Command::new(&script)
            .args(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the guard");
        (dir, child)
    }

    fn in_a_minute() -> String {
        deadline_line(Some(SystemTime::now() + Duration::from_secs(60)))
    }

    /// A deadline line whose first half the watcher reads just before its
    /// 200 ms read timeout, and the rest after it, is one deadline: read
    /// alone, its second half is a small number, long past, and the run
    /// was killed (a guard killed a long deploy this way under load).
    #[tokio::test]
    async fn a_deadline_line_torn_by_a_read_timeout_is_read_whole() {
        let (_dir, mut child) = spawn(&["sleep", "1.5"]);
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(in_a_minute().as_bytes())
            .await
            .expect("write");
        stdin.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let line = in_a_minute();
        let (head, tail) = line.split_at(7);
        stdin.write_all(head.as_bytes()).await.expect("write");
        stdin.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stdin.write_all(tail.as_bytes()).await.expect("write");
        stdin.flush().await.expect("flush");
        // Stdin stays open meanwhile: closing it would stop the run.
        let output = child.wait_with_output().await.expect("guard");
        drop(stdin);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "the run was stopped: {:?} {stderr}",
            output.status
        );
        assert!(!stderr.contains(STOPPED), "{stderr}");
    }

    /// A run whose deadline passes is killed, and the guard says why in
    /// the words the driver looks for.
    #[tokio::test]
    async fn a_run_past_its_deadline_is_killed_and_the_guard_says_why() {
        let (_dir, mut child) = spawn(&["sleep", "30"]);
        let mut stdin = child.stdin.take().expect("stdin");
        let soon = SystemTime::now() + MARGIN + Duration::from_millis(300);
        stdin
            .write_all(deadline_line(Some(soon)).as_bytes())
            .await
            .expect("write");
        stdin.flush().await.expect("flush");
        let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("the guard stops the run within seconds")
            .expect("guard");
        drop(stdin);
        let out = super::super::cli::CliOutput {
            success: output.status.success(),
            killed_by: std::os::unix::process::ExitStatusExt::signal(&output.status),
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        let err = out.interrupted().expect("ended by a signal");
        assert_eq!(
            err.to_string(),
            "pulumi was killed by signal 9 before it finished \
             (its guard: the worker's lease was not renewed in time)"
        );
    }

    #[test]
    fn a_deadline_is_the_lease_end_less_the_margin_in_unix_ms() {
        let end = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_005_250);
        assert_eq!(deadline_line(Some(end)), "1700000004250\n");
        assert_eq!(deadline_line(None), "0\n");
        assert_eq!(deadline_line(Some(SystemTime::UNIX_EPOCH)), "0\n");
    }
}

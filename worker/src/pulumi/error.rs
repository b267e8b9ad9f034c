//! What can go wrong when driving Pulumi, as kinds the caller acts on:
//! a bad scenario is the challenge author's fault (refuse it), a failed program
//! is reported with Pulumi's own message, an unavailable engine is retryable.

use std::path::PathBuf;

use super::StackState;

/// An error of the Pulumi driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The scenario cannot be used at all (no `Pulumi.yaml`, unsupported
    /// runtime, does not compile). Retrying will not help.
    #[error("invalid scenario: {reason}")]
    ScenarioInvalid {
        /// Why, in words safe to show to the challenge author.
        reason: String,
    },

    /// The Pulumi program ran and failed. `message` is Pulumi's own
    /// diagnostic; `state` is the stack state after the failed run, when there
    /// is one, so that partial resources can be destroyed.
    #[error("scenario failed: {message}")]
    ProgramFailed {
        /// The diagnostics Pulumi printed (errors only).
        message: String,
        /// The stack state left behind, if any resource may exist.
        state: Option<Box<StackState>>,
    },

    /// The `pulumi` CLI (or its Go language host) cannot be run here.
    #[error("pulumi engine unavailable: {reason}")]
    EngineUnavailable {
        /// What is missing or broken, with the setup hint.
        reason: String,
    },

    /// The `pulumi` process was killed (a signal, e.g. the OOM killer or an
    /// operator) before it finished: nothing is wrong with the scenario, and
    /// the next try resumes the stack from its last checkpoint.
    #[error("pulumi was killed by signal {signal} before it finished{by}")]
    Interrupted {
        /// The signal that ended it.
        signal: i32,
        /// Who stopped it and why, when the worker's guard did (empty
        /// otherwise), e.g. " (its guard: the worker's lease was not
        /// renewed in time)".
        by: String,
    },

    /// The stored stack state could not be read back or is corrupt.
    #[error("stack state unreadable: {reason}")]
    StateCorrupt {
        /// What is wrong with it.
        reason: String,
    },

    /// A filesystem operation on a workspace or cache failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What the driver was doing.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Self::ScenarioInvalid {
            reason: reason.into(),
        }
    }

    /// Whether running the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::EngineUnavailable { .. } | Self::Interrupted { .. } | Self::Io { .. }
        )
    }
}

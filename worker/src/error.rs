//! How a command handler fails: [`HandlerError`], either the command's final
//! answer (a [`DomainError`]) or a [`Transient`] failure that sends the
//! command back to the queue. The consumer maps these to acks in one
//! place (`consumer::disposition`).
//!
//! Owns: the handler error cases and how the errors of the store, locks,
//! Pulumi driver, scenario sources and publishing become one of them. Must
//! not know: acks, backoff, dead letters (the consumer's), HTTP.

use cm_core::{
    DomainError,
    lock::LockError,
    protocol::{CommandKind, PublishError},
    stack_store::StackStoreError,
    store::StoreError,
};

use crate::{pulumi::DriverError, sources::SourceError};

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The command's final answer is this error.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Transient: retry the command later.
    #[error("retryable: {0}")]
    Transient(#[from] Transient),
}

/// Why a command is worth trying again later.
#[derive(Debug, thiserror::Error)]
pub enum Transient {
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Lock(LockError),
    #[error(transparent)]
    Driver(DriverError),
    #[error(transparent)]
    Source(SourceError),
    /// A follow-up command was not published.
    #[error("publish {kind}: {source}")]
    Publish {
        kind: CommandKind,
        #[source]
        source: PublishError,
    },
    /// The replies of follow-up commands cannot be listened to.
    #[error("subscribe: {0}")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// The lease the handler's locks hang on was lost: it was stopped.
    #[error("the worker's lease was lost mid-command")]
    LeaseLost,
    /// A record changed under the handler (what changed).
    #[error("{0}")]
    Changed(&'static str),
    /// A failed deploy's partial resources could not be destroyed yet.
    #[error("cleanup of a failed deploy failed: {0}")]
    Cleanup(#[source] DriverError),
    /// The Pulumi state store (the object store) failed.
    #[error(transparent)]
    States(StackStoreError),
    /// A stack could not be destroyed now (the scenario's error message).
    #[error("destroy failed: {0}")]
    Destroy(String),
    /// Every refill slot of the cluster stayed taken (see `--refill-slots`).
    #[error("no refill slot came free within {0:?}")]
    NoRefillSlot(std::time::Duration),
    /// The instance a create would evict is busy.
    #[error("the instance to evict is busy ({0}); retrying the create")]
    EvictionBusy(#[source] Box<Transient>),
}

impl HandlerError {
    /// A record changed under the handler: retry.
    pub fn changed(what: &'static str) -> Self {
        Self::Transient(Transient::Changed(what))
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "corrupt record");
                Self::Domain(DomainError::internal_error())
            }
            // The same write fails every time: the command's answer.
            StoreError::TooLarge(_) => Self::Domain(e.into()),
            other => Self::Transient(Transient::Store(other)),
        }
    }
}

impl From<LockError> for HandlerError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Store(s) => s.into(),
            other @ (LockError::Timeout(_) | LockError::Lost(_) | LockError::LeaseGone(_)) => {
                Self::Transient(Transient::Lock(other))
            }
        }
    }
}

impl From<DriverError> for HandlerError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::ScenarioInvalid { reason } => Self::Domain(
                DomainError::invalid(format!("invalid scenario: {reason}")).with_reason(
                    cm_core::error::reasons::SCENARIO_NON_MATCHING_SPECIFICATION,
                    None,
                ),
            ),
            DriverError::ProgramFailed { message, .. } => {
                tracing::warn!(%message, "scenario failed");
                Self::Domain(DomainError::internal(
                    "the scenario failed to deploy; its error is in the worker's log",
                ))
            }
            DriverError::StateCorrupt { reason } => {
                tracing::error!(%reason, "stack state corrupt");
                Self::Domain(DomainError::internal_error())
            }
            retry @ (DriverError::EngineUnavailable { .. }
            | DriverError::Interrupted { .. }
            | DriverError::Io { .. }) => Self::Transient(Transient::Driver(retry)),
        }
    }
}

impl From<StackStoreError> for HandlerError {
    fn from(e: StackStoreError) -> Self {
        if e.is_retryable() {
            Self::Transient(Transient::States(e))
        } else {
            tracing::error!(error = %e, "stack state unreadable");
            Self::Domain(DomainError::internal_error())
        }
    }
}

impl From<SourceError> for HandlerError {
    fn from(e: SourceError) -> Self {
        if e.is_retryable() {
            return Self::Transient(Transient::Source(e));
        }
        match e {
            SourceError::Directory(d) => Self::Domain(d),
            other => Self::Domain(DomainError::invalid(other.to_string())),
        }
    }
}

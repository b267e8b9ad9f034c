//! Command handlers, one file per command, each written saga-style: the
//! parameters it reads, its steps (each idempotent, since JetStream delivers
//! at least once), and what it undoes when a step fails.
//!
//! A handler returns the command's outcome, a [`DomainError`] that is the
//! command's final answer (not found, already exists, ...), or a retryable
//! error that sends the command back to the queue with backoff.
//!
//! Locks and fencing (see `docs/invariants.md`): a handler takes its locks,
//! then writes only through [`Locked`], whose store is fenced by them; every
//! transition of one deployed identity also takes that identity's lock
//! ([`lock_claimed`] for source-addressed commands); a handler whose lease
//! is lost is stopped ([`handle`]), its Pulumi child killed with it.

mod challenge_create;
mod challenge_delete;
mod challenge_update;
mod instance_create;
mod instance_delete;
mod instance_expire;
mod instance_renew;
mod instance_reset;
mod instance_update;
mod pool_refill;

use cm_core::{
    DomainError,
    lock::{LockError, LockGuard, LockSet},
    model::InstanceRecord,
    store::{Expect, Fence, StoreError, Versioned},
};
use cm_schemas::v1::{Command, command::Request, command_result::Outcome};

use crate::{
    context::{Ctx, Locked},
    pulumi::DriverError,
};

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The command's final answer is this error.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Transient: retry the command later.
    #[error("retryable: {0}")]
    Retry(String),
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "corrupt record");
                Self::Domain(DomainError::internal("internal error"))
            }
            other => Self::Retry(other.to_string()),
        }
    }
}

impl From<LockError> for HandlerError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Store(s) => s.into(),
            other @ (LockError::Timeout(_) | LockError::Lost(_) | LockError::LeaseGone(_)) => {
                Self::Retry(other.to_string())
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
                Self::Domain(DomainError::internal("internal error"))
            }
            retry @ (DriverError::EngineUnavailable { .. }
            | DriverError::Interrupted { .. }
            | DriverError::Io { .. }) => Self::Retry(retry.to_string()),
        }
    }
}

/// Runs the handler of `command`, stopped (its future dropped, which kills
/// a Pulumi child: `kill_on_drop`) as soon as the lease its locks hang on is
/// lost: its locks may belong to another worker by now.
pub async fn handle(ctx: &Ctx, command: &Command) -> Result<Outcome, HandlerError> {
    let lost = ctx.session.lost();
    tokio::select! {
        biased;
        () = lost.cancelled() => {
            tracing::error!("the worker's lease was lost: this handler is stopped, its locks are gone");
            Err(HandlerError::Retry("the worker's lease was lost mid-command".into()))
        }
        // Boxed: handler futures are large, and the select would hold one
        // inline on a worker thread's stack (it overflowed in debug builds).
        outcome = Box::pin(dispatch(ctx, command)) => outcome,
    }
}

async fn dispatch(ctx: &Ctx, command: &Command) -> Result<Outcome, HandlerError> {
    let id = command.command_id.as_str();
    let Some(request) = &command.request else {
        return Err(DomainError::invalid("empty command").into());
    };
    match request {
        Request::ChallengeCreate(r) => challenge_create::handle(ctx, id, r).await,
        Request::ChallengeUpdate(r) => challenge_update::handle(ctx, id, r).await,
        Request::ChallengeDelete(r) => challenge_delete::handle(ctx, id, r).await,
        Request::InstanceCreate(r) => instance_create::handle(ctx, id, r).await,
        Request::InstanceRenew(r) => instance_renew::handle(ctx, id, r).await,
        Request::InstanceDelete(r) => instance_delete::handle(ctx, id, r).await,
        Request::InstanceExpire(r) => instance_expire::handle(ctx, id, r).await,
        Request::PoolRefill(r) => pool_refill::handle(ctx, id, r).await,
        Request::InstanceReset(r) => instance_reset::handle(ctx, id, r).await,
        Request::InstanceUpdate(r) => instance_update::handle(ctx, id, r).await,
    }
}

/// The stored stack state of an instance, parsed.
pub(crate) async fn stack_state(
    ctx: &Ctx,
    cid: &str,
    identity: &cm_core::Identity,
) -> Result<Option<crate::pulumi::StackState>, HandlerError> {
    match ctx.store.get_stack(cid, identity).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            tracing::error!(error = %e, "stored stack state does not parse");
            HandlerError::Domain(DomainError::internal("internal error"))
        }),
    }
}

/// `up` of an instance's own stack, each checkpoint stored as Pulumi writes
/// it (see `pulumi::CheckpointSink`): a worker killed mid-run leaves the
/// state of what it deployed for the next delivery to resume from.
pub(crate) async fn up_persisted(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    record: &cm_core::model::InstanceRecord,
    additional: &std::collections::BTreeMap<String, String>,
    previous: Option<&crate::pulumi::StackState>,
) -> Result<crate::pulumi::Deployment, DriverError> {
    let (sink, writer) = persist_checkpoints(ctx, record);
    // Boxed (here and below): the driver's futures are large, and nested
    // inline in a handler's they overflowed a worker thread's stack.
    let result = Box::pin(ctx.driver.up_with(
        scenario,
        &record.identity,
        additional,
        previous,
        Some(&sink),
    ))
    .await;
    drop(sink);
    let _ = writer.await;
    result
}

/// `destroy` of an instance's stack, checkpoints stored as they come.
pub(crate) async fn destroy_persisted(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    record: &cm_core::model::InstanceRecord,
    state: &crate::pulumi::StackState,
) -> Result<crate::pulumi::StackState, DriverError> {
    let (sink, writer) = persist_checkpoints(ctx, record);
    let result = Box::pin(ctx.driver.destroy_with(scenario, state, Some(&sink))).await;
    drop(sink);
    let _ = writer.await;
    result
}

/// A sink whose checkpoints a background task writes to the instance's
/// stack key, latest first, through the fenced store (a stale run's
/// checkpoints are refused); the task ends once the sink is dropped and the
/// last checkpoint is written.
fn persist_checkpoints(
    ctx: &Locked<'_>,
    record: &cm_core::model::InstanceRecord,
) -> (crate::pulumi::CheckpointSink, tokio::task::JoinHandle<()>) {
    let (sink, mut rx) = crate::pulumi::CheckpointSink::channel();
    let store = ctx.store.clone();
    let (cid, identity) = (record.challenge_id.clone(), record.identity.clone());
    let writer = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some(state) = rx.borrow_and_update().clone() else {
                continue;
            };
            let Ok(bytes) = serde_json::to_vec(&state) else {
                continue;
            };
            if let Err(e) = store.put_stack(&cid, &identity, bytes).await {
                tracing::warn!(error = %e, "checkpoint not stored; the final state still will be");
            }
        }
    });
    (sink, writer)
}

/// Destroys an instance's stack (when it has state) and deletes its records,
/// guarded by the revision the caller read under its locks.
pub(crate) async fn destroy_instance(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    versioned: &Versioned<InstanceRecord>,
) -> Result<(), HandlerError> {
    let rec = &versioned.value;
    if let Some(state) = stack_state(ctx, &rec.challenge_id, &rec.identity).await? {
        destroy_persisted(ctx, scenario, rec, &state)
            .await
            .map_err(|e| match e {
                // A stack that cannot be destroyed now is retried, not forgotten.
                DriverError::ProgramFailed { message, .. } => {
                    HandlerError::Retry(format!("destroy failed: {message}"))
                }
                other => other.into(),
            })?;
    }
    ctx.store
        .delete_instance_if(rec, Expect::Revision(versioned.mod_revision))
        .await?;
    Ok(())
}

/// The configuration an instance's program sees: the challenge's
/// `additional`, overridden by the instance's own.
pub(crate) fn merged_additional(
    challenge: &cm_core::model::ChallengeRecord,
    record: &cm_core::model::InstanceRecord,
) -> std::collections::BTreeMap<String, String> {
    let mut additional = challenge.additional.clone();
    additional.extend(record.additional.clone());
    additional
}

/// Copies a deployment's outputs onto `record` and writes the record with
/// the new stack state; returns the record's new revision.
pub(crate) async fn store_deployment(
    ctx: &Locked<'_>,
    record: &mut cm_core::model::InstanceRecord,
    deployment: crate::pulumi::Deployment,
    expect: cm_core::store::Expect,
    previous: Option<&cm_core::model::InstanceRecord>,
) -> Result<i64, HandlerError> {
    record.connection_info = deployment.outputs.connection_info;
    record.flags = deployment.outputs.flags;
    let stack = encode_state(&deployment.state)?;
    Ok(ctx
        .store
        .put_instance_rev(record, Some(&stack), expect, previous)
        .await?)
}

/// The locks of a command addressed to a source's claimed instance
/// (delete, reset, expiry): the challenge read lock and the slot's, then the
/// lock of the identity the slot holds, with the record read under them.
pub(crate) struct ClaimLocks {
    slot: LockSet,
    identity: Option<LockGuard>,
    /// The claimed record (none: the slot is empty), read once every lock
    /// was held; its revision guards the command's final write.
    pub record: Option<Versioned<InstanceRecord>>,
}

impl ClaimLocks {
    /// The fence of every lock held.
    pub fn fence(&self) -> Fence {
        match &self.identity {
            Some(g) => self.slot.fence().and(&g.fence()),
            None => self.slot.fence(),
        }
    }

    /// Releases every lock (in the background).
    pub fn release(self) {
        drop(self.identity);
        self.slot.release();
    }
}

/// Takes the locks of a source's claimed instance. The identity is known
/// only once the slot is read, so its lock comes second; the slot is read
/// again under it, since a blue-green update (which holds only the identity
/// lock) may have switched the slot to a new identity meanwhile.
pub(crate) async fn lock_claimed(
    ctx: &Ctx,
    cid: &str,
    sid: &str,
) -> Result<ClaimLocks, HandlerError> {
    lock_claimed_within(ctx, cid, sid, ctx.lock_timeout).await
}

/// [`lock_claimed`], each wait at most `timeout`.
pub(crate) async fn lock_claimed_within(
    ctx: &Ctx,
    cid: &str,
    sid: &str,
    timeout: std::time::Duration,
) -> Result<ClaimLocks, HandlerError> {
    let slot = ctx.lock_instance_within(cid, sid, timeout).await?;
    for _ in 0..4 {
        let Some(seen) = ctx.store.get_instance(cid, sid).await? else {
            return Ok(ClaimLocks {
                slot,
                identity: None,
                record: None,
            });
        };
        let guard = ctx
            .lock_identity_within(cid, &seen.value.identity, timeout)
            .await?;
        match ctx.store.get_instance(cid, sid).await? {
            Some(now) if now.value.identity == seen.value.identity => {
                return Ok(ClaimLocks {
                    slot,
                    identity: Some(guard),
                    record: Some(now),
                });
            }
            None => {
                guard.release();
                return Ok(ClaimLocks {
                    slot,
                    identity: None,
                    record: None,
                });
            }
            Some(_) => guard.release_now().await,
        }
    }
    Err(HandlerError::Retry(format!(
        "the instance of {cid} for {sid} kept changing identity"
    )))
}

/// Serialises stack state for the store.
pub(crate) fn encode_state(state: &crate::pulumi::StackState) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(state)
        .map_err(|e| HandlerError::Domain(DomainError::internal(format!("internal error: {e}"))))
}

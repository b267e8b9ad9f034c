//! The two steps every replacement of an instance's stack shares (a reset,
//! a blue/green update): deploying under a fresh identity, and retiring
//! the identity it replaced once the record names the fresh one.
//!
//! What makes a crash at any point recoverable: a stack with resources
//! always has its state in the store, under its own identity (checkpoints
//! are stored as Pulumi writes them), and a stack no record names is an
//! orphan that the janitor's sweep hands to `stack.reclaim` once nobody
//! holds its identity's lock. So the steps record nothing more:
//!
//! 1. lock the fresh identity (the sweep leaves a locked stack alone) and
//!    deploy it, checkpoints stored; a failed deploy is destroyed and its
//!    state deleted (a destroy that fails leaves an orphan, reclaimed later);
//! 2. (the caller) switch the record to the fresh identity in one guarded,
//!    fenced transaction that leaves the old stack's state in place, then
//!    release the fresh lock;
//! 3. destroy the old stack and delete its state; a destroy that fails (or
//!    a worker that dies first) leaves an orphan, reclaimed later.

use cm_core::{Identity, lock::LockGuard, model::InstanceRecord};

use super::{HandlerError, destroy_persisted, undo_failed_deploy, up_persisted};
use crate::{
    context::Locked,
    pulumi::{Deployment, DriverError, PreparedScenario, StackState},
};

/// A fresh identity's deployment, with the lock that keeps the orphan
/// sweep away from it until the record names it.
pub(crate) struct Fresh {
    pub deployment: Deployment,
    pub lock: LockGuard,
}

/// Step 1: deploys `record` (its identity a new one) from nothing. `Err`
/// after undoing what a failed program left.
pub(crate) async fn deploy(
    ctx: &Locked<'_>,
    scenario: &PreparedScenario,
    record: &InstanceRecord,
    additional: &std::collections::BTreeMap<String, String>,
) -> Result<Fresh, HandlerError> {
    let lock = ctx
        .lock_identity(&record.challenge_id, &record.identity)
        .await?;
    let fresh = ctx.also(&lock);
    match up_persisted(&fresh, scenario, record, additional, None).await {
        Ok(deployment) => Ok(Fresh { deployment, lock }),
        Err(DriverError::ProgramFailed { message, state }) => {
            if undo_failed_deploy(&fresh, scenario, record, state)
                .await
                .is_ok()
            {
                crate::stacks::delete(&fresh, &record.challenge_id, &record.identity).await?;
            }
            Err(DriverError::ProgramFailed {
                message,
                state: None,
            }
            .into())
        }
        Err(other) => Err(other.into()),
    }
}

/// Step 3: destroys the stack of `old` (the record as it was before the
/// switch; its identity's lock held) and deletes its state. A destroy that
/// fails is left to the orphan sweep: the command that switched succeeded.
pub(crate) async fn retire(
    ctx: &Locked<'_>,
    scenario: &PreparedScenario,
    old: &InstanceRecord,
    state: Option<&StackState>,
) -> Result<(), HandlerError> {
    if let Some(state) = state
        && let Err(e) =
            destroy_persisted(ctx, scenario, &old.challenge_id, &old.identity, state).await
    {
        tracing::error!(error = %e, identity = %old.identity, "replaced stack not destroyed; the janitor's orphan sweep reclaims it");
        return Ok(());
    }
    crate::stacks::delete(ctx, &old.challenge_id, &old.identity).await
}

/// A copy of `record` under a new identity, answering `command_id`.
pub(crate) fn under_new_identity(record: &InstanceRecord, command_id: &str) -> InstanceRecord {
    let mut fresh = record.clone();
    fresh.identity = Identity::random();
    fresh.command_id = command_id.to_owned();
    fresh
}

//! `instance.reset`: redeploy an instance from scratch, the "restart" button:
//! same claim (source, since, until), new identity, fresh infrastructure.
//!
//! Parameters: challenge id, source id.
//! Steps: 1. read-lock the challenge and lock the slot, then the identity the
//! slot holds (fenced writes); 2. deploy a new stack
//! under a new identity; 3. write the record with the new identity and state;
//! 4. destroy the old stack and delete its state.
//! Undo: if 2 fails, destroy what it left; the old instance is untouched.
//! A crash between 3 and 4 leaves the old stack's state in the store (under
//! its identity) for a later destroy; nothing is lost.

use cm_core::{DomainError, Identity, ids, store::Expect};
use cm_schemas::v1::{ResetInstanceRequest, command_result::Outcome};

use super::{HandlerError, lock_claimed, merged_additional, stack_state, store_deployment};
use crate::{
    context::{Ctx, Locked},
    pulumi::DriverError,
};

#[tracing::instrument(name = "instance.reset", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &ResetInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    let locks = lock_claimed(ctx, &req.challenge_id, &req.source_id).await?;
    let locked = ctx.locked(&locks.fence());
    let result = reset(&locked, locks.record.clone(), command_id, req).await;
    locks.release();
    result
}

async fn reset(
    ctx: &Locked<'_>,
    instance: Option<cm_core::store::Versioned<cm_core::model::InstanceRecord>>,
    command_id: &str,
    req: &ResetInstanceRequest,
) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let Some(instance) = instance else {
        return Err(DomainError::instance_not_found(cid, sid).into());
    };
    let (previous, revision) = (instance.value, instance.mod_revision);
    if previous.command_id == command_id {
        return Ok(Outcome::Instance(previous.to_api()));
    }
    let challenge = ctx.challenge(cid).await?;
    let scenario = ctx.scenario(&challenge.scenario).await?;
    let additional = merged_additional(&challenge, &previous);

    let identity = Identity::random();
    let deployment = match ctx.driver.up(&scenario, &identity, &additional, None).await {
        Ok(d) => d,
        Err(DriverError::ProgramFailed { message, state }) => {
            if let Some(state) = state.filter(|s| s.resource_count() > 0) {
                let _ = ctx.driver.destroy(&scenario, &state).await;
            }
            return Err(DriverError::ProgramFailed {
                message,
                state: None,
            }
            .into());
        }
        Err(other) => return Err(other.into()),
    };
    let mut record = previous.clone();
    record.identity = identity;
    record.command_id = command_id.to_owned();
    store_deployment(
        ctx,
        &mut record,
        deployment,
        Expect::Revision(revision),
        Some(&previous),
    )
    .await?;

    if let Some(old) = stack_state(ctx, cid, &previous.identity).await?
        && let Err(e) = ctx.driver.destroy(&scenario, &old).await
    {
        tracing::error!(error = %e, identity = %previous.identity, "old stack not destroyed; its state is kept");
        return Ok(Outcome::Instance(record.to_api()));
    }
    ctx.store.delete_stack(cid, &previous.identity).await?;
    Ok(Outcome::Instance(record.to_api()))
}

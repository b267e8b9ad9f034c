//! `instance.reset`: redeploy an instance from scratch, the "restart" button:
//! same claim (source, since, until), new identity, fresh infrastructure.
//!
//! Parameters: challenge id, source id.
//! Steps: 1. read-lock the challenge and lock the slot, then the identity the
//! slot holds (fenced writes); 2. lock a new identity and deploy it, its
//! checkpoints stored as they come (`fresh::deploy`); 3. write the record
//! with the new identity and state, guarded by the revision read in 1, the
//! old stack's state left in place; 4. destroy the old stack and delete its
//! state (`fresh::retire`).
//! Undo: if 2 fails, destroy what it left; the old instance is untouched.
//! A crash (or a failed destroy) anywhere leaves a stack no record names,
//! with its state: the janitor's orphan sweep has it reclaimed. A
//! redelivery after 3 answers the switched record.

use cm_core::{DomainError, store::Expect};
use cm_schemas::v1::{ResetInstanceRequest, command_result::Outcome};

use super::{HandlerError, fresh, merged_additional, on_claimed, store_deployment};
use crate::{
    context::{Ctx, Locked},
    failpoint::{self, Waits},
};

#[tracing::instrument(name = "instance.reset", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &ResetInstanceRequest,
) -> Result<Outcome, HandlerError> {
    on_claimed(
        ctx,
        &req.challenge_id,
        &req.source_id,
        async |locked, record| reset(locked, record, command_id, req).await,
    )
    .await
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

    let mut record = fresh::under_new_identity(&previous, command_id);
    let fresh = fresh::deploy(ctx, &scenario, &record, &additional).await?;
    let switched = store_deployment(
        &ctx.also(&fresh.lock),
        &challenge,
        &mut record,
        fresh.deployment,
        Expect::Revision(revision),
        Some(&previous),
    )
    .await;
    fresh.lock.release();
    switched?;
    failpoint::pause("instance-reset-before-retire", "", Waits::First).await;
    let old = crate::stacks::load(ctx, cid, &previous.identity).await?;
    fresh::retire(ctx, &scenario, &previous, old.as_ref()).await?;
    Ok(Outcome::Instance(record.to_api()))
}

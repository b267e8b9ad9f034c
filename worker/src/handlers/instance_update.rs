//! `instance.update`: apply the challenge's current scenario to one running
//! instance (pooled or claimed), published by `challenge.update`.
//!
//! Parameters: challenge id, the instance's identity, the strategy.
//! Steps: 1. find the instance; lock the challenge for reading (and the
//! source's slot when claimed); 2. by strategy:
//! - `update_in_place`: `pulumi up` of the new program on the same stack;
//! - `recreate`: destroy, then deploy a fresh stack under the same identity;
//! - `blue_green`: deploy a new identity, switch the record (the source keeps
//!   its claim), then destroy the old stack;
//!
//! 3. write the record, guarded by the revision read in step 1.
//!
//! Undo: when the new deploy fails, the record keeps the previous state
//! (blue_green destroys the half-made green stack; recreate reports the
//! instance lost its stack, which a reset or delete then handles).

use cm_core::{DomainError, Identity, model::InstanceRecord, store::Expect};
use cm_schemas::v1::{UpdateInstance, UpdateStrategy, command_result::Outcome};

use super::{
    HandlerError, destroy_persisted, encode_state, merged_additional, stack_state, up_persisted,
};
use crate::{context::Ctx, pulumi::DriverError};

#[tracing::instrument(name = "instance.update", skip_all, fields(challenge = %req.challenge_id, identity = %req.identity, strategy))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &UpdateInstance,
) -> Result<Outcome, HandlerError> {
    let cid = &req.challenge_id;
    let strategy = UpdateStrategy::try_from(req.strategy).unwrap_or(UpdateStrategy::UpdateInPlace);
    tracing::Span::current().record("strategy", strategy.as_str_name());
    let find = |all: Vec<InstanceRecord>| {
        all.into_iter()
            .find(|r| r.identity.as_str() == req.identity)
    };
    let all = ctx.store.list_instances(cid).await?;
    // Redelivered after this very command switched the instance to a new
    // identity (blue/green) but before it settled: the switched record is
    // its answer, not "gone".
    if let Some(done) = all
        .iter()
        .find(|r| r.command_id == command_id && r.identity.as_str() != req.identity)
    {
        return Ok(Outcome::Instance(done.to_api()));
    }
    let Some(seen) = find(all) else {
        // Deleted or claimed-and-reset meanwhile: nothing to update.
        return Err(DomainError::not_found(format!("instance {} is gone", req.identity)).into());
    };
    let locks = match &seen.source_id {
        Some(sid) => ctx.lock_instance(cid, sid).await?,
        None => ctx.lock_pool(cid).await?,
    };
    let result = update(ctx, command_id, req, strategy).await;
    locks.release();
    result
}

async fn update(
    ctx: &Ctx,
    command_id: &str,
    req: &UpdateInstance,
    strategy: UpdateStrategy,
) -> Result<Outcome, HandlerError> {
    let cid = &req.challenge_id;
    let challenge = ctx.challenge(cid).await?;
    // Re-read under the lock, with the revision guarding the final write.
    let current = ctx
        .store
        .list_instances(cid)
        .await?
        .into_iter()
        .find(|r| r.identity.as_str() == req.identity);
    let Some(previous) = current else {
        return Err(DomainError::not_found(format!("instance {} is gone", req.identity)).into());
    };
    let scenario = ctx.scenario(&challenge.scenario).await?;
    let additional = merged_additional(&challenge, &previous);
    let old_state = stack_state(ctx, cid, &previous.identity).await?;

    let mut record = previous.clone();
    record.command_id = command_id.to_owned();
    let deployment = match strategy {
        UpdateStrategy::UpdateInPlace => {
            up_persisted(ctx, &scenario, &record, &additional, old_state.as_ref()).await?
        }
        UpdateStrategy::Recreate => {
            let emptied = match &old_state {
                Some(state) => Some(destroy_persisted(ctx, &scenario, &record, state).await?),
                None => None,
            };
            up_persisted(ctx, &scenario, &record, &additional, emptied.as_ref()).await?
        }
        UpdateStrategy::BlueGreen => {
            let green = Identity::random();
            match ctx.driver.up(&scenario, &green, &additional, None).await {
                Ok(d) => {
                    record.identity = green;
                    d
                }
                Err(DriverError::ProgramFailed { message, state }) => {
                    if let Some(state) = state {
                        let _ = ctx.driver.destroy(&scenario, &state).await;
                    }
                    return Err(DriverError::ProgramFailed {
                        message,
                        state: None,
                    }
                    .into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    record.connection_info = deployment.outputs.connection_info;
    record.flags = deployment.outputs.flags;
    let stack = encode_state(&deployment.state)?;
    if record.identity != previous.identity && previous.source_id.is_none() {
        // A pooled instance's record is keyed by identity: replace it.
        ctx.store.delete_instance(&previous).await?;
        ctx.store
            .put_instance(&record, Some(&stack), Expect::Absent, None)
            .await?;
    } else {
        ctx.store
            .put_instance(&record, Some(&stack), Expect::Any, Some(&previous))
            .await?;
    }
    if record.identity != previous.identity {
        // Blue/green: the green stack serves; the blue one goes.
        if let Some(state) = &old_state
            && let Err(e) = ctx.driver.destroy(&scenario, state).await
        {
            tracing::error!(error = %e, identity = %previous.identity, "old stack not destroyed; its state is kept");
            return Ok(Outcome::Instance(record.to_api()));
        }
        ctx.store.delete_stack(cid, &previous.identity).await?;
    }
    Ok(Outcome::Instance(record.to_api()))
}

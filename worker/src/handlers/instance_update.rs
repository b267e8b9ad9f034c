//! `instance.update`: apply the challenge's current scenario to one running
//! instance (pooled or claimed), published by `challenge.update`.
//!
//! Parameters: challenge id, the instance's identity, the strategy.
//! Steps: 1. lock the challenge for reading and the instance's identity
//! (every transition of that identity takes it: a pool claim cannot take it
//! meanwhile, a delete or reset of its source waits), then find the instance
//! (pooled or claimed) under the lock; 2. by strategy:
//! - `update_in_place`: `pulumi up` of the new program on the same stack;
//! - `recreate`: destroy, then deploy a fresh stack under the same identity;
//! - `blue_green`: deploy a new identity (`fresh::deploy`), switch the
//!   record (the source keeps its claim), then destroy the old stack
//!   (`fresh::retire`);
//!
//! 3. write the record, guarded by the revision read in step 1 and fenced
//!    by the locks. A claimed record may have been renewed meanwhile (renew
//!    takes only the slot's lock and changes only `until`): the write is then
//!    made again on the renewed record, keeping its `until`.
//!
//! Undo: when the new deploy fails, the record keeps the previous state
//! (blue_green destroys the half-made green stack; recreate reports the
//! instance lost its stack, which a reset or delete then handles). A
//! blue/green whose worker dies, or whose blue destroy fails, leaves a stack
//! no record names: the janitor's orphan sweep has it reclaimed.

use cm_core::{
    DomainError, Identity,
    store::{Expect, StoreError},
};
use cm_schemas::v1::{UpdateInstance, UpdateStrategy, command_result::Outcome};

use super::{
    HandlerError, deployed_from, destroy_persisted, fresh, merged_additional, up_persisted,
};
use crate::{
    context::{Ctx, Locked},
    failpoint::{self, Waits},
};

#[tracing::instrument(name = "instance.update", skip_all, fields(challenge = %req.challenge_id, identity = %req.identity, strategy))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &UpdateInstance,
) -> Result<Outcome, HandlerError> {
    let cid = &req.challenge_id;
    let strategy = UpdateStrategy::try_from(req.strategy).unwrap_or(UpdateStrategy::UpdateInPlace);
    tracing::Span::current().record("strategy", strategy.as_str_name());
    let identity: Identity = req
        .identity
        .parse()
        .map_err(|_| DomainError::invalid(format!("malformed identity {:?}", req.identity)))?;
    let locks = ctx.lock_challenge_identity(cid, &identity).await?;
    let locked = ctx.locked(&locks.fence());
    let result = update(&locked, command_id, req, &identity, strategy).await;
    locks.release();
    result
}

async fn update(
    ctx: &Locked<'_>,
    command_id: &str,
    req: &UpdateInstance,
    identity: &Identity,
    strategy: UpdateStrategy,
) -> Result<Outcome, HandlerError> {
    let cid = &req.challenge_id;
    let challenge = ctx.challenge(cid).await?;
    // Read under the identity's lock, with the revision guarding the final write.
    let Some(found) = ctx.store.find_identity(cid, identity).await? else {
        // Redelivered after this very command switched the instance to a new
        // identity (blue/green) but before it settled: the switched record is
        // its answer, not "gone".
        if let Some(done) = ctx
            .store
            .list_instances(cid)
            .await?
            .into_iter()
            .find(|r| r.command_id == command_id && r.identity != *identity)
        {
            return Ok(Outcome::Instance(done.to_api()));
        }
        // Deleted or reset meanwhile: nothing to update.
        return Err(DomainError::not_found(format!("instance {} is gone", req.identity)).into());
    };
    let (previous, revision) = (found.value, found.mod_revision);
    if previous.deployed_from.as_deref() == Some(deployed_from(&challenge, &previous).as_str()) {
        // Updated already (by an earlier copy of this update, published by
        // another delivery of the challenge update): nothing to run.
        return Ok(Outcome::Instance(previous.to_api()));
    }
    let scenario = ctx.scenario(&challenge.scenario).await?;
    let additional = merged_additional(&challenge, &previous);
    let old_state = crate::stacks::load(ctx, cid, &previous.identity).await?;

    let mut record = previous.clone();
    record.command_id = command_id.to_owned();
    // Blue/green: the green identity's lock, held until the record names it.
    let mut green_lock = None;
    let deployment = match strategy {
        UpdateStrategy::UpdateInPlace => {
            up_persisted(ctx, &scenario, &record, &additional, old_state.as_ref()).await?
        }
        UpdateStrategy::Recreate => {
            let emptied = match &old_state {
                Some(state) => {
                    Some(destroy_persisted(ctx, &scenario, cid, &record.identity, state).await?)
                }
                None => None,
            };
            up_persisted(ctx, &scenario, &record, &additional, emptied.as_ref()).await?
        }
        UpdateStrategy::BlueGreen => {
            record = fresh::under_new_identity(&previous, command_id);
            let green = fresh::deploy(ctx, &scenario, &record, &additional).await?;
            green_lock = Some(green.lock);
            green.deployment
        }
    };
    failpoint::pause("instance-update-before-write", "", Waits::First).await;
    record.connection_info = deployment.outputs.connection_info;
    record.flags = deployment.outputs.flags;
    record.deployed_from = Some(deployed_from(&challenge, &record));
    let state = &deployment.state;
    let written = match &green_lock {
        Some(lock) => write_update(&ctx.also(lock), &mut record, state, &previous, revision).await,
        None => write_update(ctx, &mut record, state, &previous, revision).await,
    };
    if let Some(lock) = green_lock {
        lock.release();
    }
    written?;
    if record.identity != previous.identity {
        // Blue/green: the green stack serves; the blue one goes.
        fresh::retire(ctx, &scenario, &previous, old_state.as_ref()).await?;
    }
    Ok(Outcome::Instance(record.to_api()))
}

/// Writes the updated `record` (its new stack `state`) over `previous`,
/// read at `revision`. A pooled instance's record is keyed by identity: a
/// new one replaces the old in one transaction that leaves the old stack's
/// state for the blue one's destroy.
async fn write_update(
    ctx: &Locked<'_>,
    record: &mut cm_core::model::InstanceRecord,
    state: &crate::pulumi::StackState,
    previous: &cm_core::model::InstanceRecord,
    revision: i64,
) -> Result<(), HandlerError> {
    let staged = crate::stacks::stage(ctx, &record.challenge_id, &record.identity, state).await?;
    let written = if record.identity != previous.identity && previous.source_id.is_none() {
        ctx.store
            .replace_pooled(previous, revision, record, staged.write())
            .await
            .map_err(HandlerError::from)
    } else {
        write_over(ctx, record, staged.write(), previous, revision).await
    };
    staged
        .settle(ctx, crate::stacks::Committed::of_step(&written))
        .await;
    written
}

/// Writes the updated record over `previous` (read at `revision`). When a
/// renew moved a claimed record's `until` meanwhile (renew holds the slot's
/// lock, not the identity's, and touches only `last_renew`/`until`), the
/// record is read again and the update written over the renewed one.
async fn write_over(
    ctx: &Locked<'_>,
    record: &mut cm_core::model::InstanceRecord,
    stack: cm_core::store::PointerWrite<'_>,
    previous: &cm_core::model::InstanceRecord,
    revision: i64,
) -> Result<(), HandlerError> {
    let (mut base, mut rev) = (previous.clone(), revision);
    for _ in 0..4 {
        match ctx
            .store
            .put_instance(record, Some(stack), Expect::Revision(rev), Some(&base))
            .await
        {
            Ok(()) => return Ok(()),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(sid) = &previous.source_id else {
            return Err(HandlerError::changed("the pooled record changed"));
        };
        let Some(now) = ctx.store.get_instance(&previous.challenge_id, sid).await? else {
            return Err(HandlerError::changed("the claimed record vanished"));
        };
        if now.value.identity != previous.identity {
            return Err(HandlerError::changed("the claimed record changed identity"));
        }
        record.last_renew = now.value.last_renew;
        record.until = now.value.until;
        (base, rev) = (now.value, now.mod_revision);
    }
    Err(HandlerError::changed("the record kept changing"))
}

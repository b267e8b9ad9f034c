//! `stack.reclaim`: destroy a stack nobody answers for, published by the
//! janitor's orphan sweep: a stack no record names (the fresh stack of a
//! reset or blue/green update whose worker died before the switch, or the
//! stack such a switch replaced whose destroy failed or never ran, see
//! `fresh`), or a pool reservation left `Deploying` by a refill that died.
//!
//! Parameters: challenge id, identity.
//! Steps: 1. read-lock the challenge and lock the identity (what every
//! transition of that identity takes; a deploy of a fresh identity holds it
//! until a record names it, a refill until its reservation is ready);
//! 2. under the locks, if a record names the identity (other than a pool
//! reservation still `Deploying`), or nothing is stored for it, do nothing;
//! 3. destroy the stack, checkpoints stored, and delete its state (and the
//! abandoned reservation, guarded by the revision read in 2, then ask for a
//! refill).
//! Undo: none; a failed destroy keeps the state and is retried (the command
//! is redelivered, and the sweep publishes it again).

use cm_core::{DomainError, Identity};
use cm_schemas::v1::{Deleted, ReclaimStack, command_result::Outcome};

use super::{HandlerError, destroy_instance, destroy_or_retry};
use crate::context::{Ctx, Locked};

#[tracing::instrument(name = "stack.reclaim", skip_all, fields(challenge = %req.challenge_id, identity = %req.identity))]
pub async fn handle(
    ctx: &Ctx,
    _command_id: &str,
    req: &ReclaimStack,
) -> Result<Outcome, HandlerError> {
    let cid = &req.challenge_id;
    cm_core::ids::validate("challenge id", cid)?;
    let identity: Identity = req
        .identity
        .parse()
        .map_err(|_| DomainError::invalid(format!("malformed identity {:?}", req.identity)))?;
    let locks = ctx.lock_challenge_identity(cid, &identity).await?;
    let result = reclaim(&ctx.locked(&locks.fence()), cid, &identity).await;
    locks.release();
    result
}

async fn reclaim(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &Identity,
) -> Result<Outcome, HandlerError> {
    if let Some(named) = ctx.store.find_identity(cid, identity).await? {
        let abandoned = named.value.source_id.is_none()
            && named.value.status == cm_core::model::InstanceStatus::Deploying;
        if !abandoned {
            tracing::info!("a record names this stack: not an orphan, kept");
            return Ok(Outcome::Instance(named.value.to_api()));
        }
        let challenge = ctx.challenge(cid).await?;
        let scenario = ctx.scenario(&challenge.scenario).await?;
        destroy_instance(ctx, &scenario, &named).await?;
        tracing::info!("abandoned pool reservation destroyed");
        ctx.request_refill(cid).await;
        return Ok(Outcome::Deleted(Deleted {}));
    }
    let Some(state) = crate::stacks::load(ctx, cid, identity).await? else {
        return Ok(Outcome::Deleted(Deleted {}));
    };
    let challenge = ctx.challenge(cid).await?;
    let scenario = ctx.scenario(&challenge.scenario).await?;
    if state.may_hold_resources() {
        destroy_or_retry(ctx, &scenario, cid, identity, &state).await?;
    }
    crate::stacks::delete(ctx, cid, identity).await?;
    tracing::info!(
        resources = state.resource_count(),
        "orphaned stack destroyed"
    );
    Ok(Outcome::Deleted(Deleted {}))
}

//! `instance.delete`: destroy an instance and forget it.
//!
//! Parameters: challenge id, source id.
//! Steps: 1. read-lock the challenge and lock the slot (together); 2. destroy the stack
//! (when it has state); 3. delete the records in one transaction.
//! Undo: none; a failed destroy is retried with the records intact.

use cm_core::{DomainError, ids};
use cm_schemas::v1::{DeleteInstanceRequest, Deleted, command_result::Outcome};

use super::{HandlerError, destroy_instance};
use crate::context::Ctx;

#[tracing::instrument(name = "instance.delete", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id))]
pub async fn handle(
    ctx: &Ctx,
    _command_id: &str,
    req: &DeleteInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    let locks = ctx.lock_instance(&req.challenge_id, &req.source_id).await?;
    let result = delete(ctx, req).await;
    locks.release();
    result
}

async fn delete(ctx: &Ctx, req: &DeleteInstanceRequest) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let Some(instance) = ctx.store.get_instance(cid, sid).await? else {
        return Err(DomainError::not_found(format!(
            "no instance of challenge {cid} for source {sid}"
        ))
        .into());
    };
    let challenge = ctx.challenge(cid).await?;
    let scenario = ctx.scenario(&challenge.scenario).await?;
    destroy_instance(ctx, &scenario, &instance.value).await?;
    if challenge.min > 0 {
        ctx.request_refill(cid).await;
    }
    Ok(Outcome::Deleted(Deleted {}))
}

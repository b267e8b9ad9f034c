//! `instance.expire`: the janitor saw an instance past its `until`; destroy it.
//!
//! Parameters: challenge id, source id, and the identity and `until` the
//! janitor saw.
//! Steps: 1. read-lock the challenge and lock the slot, then the identity the
//! slot holds (fenced writes, see `instance_delete`); 2. if the instance is
//! gone, or is another identity, or its `until` moved (renewed after the
//! janitor looked), do nothing; 3. otherwise destroy it and delete its records.
//! Undo: none; a failed destroy is retried with the records intact.

use cm_schemas::v1::{Deleted, ExpireInstance, command_result::Outcome};

use super::{HandlerError, destroy_instance, on_claimed};
use crate::context::{Ctx, Locked};

#[tracing::instrument(name = "instance.expire", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id))]
pub async fn handle(
    ctx: &Ctx,
    _command_id: &str,
    req: &ExpireInstance,
) -> Result<Outcome, HandlerError> {
    on_claimed(
        ctx,
        &req.challenge_id,
        &req.source_id,
        async |locked, record| expire(locked, record.as_ref(), req).await,
    )
    .await
}

async fn expire(
    ctx: &Locked<'_>,
    instance: Option<&cm_core::store::Versioned<cm_core::model::InstanceRecord>>,
    req: &ExpireInstance,
) -> Result<Outcome, HandlerError> {
    let cid = &req.challenge_id;
    let Some(instance) = instance else {
        return Ok(Outcome::Deleted(Deleted {}));
    };
    let rec = &instance.value;
    if rec.identity.as_str() != req.identity || rec.until != req.until {
        tracing::info!("instance renewed or replaced since the janitor looked; kept");
        return Ok(Outcome::Instance(rec.to_api()));
    }
    let challenge = ctx.challenge(cid).await?;
    let scenario = ctx.scenario(&challenge.scenario).await?;
    destroy_instance(ctx, &scenario, instance).await?;
    if challenge.min > 0 {
        ctx.request_refill(cid).await;
    }
    Ok(Outcome::Deleted(Deleted {}))
}

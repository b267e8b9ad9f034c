//! `instance.delete`: destroy an instance and forget it.
//!
//! Parameters: challenge id, source id, `force`.
//! Steps: 1. read-lock the challenge and lock the slot (together), then the
//! lock of the identity the slot holds; 2. destroy the stack (when it has
//! state); 3. delete the records in one transaction, guarded by the revision
//! read under the locks and fenced by them.
//! Undo: none; a failed destroy is retried with the records intact.
//! Forced (an operator's escape hatch for an instance stuck in a failed
//! state): a destroy that fails, or cannot even start (challenge gone,
//! scenario unusable, state corrupt), is logged with what the stack still
//! holds, and the records are deleted anyway.

use cm_core::{
    DomainError, ids,
    store::{Expect, Versioned},
};
use cm_schemas::v1::{DeleteInstanceRequest, Deleted, command_result::Outcome};

use super::{HandlerError, destroy_instance, lock_claimed};
use crate::context::{Ctx, Locked};
use cm_core::model::InstanceRecord;

#[tracing::instrument(name = "instance.delete", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id, force = req.force))]
pub async fn handle(
    ctx: &Ctx,
    _command_id: &str,
    req: &DeleteInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    let locks = lock_claimed(ctx, &req.challenge_id, &req.source_id).await?;
    let locked = ctx.locked(&locks.fence());
    let result = delete(&locked, locks.record.as_ref(), req).await;
    locks.release();
    result
}

async fn delete(
    ctx: &Locked<'_>,
    instance: Option<&Versioned<InstanceRecord>>,
    req: &DeleteInstanceRequest,
) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let Some(instance) = instance else {
        return Err(DomainError::instance_not_found(cid, sid).into());
    };
    let destroyed = async {
        let challenge = ctx.challenge(cid).await?;
        let scenario = ctx.scenario(&challenge.scenario).await?;
        destroy_instance(ctx, &scenario, instance).await?;
        Ok::<_, HandlerError>(challenge)
    }
    .await;
    match destroyed {
        Ok(challenge) => {
            if challenge.min > 0 {
                ctx.request_refill(cid).await;
            }
        }
        Err(e) if req.force => forget(ctx, instance, &e).await?,
        Err(e) => return Err(e),
    }
    Ok(Outcome::Deleted(Deleted {}))
}

/// Deletes the records of an instance whose stack could not be destroyed,
/// logging what the stack still holds for an operator to clean up.
async fn forget(
    ctx: &Locked<'_>,
    versioned: &Versioned<InstanceRecord>,
    why: &HandlerError,
) -> Result<(), HandlerError> {
    let record = &versioned.value;
    let leftover: Vec<String> = match ctx
        .store
        .get_stack(&record.challenge_id, &record.identity)
        .await?
    {
        Some(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|state| {
                state
                    .pointer("/checkpoint/checkpoint/latest/resources")
                    .and_then(|r| r.as_array())
                    .map(|rs| {
                        rs.iter()
                            .filter_map(|r| r["urn"].as_str().map(str::to_owned))
                            .collect()
                    })
            })
            .unwrap_or_else(|| vec!["(unreadable stack state)".to_owned()]),
        None => Vec::new(),
    };
    tracing::error!(
        identity = %record.identity,
        error = %why,
        orphaned = ?leftover,
        "forced delete: the stack could not be destroyed; its resources are orphaned and the records deleted"
    );
    ctx.store
        .delete_instance_if(record, Expect::Revision(versioned.mod_revision))
        .await?;
    Ok(())
}

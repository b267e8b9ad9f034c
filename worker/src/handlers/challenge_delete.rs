//! `challenge.delete`: destroy every instance of a challenge, then forget it.
//!
//! Parameters: the challenge id.
//! Steps: 1. write-lock the challenge (waits for in-flight instance work,
//! which holds it for reading, so an instance being created is finished, then
//! destroyed: no orphan); 2. destroy each instance's stack and delete its
//! records; 3. delete the challenge record.
//! Undo: none needed; each step is idempotent and a failed destroy retries the
//! whole command, which resumes with the instances that remain.

use cm_core::{ids, lock::LockMode};
use cm_schemas::v1::{DeleteChallengeRequest, Deleted, command_result::Outcome};

use super::{HandlerError, destroy_instance};
use crate::context::{Ctx, Locked};

#[tracing::instrument(name = "challenge.delete", skip_all, fields(challenge = %req.id))]
pub async fn handle(
    ctx: &Ctx,
    _command_id: &str,
    req: &DeleteChallengeRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.id)?;
    let lock = ctx.lock_challenge(&req.id, LockMode::Write).await?;
    let result = delete(&ctx.locked(&lock.fence()), &req.id).await;
    lock.release();
    result
}

/// Under the challenge's write lock, which excludes every other holder of
/// its instances (they all hold it for reading): every write is fenced by it.
async fn delete(ctx: &Locked<'_>, cid: &str) -> Result<Outcome, HandlerError> {
    let challenge = ctx.challenge(cid).await?;
    let instances = ctx.store.list_instances_versioned(cid).await?;
    if !instances.is_empty() {
        let scenario = ctx.scenario(&challenge.scenario).await?;
        for rec in &instances {
            destroy_instance(ctx, &scenario, rec).await?;
        }
    }
    ctx.store.delete_challenge(cid).await?;
    Ok(Outcome::Deleted(Deleted {}))
}

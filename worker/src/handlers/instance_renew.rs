//! `instance.renew`: push an instance's `until` back to now + timeout.
//!
//! Parameters: challenge id, source id.
//! Steps: 1. read-lock the challenge and lock the slot (together); 2. refuse when the
//! challenge has no timeout or the instance already expired; 3. write the new
//! `until` (guarded by the record's revision, fenced by the locks). No
//! identity lock: renew changes only `last_renew`/`until`, which no other
//! holder of the identity writes (an update merges over a renew).
//! Undo: nothing; a single guarded write.

use std::time::SystemTime;

use cm_core::{DomainError, ids, model::to_timestamp, store::Expect};
use cm_schemas::v1::{RenewInstanceRequest, command_result::Outcome};

use super::HandlerError;
use crate::context::Ctx;

#[tracing::instrument(name = "instance.renew", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &RenewInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    let locks = ctx.lock_instance(&req.challenge_id, &req.source_id).await?;
    let result = renew(&ctx.locked(&locks.fence()), command_id, req).await;
    locks.release();
    result
}

async fn renew(
    ctx: &crate::context::Locked<'_>,
    command_id: &str,
    req: &RenewInstanceRequest,
) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let (challenge, instance) = tokio::join!(
        ctx.store.get_challenge(cid),
        ctx.store.get_instance(cid, sid)
    );
    let Some(challenge) = challenge? else {
        return Err(DomainError::challenge_not_found(cid).into());
    };
    let Some(instance) = instance? else {
        return Err(DomainError::instance_not_found(cid, sid).into());
    };
    let previous = instance.value.clone();
    let mut record = instance.value;
    if record.command_id == command_id {
        return Ok(Outcome::Instance(record.to_api()));
    }
    if challenge.value.timeout.is_none() {
        return Err(DomainError::challenge_no_renewal(cid).into());
    }
    let now = SystemTime::now();
    if record.is_expired(now) {
        return Err(DomainError::instance_expired(
            cid,
            sid,
            "Instance has expired and cannot be renewed.",
        )
        .into());
    }
    record.last_renew = to_timestamp(now);
    record.until = challenge.value.instance_until(now);
    record.command_id = command_id.to_owned();
    ctx.store
        .put_instance(
            &record,
            None,
            Expect::Revision(instance.mod_revision),
            Some(&previous),
        )
        .await?;
    Ok(Outcome::Instance(record.to_api()))
}

//! `instance.renew`: push an instance's `until` back to now + timeout.
//!
//! Parameters: challenge id, source id.
//! Steps: 1. read the challenge and the record (no lock yet); refuse when
//! the challenge has no timeout or the instance already expired; 2. write the
//! new `until` in one transaction that also proves nobody else is at work
//! on it: the record and the challenge unchanged since read, no key under
//! the slot's lock (create, delete, expiry, reset hold it) nor a writer's
//! under the challenge's (an update moves `until`) (`Store::renew_unlocked`);
//! 3. only when that fails: read-lock the challenge and lock the slot
//! (together), then do 1 and 2 again under them, the write guarded by the
//! record's revision and fenced by the locks. No identity lock: renew
//! changes only `last_renew`/`until`, which no other holder of the identity
//! writes (an update merges over a renew).
//! Undo: nothing; a single guarded write.

use std::time::SystemTime;

use cm_core::{
    DomainError, ids,
    model::{InstanceRecord, to_timestamp},
    store::{Expect, Store},
};
use cm_schemas::v1::{RenewInstanceRequest, command_result::Outcome};

use super::HandlerError;
use crate::context::Ctx;

#[tracing::instrument(name = "instance.renew", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id, locked))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &RenewInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    // Uncontended (the common case): one read, one write, no lock.
    match plan(&ctx.store, command_id, req).await? {
        Plan::Answer(outcome) => return Ok(*outcome),
        Plan::Write(w) => {
            if ctx
                .store
                .renew_unlocked(&w.record, &w.previous, w.revision, w.challenge_revision)
                .await?
            {
                return Ok(Outcome::Instance(w.record.to_api()));
            }
        }
    }
    tracing::Span::current().record("locked", true);
    let locks = ctx.lock_instance(&req.challenge_id, &req.source_id).await?;
    let locked = ctx.locked(&locks.fence());
    let result = async {
        match plan(&locked.store, command_id, req).await? {
            Plan::Answer(outcome) => Ok(*outcome),
            Plan::Write(w) => {
                locked
                    .store
                    .put_instance(
                        &w.record,
                        None,
                        Expect::Revision(w.revision),
                        Some(&w.previous),
                    )
                    .await?;
                Ok(Outcome::Instance(w.record.to_api()))
            }
        }
    }
    .await;
    locks.release();
    result
}

/// What a renewal does, decided from one read.
enum Plan {
    /// Nothing to write: this is the answer.
    Answer(Box<Outcome>),
    /// Write `record` over `previous`.
    Write(Box<Renewal>),
}

struct Renewal {
    record: InstanceRecord,
    previous: InstanceRecord,
    /// The record's revision when read.
    revision: i64,
    /// The challenge's revision when read.
    challenge_revision: i64,
}

async fn plan(
    store: &Store,
    command_id: &str,
    req: &RenewInstanceRequest,
) -> Result<Plan, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let (challenge, instance) =
        tokio::join!(store.get_challenge(cid), store.get_instance(cid, sid));
    let Some(challenge) = challenge? else {
        return Err(DomainError::challenge_not_found(cid).into());
    };
    let Some(instance) = instance? else {
        return Err(DomainError::instance_not_found(cid, sid).into());
    };
    let previous = instance.value.clone();
    let mut record = instance.value;
    if record.command_id == command_id {
        return Ok(Plan::Answer(Box::new(Outcome::Instance(record.to_api()))));
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
    Ok(Plan::Write(Box::new(Renewal {
        record,
        previous,
        revision: instance.mod_revision,
        challenge_revision: challenge.mod_revision,
    })))
}

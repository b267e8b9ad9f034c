//! `instance.create`: deploy an instance for a (challenge, source).
//!
//! Parameters: challenge id, source id, the request's `additional` (merged
//! over the challenge's).
//! Steps: 1. read-lock the challenge and lock the (challenge, source) slot together;
//! 2. check the challenge exists and has not expired; 3. reserve the slot: a
//! `deploying` record with a fresh identity, written only if the slot is free
//! (a redelivery of this command finds its own reservation and resumes it);
//! 4. `pulumi up`; 5. write the ready record and the stack state.
//! Undo: when 4 fails, destroy what the failed run left and drop the
//! reservation, so nothing stays registered or deployed and the next create
//! for that source works.

use std::time::SystemTime;

use cm_core::{
    DomainError, Identity, ids,
    model::{ChallengeRecord, InstanceRecord, InstanceStatus, to_timestamp},
    store::{Expect, StoreError},
};
use cm_schemas::v1::{CreateInstanceRequest, command_result::Outcome};

use super::{
    HandlerError, destroy_persisted, encode_state, merged_additional, stack_state,
    store_deployment, up_persisted,
};
use crate::{context::Ctx, pulumi::DriverError};

#[tracing::instrument(
    name = "instance.create",
    skip_all,
    fields(challenge = %req.challenge_id, source = %req.source_id, identity)
)]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &CreateInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    let locks = ctx
        .lock_for_create(&req.challenge_id, &req.source_id)
        .await?;
    let result = create(ctx, command_id, req).await;
    locks.release();
    result
}

async fn create(
    ctx: &Ctx,
    command_id: &str,
    req: &CreateInstanceRequest,
) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let challenge = ctx.challenge(cid).await?;
    let now = SystemTime::now();
    if challenge.is_expired(now) {
        return Err(DomainError::failed_precondition("Challenge has expired.").into());
    }

    let mut record = match ctx.store.get_instance(cid, sid).await? {
        Some(existing) if existing.value.command_id == command_id => match existing.value.status {
            // Redelivered after it finished: answer the same.
            InstanceStatus::Ready => return Ok(Outcome::Instance(existing.value.to_api())),
            // Redelivered after a crash mid-deploy: resume with its identity.
            InstanceStatus::Deploying => existing.value,
        },
        Some(_) => {
            return Err(DomainError::already_exists(format!(
                "an instance of challenge {cid} already exists for source {sid}"
            ))
            .into());
        }
        None => {
            enforce_quota(ctx, &challenge, sid).await?;
            if let Some(claimed) = claim_from_pool(ctx, command_id, &challenge, req, now).await? {
                ctx.request_refill(cid).await;
                return Ok(Outcome::Instance(claimed.to_api()));
            }
            let reservation = InstanceRecord {
                challenge_id: cid.clone(),
                identity: Identity::random(),
                source_id: Some(sid.clone()),
                status: InstanceStatus::Deploying,
                since: to_timestamp(now),
                last_renew: to_timestamp(now),
                until: challenge.instance_until(now),
                connection_info: String::new(),
                flags: Vec::new(),
                additional: req.additional.clone().into_iter().collect(),
                command_id: command_id.to_owned(),
            };
            match ctx
                .store
                .put_instance(&reservation, None, Expect::Absent, None)
                .await
            {
                Ok(()) => reservation,
                Err(StoreError::Conflict { .. }) => {
                    return Err(DomainError::already_exists(format!(
                        "an instance of challenge {cid} already exists for source {sid}"
                    ))
                    .into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    tracing::Span::current().record("identity", record.identity.as_str());

    deploy_reserved(ctx, &challenge, &mut record).await?;
    Ok(Outcome::Instance(record.to_api()))
}

/// Deploys a reserved (`deploying`) record and marks it ready; on failure,
/// destroys what the run left and drops the reservation. Shared by fresh
/// creates and pool refills.
pub(crate) async fn deploy_reserved(
    ctx: &Ctx,
    challenge: &ChallengeRecord,
    record: &mut InstanceRecord,
) -> Result<(), HandlerError> {
    let scenario = match ctx.scenario(&challenge.scenario).await {
        Ok(s) => s,
        Err(e) => {
            ctx.store.delete_instance(record).await?;
            return Err(e);
        }
    };
    let additional = merged_additional(challenge, record);
    let previous = stack_state(ctx, &record.challenge_id, &record.identity).await?;
    let deployment = match up_persisted(ctx, &scenario, record, &additional, previous.as_ref())
        .await
    {
        Ok(d) => d,
        Err(DriverError::ProgramFailed { message, state }) => {
            // Undo: destroy partial resources, then release the slot.
            if let Some(state) = state.filter(|s| s.resource_count() > 0)
                && let Err(e) = destroy_persisted(ctx, &scenario, record, &state).await
            {
                tracing::error!(error = %e, identity = %record.identity, "cleanup of a failed deploy failed");
                ctx.store
                    .put_instance(record, Some(&encode_state(&state)?), Expect::Any, None)
                    .await?;
                return Err(HandlerError::Retry(format!(
                    "cleanup of a failed deploy failed: {e}"
                )));
            }
            ctx.store.delete_instance(record).await?;
            return Err(DriverError::ProgramFailed {
                message,
                state: None,
            }
            .into());
        }
        Err(other) => return Err(other.into()),
    };

    crate::failpoint::hit("after-up");
    crate::failpoint::pause("instance-create-before-write").await;
    record.status = InstanceStatus::Ready;
    // The caller's lock excludes other writers of this record.
    store_deployment(ctx, record, deployment, Expect::Any, None).await
}

/// Claims a ready pooled instance for the source, if the pool has one: a
/// store transaction, no Pulumi. When the request carries `additional`, the
/// claimed instance is then updated in place with it.
async fn claim_from_pool(
    ctx: &Ctx,
    command_id: &str,
    challenge: &ChallengeRecord,
    req: &CreateInstanceRequest,
    now: SystemTime,
) -> Result<Option<InstanceRecord>, HandlerError> {
    if challenge.min <= 0 && challenge.max <= 0 {
        return Ok(None);
    }
    for pooled in ctx.store.list_pooled(&req.challenge_id).await? {
        if pooled.value.status != InstanceStatus::Ready {
            continue;
        }
        let mut claimed = pooled.value.clone();
        claimed.source_id = Some(req.source_id.clone());
        claimed.since = to_timestamp(now);
        claimed.last_renew = to_timestamp(now);
        claimed.until = challenge.instance_until(now);
        claimed.additional = req.additional.clone().into_iter().collect();
        claimed.command_id = command_id.to_owned();
        match ctx.store.claim_pooled(&pooled, &claimed).await {
            Ok(()) => {
                tracing::info!(identity = %claimed.identity, "claimed a pooled instance");
                if !claimed.additional.is_empty() {
                    apply_additional(ctx, challenge, &mut claimed).await?;
                }
                return Ok(Some(claimed));
            }
            // Another claim took this one: try the next.
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Updates a claimed instance in place with its request's `additional`.
async fn apply_additional(
    ctx: &Ctx,
    challenge: &ChallengeRecord,
    record: &mut InstanceRecord,
) -> Result<(), HandlerError> {
    let scenario = ctx.scenario(&challenge.scenario).await?;
    let additional = merged_additional(challenge, record);
    let previous = stack_state(ctx, &record.challenge_id, &record.identity).await?;
    let deployment = up_persisted(ctx, &scenario, record, &additional, previous.as_ref()).await?;
    store_deployment(ctx, record, deployment, Expect::Any, None).await
}

/// Refuses (or, when configured, makes room by evicting the source's oldest
/// instance) when the source is at its cap. The caller holds the source lock,
/// so concurrent creates of one source are counted one after the other.
async fn enforce_quota(
    ctx: &Ctx,
    challenge: &ChallengeRecord,
    sid: &str,
) -> Result<(), HandlerError> {
    let cap = challenge
        .max_per_source
        .filter(|c| *c > 0)
        .unwrap_or(ctx.quota.max_per_source);
    if cap <= 0 {
        return Ok(());
    }
    let mut held = ctx.store.list_by_source(sid).await?;
    while held.len() as i64 >= cap {
        if !ctx.quota.evict_oldest {
            return Err(DomainError::new(
                cm_schemas::v1::Code::ResourceExhausted,
                format!(
                    "source {sid} already has {} instance(s), the most allowed at once; delete one first",
                    held.len()
                ),
            )
            .into());
        }
        held.sort_by_key(|r| (r.since.seconds, r.since.nanos));
        let oldest = held.remove(0);
        tracing::info!(challenge = %oldest.challenge_id, identity = %oldest.identity, "evicting the source's oldest instance");
        evict(ctx, &oldest).await?;
    }
    Ok(())
}

/// Destroys another instance of the source, under that instance's own locks.
async fn evict(ctx: &Ctx, victim: &InstanceRecord) -> Result<(), HandlerError> {
    let Some(sid) = &victim.source_id else {
        return Ok(());
    };
    let cid = &victim.challenge_id;
    // Always another challenge (this one's slot was free): take its locks.
    let locks = ctx.lock_instance(cid, sid).await?;
    let result = async {
        let Some(current) = ctx.store.get_instance(cid, sid).await? else {
            return Ok(());
        };
        let Some(challenge) = ctx.store.get_challenge(cid).await? else {
            ctx.store.delete_instance(&current.value).await?;
            return Ok(());
        };
        let scenario = ctx.scenario(&challenge.value.scenario).await?;
        super::destroy_instance(ctx, &scenario, &current.value).await
    }
    .await;
    locks.release();
    result
}

//! `instance.create`: deploy an instance for a (challenge, source).
//!
//! Parameters: challenge id, source id, the request's `additional` (merged
//! over the challenge's).
//! Steps: 0. without any lock, when the request has no `additional` and no
//! per-source quota applies: read the challenge, the slot and the pool at
//! once and claim a ready pooled instance in one transaction that also
//! proves no lock the steps below would take is held and the challenge is
//! unchanged (`Store::claim_unlocked`); done when it succeeds, else 1.
//! read-lock the challenge and lock the (challenge, source) slot together;
//! 2. check the challenge exists and has not expired; 3. claim a ready pooled
//! instance if there is one (one transaction, guarded by the pooled record's
//! revision and by the absence of any lock on its identity), else lock a
//! fresh identity and reserve the slot: a `deploying` record, written only
//! if the slot is free (a redelivery of this command finds its own
//! reservation and resumes it under that identity's lock);
//! 4. `pulumi up`; 5. write the ready record and the stack state, guarded by
//! the reservation's revision. Every write is fenced by the locks held.
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
    HandlerError, Transient, destroy_persisted, merged_additional, store_deployment,
    undo_failed_deploy, up_persisted,
};
use crate::{
    context::{Ctx, Locked},
    failpoint::{self, Waits},
    pulumi::DriverError,
};

/// How long a claim with `additional` (which runs Pulumi on the claimed
/// instance, so takes its identity's lock) waits for a pooled instance that
/// is busy (being updated or destroyed) before trying the next one.
const BUSY_POOLED: std::time::Duration = std::time::Duration::from_millis(50);

/// How long an eviction waits for the victim's locks (see [`evict`]).
const EVICT_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

#[tracing::instrument(
    name = "instance.create",
    skip_all,
    fields(challenge = %req.challenge_id, source = %req.source_id, identity, locked)
)]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &CreateInstanceRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    // A claim from the pool with nobody else at work (the common case at a
    // CTF's start): no lock, one transaction that proves it.
    // Boxed: handler futures are large (see `handlers::handle`).
    if let Some(claimed) = Box::pin(claim_unlocked(ctx, command_id, req)).await? {
        return Ok(Outcome::Instance(claimed.to_api()));
    }
    tracing::Span::current().record("locked", true);
    let locks = ctx
        .lock_for_create(&req.challenge_id, &req.source_id)
        .await?;
    let result = Box::pin(create(ctx, &locks.fence(), command_id, req)).await;
    locks.release();
    result
}

async fn create(
    ctx: &Ctx,
    fence: &cm_core::store::Fence,
    command_id: &str,
    req: &CreateInstanceRequest,
) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let challenge = ctx.challenge(cid).await?;
    let now = SystemTime::now();
    if challenge.is_expired(now) {
        return Err(DomainError::challenge_expired(cid).into());
    }

    let (identity_lock, mut record, revision) = match ctx.store.get_instance(cid, sid).await? {
        Some(existing) if existing.value.command_id == command_id => match existing.value.status {
            // Redelivered after it finished: answer the same.
            InstanceStatus::Ready => return Ok(Outcome::Instance(existing.value.to_api())),
            // Redelivered after a crash mid-deploy: resume with its identity,
            // under its lock, from the record as it is under that lock.
            InstanceStatus::Deploying => {
                let guard = ctx.lock_identity(cid, &existing.value.identity).await?;
                let Some(now) = ctx.store.get_instance(cid, sid).await? else {
                    return Err(HandlerError::changed("the reservation vanished"));
                };
                if now.value.identity != existing.value.identity {
                    return Err(HandlerError::changed("the reservation changed"));
                }
                if now.value.status == InstanceStatus::Ready {
                    // Another delivery finished it while this one waited.
                    return Ok(Outcome::Instance(now.value.to_api()));
                }
                (guard, now.value, now.mod_revision)
            }
        },
        Some(_) => {
            return Err(DomainError::instance_already_exists(
                cid,
                sid,
                format!("an instance of challenge {cid} already exists for source {sid}"),
            )
            .into());
        }
        None => {
            enforce_quota(ctx, fence, &challenge, sid).await?;
            if let Some(claimed) =
                claim_from_pool(ctx, fence, command_id, &challenge, req, now).await?
            {
                ctx.note_claim(&challenge, true);
                return Ok(Outcome::Instance(claimed.to_api()));
            }
            ctx.note_claim(&challenge, false);
            let identity = Identity::random();
            // A fresh identity: nobody else knows it, the lock is free.
            let guard = ctx.lock_identity(cid, &identity).await?;
            let reservation = InstanceRecord {
                challenge_id: cid.clone(),
                identity,
                source_id: Some(sid.clone()),
                status: InstanceStatus::Deploying,
                since: to_timestamp(now),
                last_renew: to_timestamp(now),
                until: challenge.instance_until(now),
                connection_info: String::new(),
                flags: Vec::new(),
                additional: req.additional.clone().into_iter().collect(),
                command_id: command_id.to_owned(),
                deployed_from: None,
            };
            match ctx
                .store
                .fenced(&fence.clone().and(&guard.fence()))
                .put_instance_rev(&reservation, None, Expect::Absent, None)
                .await
            {
                Ok(revision) => (guard, reservation, revision),
                Err(StoreError::Conflict { .. }) => {
                    return Err(DomainError::instance_already_exists(
                        cid,
                        sid,
                        format!("an instance of challenge {cid} already exists for source {sid}"),
                    )
                    .into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    tracing::Span::current().record("identity", record.identity.as_str());

    let locked = ctx.locked(&fence.clone().and(&identity_lock.fence()));
    let started = std::time::Instant::now();
    let deployed = Box::pin(deploy_reserved(&locked, &challenge, &mut record, revision)).await;
    identity_lock.release();
    deployed?;
    if challenge.pool == cm_core::pool_demand::PoolMode::Adaptive {
        ctx.note_deploy(cid, started.elapsed()).await;
    }
    Ok(Outcome::Instance(record.to_api()))
}

/// Deploys a reserved (`deploying`) record, whose revision is `revision`,
/// and marks it ready; on failure, destroys what the run left and drops the
/// reservation. The caller holds the identity's lock; every write is
/// guarded by the reservation's revision. Shared by fresh creates and pool
/// refills.
pub(crate) async fn deploy_reserved(
    ctx: &Locked<'_>,
    challenge: &ChallengeRecord,
    record: &mut InstanceRecord,
    revision: i64,
) -> Result<(), HandlerError> {
    let guard = Expect::Revision(revision);
    let scenario = match ctx.scenario(&challenge.scenario).await {
        Ok(s) => s,
        Err(e) => {
            crate::stacks::delete_record(ctx, record, guard).await?;
            return Err(e);
        }
    };
    let additional = merged_additional(challenge, record);
    let previous = crate::stacks::load(ctx, &record.challenge_id, &record.identity).await?;
    let deployment =
        match up_persisted(ctx, &scenario, record, &additional, previous.as_ref()).await {
            Ok(d) => d,
            Err(DriverError::ProgramFailed { message, state }) => {
                // Undo: destroy partial resources, then release the slot; what
                // cannot be destroyed yet stays recorded and is retried.
                if let Err((e, state)) = undo_failed_deploy(ctx, &scenario, record, state).await {
                    crate::stacks::write_record(ctx, record, Some(&state), guard, None).await?;
                    return Err(Transient::Cleanup(e).into());
                }
                crate::stacks::delete_record(ctx, record, guard).await?;
                return Err(DriverError::ProgramFailed {
                    message,
                    state: None,
                }
                .into());
            }
            Err(other) => return Err(other.into()),
        };

    failpoint::hit("after-up");
    failpoint::pause("instance-create-before-write", "", Waits::First).await;
    record.status = InstanceStatus::Ready;
    let state = deployment.state.clone();
    match store_deployment(ctx, challenge, record, deployment, guard, None).await {
        Ok(_) => Ok(()),
        // The deployment cannot be recorded, ever (a record over etcd's size
        // limit): undo it rather than leave it unrecorded.
        Err(HandlerError::Domain(e)) => {
            tracing::error!(error = %e, identity = %record.identity, "deployment cannot be recorded; destroying it");
            destroy_persisted(
                ctx,
                &scenario,
                &record.challenge_id,
                &record.identity,
                &state,
            )
            .await?;
            crate::stacks::delete_record(ctx, record, guard).await?;
            Err(HandlerError::Domain(e))
        }
        Err(e) => Err(e),
    }
}

/// Claims a ready pooled instance for the source, if the pool has one: a
/// store transaction, no Pulumi, no lock round trip: the transaction itself
/// requires the identity's lock to be free (`Store::claim_pooled`), so a
/// pooled instance being updated or destroyed is skipped, never shared.
/// When the request carries `additional`, the claimed instance is then
/// updated in place with it: that runs Pulumi, so the identity's lock is
/// taken first (briefly: a busy pooled instance is skipped).
async fn claim_from_pool(
    ctx: &Ctx,
    fence: &cm_core::store::Fence,
    command_id: &str,
    challenge: &ChallengeRecord,
    req: &CreateInstanceRequest,
    now: SystemTime,
) -> Result<Option<InstanceRecord>, HandlerError> {
    if !has_pool(challenge) {
        return Ok(None);
    }
    for pooled in ctx.store.list_pooled(&req.challenge_id).await? {
        if pooled.value.status != InstanceStatus::Ready {
            continue;
        }
        let mut claimed = claimed_from(&pooled.value, challenge, command_id, req, now);
        if claimed.additional.is_empty() {
            match ctx
                .store
                .fenced(fence)
                .claim_pooled(&pooled, &claimed)
                .await
            {
                Ok(_) => {
                    tracing::info!(identity = %claimed.identity, "claimed a pooled instance");
                    return Ok(Some(claimed));
                }
                // Another claim took this one, or it is being updated or
                // destroyed: try the next.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let guard = match ctx
            .lock_identity_within(&req.challenge_id, &claimed.identity, BUSY_POOLED)
            .await
        {
            Ok(g) => g,
            Err(cm_core::lock::LockError::Timeout(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let locked = ctx.locked(&fence.clone().and(&guard.fence()));
        let result = match locked.store.claim_pooled_locked(&pooled, &claimed).await {
            Ok(revision) => {
                tracing::info!(identity = %claimed.identity, "claimed a pooled instance");
                apply_additional(&locked, challenge, &mut claimed, revision)
                    .await
                    .map(|()| Some(claimed))
            }
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        };
        guard.release();
        match result {
            Ok(None) => continue,
            other => return other,
        }
    }
    Ok(None)
}

/// How many ready pooled instances a claim without locks tries before it
/// leaves the rest to the locked path (each try is one transaction; a
/// failed one means another claim got there first, or someone holds a lock
/// the claim must wait for).
const UNLOCKED_TRIES: usize = 3;

/// A claim from the pool that takes no lock: the challenge, the source's
/// slot and the pool read at once, then the first ready pooled instance
/// claimed in one transaction that also proves no lock the create would
/// take is held and the challenge is unchanged (`Store::claim_unlocked`).
/// `None` leaves the create to the locked path, which decides again: the
/// slot is taken (a redelivery answers there), a per-source quota applies,
/// the request has `additional` (Pulumi runs), the pool is empty, the
/// challenge is missing or expired, or the tries failed.
async fn claim_unlocked(
    ctx: &Ctx,
    command_id: &str,
    req: &CreateInstanceRequest,
) -> Result<Option<InstanceRecord>, HandlerError> {
    if !req.additional.is_empty() {
        return Ok(None);
    }
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let (challenge, slot, pool) = tokio::try_join!(
        ctx.store.get_challenge(cid),
        ctx.store.get_instance(cid, sid),
        ctx.store.list_pooled(cid),
    )?;
    let Some(challenge) = challenge else {
        return Ok(None);
    };
    let now = SystemTime::now();
    if slot.is_some()
        || !has_pool(&challenge.value)
        || challenge.value.is_expired(now)
        || source_cap(ctx, &challenge.value) > 0
    {
        return Ok(None);
    }
    let ready = pool
        .iter()
        .filter(|p| p.value.status == InstanceStatus::Ready);
    for pooled in ready.take(UNLOCKED_TRIES) {
        let claimed = claimed_from(&pooled.value, &challenge.value, command_id, req, now);
        match ctx
            .store
            .claim_unlocked(pooled, &claimed, challenge.mod_revision)
            .await
        {
            Ok(_) => {
                tracing::info!(identity = %claimed.identity, "claimed a pooled instance (no lock)");
                ctx.note_claim(&challenge.value, true);
                return Ok(Some(claimed));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Whether `challenge` keeps a pool at all.
fn has_pool(challenge: &ChallengeRecord) -> bool {
    challenge.min > 0
        || challenge.max > 0
        || challenge.pool != cm_core::pool_demand::PoolMode::Static
}

/// `pooled` as claimed by the request's source at `now`.
fn claimed_from(
    pooled: &InstanceRecord,
    challenge: &ChallengeRecord,
    command_id: &str,
    req: &CreateInstanceRequest,
    now: SystemTime,
) -> InstanceRecord {
    let mut claimed = pooled.clone();
    claimed.source_id = Some(req.source_id.clone());
    claimed.since = to_timestamp(now);
    claimed.last_renew = to_timestamp(now);
    claimed.until = challenge.instance_until(now);
    claimed.additional = req.additional.clone().into_iter().collect();
    claimed.command_id = command_id.to_owned();
    claimed
}

/// How many instances a source may hold at once (0: no cap): the
/// challenge's own cap, else the worker's.
fn source_cap(ctx: &Ctx, challenge: &ChallengeRecord) -> i64 {
    challenge
        .max_per_source
        .filter(|c| *c > 0)
        .unwrap_or(ctx.quota.max_per_source)
}

/// Updates a claimed instance in place with its request's `additional`
/// (the caller holds its identity's lock; `revision` is the claim's).
async fn apply_additional(
    ctx: &Locked<'_>,
    challenge: &ChallengeRecord,
    record: &mut InstanceRecord,
    revision: i64,
) -> Result<(), HandlerError> {
    let scenario = ctx.scenario(&challenge.scenario).await?;
    let additional = merged_additional(challenge, record);
    let previous = crate::stacks::load(ctx, &record.challenge_id, &record.identity).await?;
    let deployment = up_persisted(ctx, &scenario, record, &additional, previous.as_ref()).await?;
    store_deployment(
        ctx,
        challenge,
        record,
        deployment,
        Expect::Revision(revision),
        None,
    )
    .await?;
    Ok(())
}

/// Refuses (or, when configured, makes room by evicting the source's oldest
/// instance) when the source is at its cap. The caller holds the source lock,
/// so concurrent creates of one source are counted one after the other.
async fn enforce_quota(
    ctx: &Ctx,
    fence: &cm_core::store::Fence,
    challenge: &ChallengeRecord,
    sid: &str,
) -> Result<(), HandlerError> {
    let cap = source_cap(ctx, challenge);
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
        failpoint::pause("instance-create-before-evict", "", Waits::First).await;
        Box::pin(evict(ctx, fence, &oldest)).await?;
    }
    Ok(())
}

/// Destroys another instance of the source, under that instance's own
/// locks (its slot's and its identity's), fenced by those and by the
/// create's own locks.
async fn evict(
    ctx: &Ctx,
    fence: &cm_core::store::Fence,
    victim: &InstanceRecord,
) -> Result<(), HandlerError> {
    let Some(sid) = &victim.source_id else {
        return Ok(());
    };
    let cid = &victim.challenge_id;
    // Always another challenge (this one's slot was free): take its locks,
    // without waiting. This create holds the source's lock; a create of the
    // same source on the victim's challenge may hold the victim's slot and
    // wait for that source lock: waiting here would close a cycle. When the
    // victim is busy, this create gives its locks back and is retried.
    let locks = match super::lock_claimed_within(ctx, cid, sid, EVICT_WAIT).await {
        Ok(locks) => locks,
        Err(HandlerError::Transient(why)) => {
            return Err(Transient::EvictionBusy(Box::new(why)).into());
        }
        Err(e) => return Err(e),
    };
    let result = async {
        let Some(current) = &locks.record else {
            return Ok(());
        };
        let locked = ctx.locked(&fence.clone().and(&locks.fence()));
        let Some(challenge) = ctx.store.get_challenge(cid).await? else {
            crate::stacks::delete_record(
                &locked,
                &current.value,
                Expect::Revision(current.mod_revision),
            )
            .await?;
            return Ok(());
        };
        let scenario = ctx.scenario(&challenge.value.scenario).await?;
        super::destroy_instance(&locked, &scenario, current).await
    }
    .await;
    locks.release();
    result
}

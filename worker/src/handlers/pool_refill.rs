//! `pool.refill`: bring a challenge's pool of unclaimed instances to `min`,
//! without the total (pooled + claimed) exceeding `max` when `max > 0`, and
//! destroy the surplus when `min` went down.
//!
//! Parameters: the challenge id.
//! Steps, in rounds, each under the challenge's read lock and the pool's write
//! lock (one refill at a time; taken per round so a challenge writer waits
//! for one deploy, not the whole pool): 1. re-read the challenge; 2. count
//! pooled and claimed instances; 3. deploy one pooled instance (under its
//! fresh identity's lock: a `deploying` reservation, then `pulumi up`, then
//! ready), or 4. destroy the newest surplus pooled instances, each under its identity's lock and only if it is still
//! pooled once that lock is held (a claim may have taken it: claims need the
//! lock free, so after the lock no claim can), or 5. stop when the pool is
//! at its size. Every write is fenced.
//! Undo: a failed deploy drops its own reservation (see `deploy_reserved`);
//! the next refill tries again.

use std::time::SystemTime;

use cm_core::{
    Identity, ids,
    model::{InstanceRecord, InstanceStatus, to_timestamp},
    store::Expect,
};
use cm_schemas::v1::{RefillPool, command_result::Outcome};

use super::{HandlerError, destroy_instance, instance_create::deploy_reserved};
use crate::context::Ctx;

type Fence = cm_core::store::Fence;

/// How long a refill waits for another refill of the same pool. A refill in
/// progress re-reads the pool before each deploy, so it covers the claims made
/// meanwhile: a second refill need not queue behind it (holding a worker slot
/// for a whole Pulumi run), it steps aside.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// What one round of a refill did.
enum Round {
    Deployed,
    Destroyed(i64),
    /// The pool is at its size: the refill is over.
    Done(cm_core::model::ChallengeRecord),
}

#[tracing::instrument(name = "pool.refill", skip_all, fields(challenge = %req.challenge_id, deployed, destroyed))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &RefillPool,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    let cid = &req.challenge_id;
    let (mut deployed, mut destroyed) = (0, 0);
    let mut first = true;
    loop {
        // Locks per round, not for the whole refill: a challenge update or
        // delete (a writer, preferred) gets in between two deploys instead
        // of waiting for the whole pool. Each round re-reads the challenge
        // and the pool under its locks.
        let wait = if first { BUSY_WAIT } else { ctx.lock_timeout };
        let locks = match ctx.lock_pool_within(cid, wait).await {
            Ok(locks) => locks,
            Err(cm_core::lock::LockError::Timeout(_)) if first => {
                tracing::debug!("another refill of this pool is running; it covers this one");
                return Ok(Outcome::Deleted(cm_schemas::v1::Deleted {}));
            }
            Err(e) => return Err(HandlerError::from(e)),
        };
        first = false;
        let round = Box::pin(round(ctx, &locks.fence(), command_id, cid)).await;
        locks.release();
        match round? {
            Round::Deployed => deployed += 1,
            Round::Destroyed(n) => destroyed += n,
            Round::Done(challenge) => {
                let span = tracing::Span::current();
                span.record("deployed", deployed);
                span.record("destroyed", destroyed);
                return Ok(Outcome::Challenge(challenge.to_api(Vec::new())));
            }
        }
        crate::failpoint::pause("pool-refill-between-rounds").await;
    }
}

/// One round under the challenge's read lock and the pool's lock: deploy one
/// pooled instance, or destroy the surplus, or say the pool is at its size.
async fn round(
    ctx: &Ctx,
    fence: &Fence,
    command_id: &str,
    cid: &str,
) -> Result<Round, HandlerError> {
    let challenge = ctx.challenge(cid).await?;
    // Claims made meanwhile are counted.
    let instances = ctx.store.list_instances(cid).await?;
    let pooled = instances.iter().filter(|r| r.source_id.is_none()).count() as i64;
    let total = instances.len() as i64;
    if pooled < challenge.min && (challenge.max <= 0 || total < challenge.max) {
        let now = SystemTime::now();
        let identity = Identity::random();
        let guard = ctx.lock_identity(cid, &identity).await?;
        let locked = ctx.locked(&fence.clone().and(&guard.fence()));
        let mut record = InstanceRecord {
            challenge_id: cid.to_owned(),
            identity,
            source_id: None,
            status: InstanceStatus::Deploying,
            since: to_timestamp(now),
            last_renew: to_timestamp(now),
            until: None,
            connection_info: String::new(),
            flags: Vec::new(),
            additional: Default::default(),
            command_id: command_id.to_owned(),
        };
        let revision = locked
            .store
            .put_instance_rev(&record, None, Expect::Absent, None)
            .await?;
        let result = Box::pin(deploy_reserved(&locked, &challenge, &mut record, revision)).await;
        guard.release();
        result?;
        return Ok(Round::Deployed);
    }
    if pooled > challenge.min {
        let mut surplus: Vec<InstanceRecord> = instances
            .into_iter()
            .filter(|r| r.source_id.is_none())
            .collect();
        surplus.sort_by_key(|r| (r.since.seconds, r.since.nanos));
        let scenario = ctx.scenario(&challenge.scenario).await?;
        let mut destroyed = 0;
        for rec in surplus.iter().rev().take((pooled - challenge.min) as usize) {
            let guard = ctx.lock_identity(cid, &rec.identity).await?;
            let locked = ctx.locked(&fence.clone().and(&guard.fence()));
            // Under the lock: still pooled (not claimed meanwhile)?
            let result = match ctx.store.find_identity(cid, &rec.identity).await {
                Ok(Some(now)) if now.value.source_id.is_none() => {
                    crate::failpoint::pause("pool-refill-before-destroy").await;
                    destroy_instance(&locked, &scenario, &now).await.map(|()| 1)
                }
                Ok(_) => Ok(0),
                Err(e) => Err(e.into()),
            };
            guard.release();
            destroyed += result?;
        }
        return Ok(Round::Destroyed(destroyed));
    }
    Ok(Round::Done(challenge))
}

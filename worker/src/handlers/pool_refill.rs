//! `pool.refill`: bring a challenge's pool of unclaimed instances to `min`,
//! without the total (pooled + claimed) exceeding `max` when `max > 0`, and
//! destroy the surplus when `min` went down.
//!
//! Parameters: the challenge id.
//! Steps: 1. read-lock the challenge and write-lock its pool (one refill at a
//! time); 2. count pooled and claimed instances; 3. deploy pooled instances
//! one by one (each under its fresh identity's lock: a `deploying`
//! reservation, then `pulumi up`, then ready); 4. destroy the newest surplus
//! pooled instances, each under its identity's lock and only if it is still
//! pooled once that lock is held (a claim may have taken it: claims need the
//! lock free, so after the lock no claim can). Every write is fenced.
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

#[tracing::instrument(name = "pool.refill", skip_all, fields(challenge = %req.challenge_id, deployed, destroyed))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &RefillPool,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.challenge_id)?;
    let locks = match ctx.lock_pool_within(&req.challenge_id, BUSY_WAIT).await {
        Ok(locks) => locks,
        Err(cm_core::lock::LockError::Timeout(_)) => {
            tracing::debug!("another refill of this pool is running; it covers this one");
            return Ok(Outcome::Deleted(cm_schemas::v1::Deleted {}));
        }
        Err(e) => return Err(e.into()),
    };
    let result = refill(ctx, &locks.fence(), command_id, &req.challenge_id).await;
    locks.release();
    result
}

async fn refill(
    ctx: &Ctx,
    fence: &Fence,
    command_id: &str,
    cid: &str,
) -> Result<Outcome, HandlerError> {
    let challenge = ctx.challenge(cid).await?;
    let (mut deployed, mut destroyed) = (0, 0);
    loop {
        // Re-read each round: claims made meanwhile are counted.
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
            let result =
                Box::pin(deploy_reserved(&locked, &challenge, &mut record, revision)).await;
            guard.release();
            result?;
            deployed += 1;
            continue;
        }
        if pooled > challenge.min {
            let mut surplus: Vec<InstanceRecord> = instances
                .into_iter()
                .filter(|r| r.source_id.is_none())
                .collect();
            surplus.sort_by_key(|r| (r.since.seconds, r.since.nanos));
            let scenario = ctx.scenario(&challenge.scenario).await?;
            for rec in surplus.iter().rev().take((pooled - challenge.min) as usize) {
                let guard = ctx.lock_identity(cid, &rec.identity).await?;
                let locked = ctx.locked(&fence.clone().and(&guard.fence()));
                // Under the lock: still pooled (not claimed meanwhile)?
                let result = match ctx.store.find_identity(cid, &rec.identity).await {
                    Ok(Some(now)) if now.value.source_id.is_none() => {
                        destroy_instance(&locked, &scenario, &now).await.map(|()| 1)
                    }
                    Ok(_) => Ok(0),
                    Err(e) => Err(e.into()),
                };
                guard.release();
                destroyed += result?;
            }
            continue;
        }
        break;
    }
    let span = tracing::Span::current();
    span.record("deployed", deployed);
    span.record("destroyed", destroyed);
    Ok(Outcome::Challenge(challenge.to_api(Vec::new())))
}

//! `pool.refill`: bring a challenge's pool of unclaimed instances to its
//! target, without the total (pooled + claimed) exceeding `max` when
//! `max > 0`, and destroy the surplus above what it keeps.
//!
//! The target and what is kept come from the pool's mode: `static`, both are
//! `min`; `adaptive`, they follow the demand estimate (claim rate x deploy
//! time, see `cm_core::pool_demand`), within `min` and `max`.
//!
//! Parameters: the challenge id.
//! Steps, in rounds, each under the challenge's read lock and the pool's write
//! lock (one refill at a time; taken per round so a challenge writer waits
//! for one round of deploys, not the whole pool): 1. re-read the challenge
//! and, for an adaptive pool, its demand; 2. count pooled and claimed
//! instances; 3. below the target, take free refill slots of the cluster
//! (waiting for one at least) and deploy that many pooled instances at once
//! (a static pool: one), each under its fresh identity's lock: a
//! `deploying` reservation, then `pulumi up`, then ready; or 4. above what
//! is kept, destroy the newest surplus pooled instances, each under its
//! identity's lock and only if it is still pooled once that lock is held (a
//! claim may have taken it: claims need the lock free, so after the lock no
//! claim can); or 5. stop, then count the pool again without locks and go
//! on with another round if it changed (a claim's own refill steps aside
//! while this one holds the locks: this one covers it). A refill that finds
//! the locks taken waits for them briefly, without its concurrency permit,
//! then steps aside. Every write is fenced.
//! Undo: a failed deploy drops its own reservation (see `deploy_reserved`);
//! the next refill tries again. A reservation left `Deploying` (its refill
//! died, or failed before Pulumi could say) is resumed by the next round,
//! before any new deploy. A refill slot hangs on the worker's lease:
//! a worker that dies gives its slots back with it.

use std::time::{Duration, Instant, SystemTime};

use cm_core::{
    Identity, ids,
    model::{ChallengeRecord, InstanceRecord, InstanceStatus, to_timestamp},
    pool_demand::{Plan, PoolMode, Want},
    store::Expect,
};
use cm_schemas::v1::{RefillPool, command_result::Outcome};

use super::{HandlerError, Transient, destroy_instance, instance_create::deploy_reserved};
use crate::context::Ctx;
use crate::failpoint::{self, Waits};

type Fence = cm_core::store::Fence;

/// How long a refill waits for another refill of the same pool. A refill in
/// progress re-reads the pool before each deploy, so it covers the claims made
/// meanwhile: a second refill need not queue behind it (holding a worker slot
/// for a whole Pulumi run), it steps aside.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// What one round of a refill did.
enum Round {
    Deployed(i64),
    Destroyed(i64),
    /// The pool is at its size: the refill is over.
    Done(cm_core::model::ChallengeRecord, Census),
}

/// How many instances of the pool's challenge are pooled and claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Census {
    pooled: i64,
    claimed: i64,
}

impl Census {
    /// Counted now, without locks (two count-only reads).
    async fn now(ctx: &Ctx, cid: &str) -> Result<Self, HandlerError> {
        let (pooled, claimed) =
            tokio::try_join!(ctx.store.count_pooled(cid), ctx.store.count_claimed(cid))?;
        Ok(Self { pooled, claimed })
    }
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
    // The challenge as a finished round saw it, when one did.
    let mut done = None;
    let finish = |challenge: Option<ChallengeRecord>, deployed: i64, destroyed: i64| {
        let span = tracing::Span::current();
        span.record("deployed", deployed);
        span.record("destroyed", destroyed);
        match challenge {
            Some(challenge) => Outcome::Challenge(challenge.to_api(Vec::new())),
            None => Outcome::Deleted(cm_schemas::v1::Deleted {}),
        }
    };
    loop {
        // Locks per round, not for the whole refill: a challenge update or
        // delete (a writer, preferred) gets in between two deploys instead
        // of waiting for the whole pool. Each round re-reads the challenge
        // and the pool under its locks.
        let locks = if first {
            match first_locks(ctx, cid).await? {
                Some(locks) => locks,
                None => {
                    tracing::debug!("another refill of this pool is running; it covers this one");
                    return Ok(finish(done, deployed, destroyed));
                }
            }
        } else {
            ctx.lock_pool_within(cid, ctx.lock_timeout).await?
        };
        first = false;
        let round = Box::pin(round(ctx, &locks.fence(), command_id, cid)).await;
        // Released before the recount below reads: a claim that saw these
        // locks (and so asked for no refill) is then in that count.
        let released = locks.release_now().await;
        match round? {
            Round::Deployed(n) => deployed += n,
            Round::Destroyed(n) => destroyed += n,
            Round::Done(challenge, seen) => {
                // A claim made after this round's read, whose own refill
                // stepped aside because this one held the locks, is this
                // one's to cover: counted again once the locks are
                // released, any change is another round (taken like a first
                // one: a refill that holds the locks by then covers it).
                if released && Census::now(ctx, cid).await.is_ok_and(|now| now == seen) {
                    return Ok(finish(Some(challenge), deployed, destroyed));
                }
                done = Some(challenge);
                first = true;
                continue;
            }
        }
        failpoint::pause("pool-refill-between-rounds", "", Waits::First).await;
    }
}

/// The first round's locks, or `None` when another refill keeps them past
/// [`BUSY_WAIT`]. Taken at once when free; else waited for without this
/// command's concurrency permit: at a CTF's start every claim asks for a
/// refill, and refills waiting on the one at work would otherwise fill the
/// worker's permits while claims queue behind them. A refill that gets the
/// locks after that wait goes on without a permit (its Pulumi runs are still
/// bounded by the driver's and the cluster's refill slots); at most one per
/// pool can, as it holds the pool's lock.
async fn first_locks(ctx: &Ctx, cid: &str) -> Result<Option<cm_core::lock::LockSet>, HandlerError> {
    use cm_core::lock::LockError::Timeout;
    failpoint::pause("pool-refill-before-locks", cid, Waits::First).await;
    match ctx.lock_pool_within(cid, Duration::ZERO).await {
        Ok(locks) => return Ok(Some(locks)),
        Err(Timeout(_)) => {}
        Err(e) => return Err(e.into()),
    }
    crate::permit::yield_permit();
    match ctx.lock_pool_within(cid, BUSY_WAIT).await {
        Ok(locks) => Ok(Some(locks)),
        Err(Timeout(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One round under the challenge's read lock and the pool's lock: deploy
/// pooled instances, or destroy the surplus, or say the pool is at its size.
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
    if let Some(resumed) = resume_abandoned(ctx, fence, &challenge, &instances).await? {
        return Ok(resumed);
    }
    let plan = plan(ctx, &challenge, total - pooled).await?;
    let room = if challenge.max > 0 {
        challenge.max - total
    } else {
        i64::MAX
    };
    let deficit = (plan.target - pooled).min(room);
    if deficit > 0 {
        let batch = match challenge.pool {
            PoolMode::Static => 1,
            PoolMode::Adaptive => ctx.pools.refill_batch,
        };
        let slots = refill_slots(ctx, batch.min(deficit as usize)).await?;
        let deploys = futures::future::join_all(
            slots
                .iter()
                .map(|_| deploy_one(ctx, fence, command_id, &challenge)),
        )
        .await;
        if let Err(e) = ctx.store.release_refill_slots(&slots).await {
            // Their lease frees them when this worker goes; until then the
            // cluster runs fewer refills.
            tracing::warn!(error = %e, "refill slots not given back");
        }
        let mut deployed = 0;
        let mut failure = None;
        for d in deploys {
            match d {
                Ok(()) => deployed += 1,
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        return match failure {
            Some(e) => Err(e),
            None => Ok(Round::Deployed(deployed)),
        };
    }
    if pooled > plan.keep {
        let mut surplus: Vec<InstanceRecord> = instances
            .into_iter()
            .filter(|r| r.source_id.is_none())
            .collect();
        surplus.sort_by_key(|r| (r.since.seconds, r.since.nanos));
        let scenario = ctx.scenario(&challenge.scenario).await?;
        let mut destroyed = 0;
        for rec in surplus.iter().rev().take((pooled - plan.keep) as usize) {
            let guard = ctx.lock_identity(cid, &rec.identity).await?;
            let locked = ctx.locked(&fence.clone().and(&guard.fence()));
            // Under the lock: still pooled (not claimed meanwhile)?
            let result = match ctx.store.find_identity(cid, &rec.identity).await {
                Ok(Some(now)) if now.value.source_id.is_none() => {
                    failpoint::pause("pool-refill-before-destroy", "", Waits::First).await;
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
    failpoint::pause("pool-refill-before-done", "", Waits::First).await;
    Ok(Round::Done(
        challenge,
        Census {
            pooled,
            claimed: total - pooled,
        },
    ))
}

/// A reservation left `Deploying` by a refill that died or failed
/// transiently (the worker's lease lost, Pulumi killed, etcd away) counts as
/// pooled and no one can claim it: the round deploys it before anything
/// else, under its identity's lock, resuming from the state its last run
/// stored. `None` when there is none whose lock is free (a reclaim or the
/// refill that made it holds it).
async fn resume_abandoned(
    ctx: &Ctx,
    fence: &Fence,
    challenge: &ChallengeRecord,
    instances: &[InstanceRecord],
) -> Result<Option<Round>, HandlerError> {
    let abandoned: Vec<&Identity> = instances
        .iter()
        .filter(|r| r.source_id.is_none() && r.status == InstanceStatus::Deploying)
        .map(|r| &r.identity)
        .collect();
    if abandoned.is_empty() {
        return Ok(None);
    }
    let cid = &challenge.id;
    let slots = refill_slots(ctx, 1).await?;
    let mut result = Ok(None);
    for identity in abandoned {
        let guard = match ctx.lock_identity_within(cid, identity, BUSY_WAIT).await {
            Ok(guard) => guard,
            Err(cm_core::lock::LockError::Timeout(_)) => continue,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        let locked = ctx.locked(&fence.clone().and(&guard.fence()));
        // Under the lock: still an unclaimed reservation?
        let resumed = match ctx.store.find_identity(cid, identity).await {
            Ok(Some(now))
                if now.value.source_id.is_none()
                    && now.value.status == InstanceStatus::Deploying =>
            {
                tracing::warn!(%identity, "resuming a pool reservation a refill left deploying");
                let mut record = now.value;
                Box::pin(deploy_reserved(
                    &locked,
                    challenge,
                    &mut record,
                    now.mod_revision,
                ))
                .await
                .map(|()| Some(Round::Deployed(1)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e.into()),
        };
        guard.release();
        result = resumed;
        if !matches!(result, Ok(None)) {
            break;
        }
    }
    if let Err(e) = ctx.store.release_refill_slots(&slots).await {
        tracing::warn!(error = %e, "refill slots not given back");
    }
    result
}

/// What this round aims at: `min` for a static pool; from the demand for an
/// adaptive one.
async fn plan(ctx: &Ctx, challenge: &ChallengeRecord, claimed: i64) -> Result<Plan, HandlerError> {
    let want = match challenge.pool {
        PoolMode::Static => Want::NONE,
        PoolMode::Adaptive => {
            let demand = ctx.store.get_demand(&challenge.id).await?;
            demand.want(cm_core::pool_demand::unix_now(), &ctx.pools.tuning)
        }
    };
    Ok(Plan::of(
        challenge.pool,
        challenge.min,
        challenge.max,
        claimed,
        want,
    ))
}

/// Between 1 and `want` of the cluster's refill slots, waiting up to the
/// lock timeout for the first.
async fn refill_slots(ctx: &Ctx, want: usize) -> Result<Vec<String>, HandlerError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let slots = ctx
            .store
            .take_refill_slots(ctx.session.lease(), ctx.pools.refill_slots, want)
            .await?;
        if !slots.is_empty() {
            return Ok(slots);
        }
        if started.elapsed() >= ctx.lock_timeout {
            return Err(Transient::NoRefillSlot(ctx.lock_timeout).into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Deploys one pooled instance under a fresh identity's lock: a `deploying`
/// reservation, `pulumi up`, ready. Its deploy time feeds an adaptive
/// pool's estimate.
async fn deploy_one(
    ctx: &Ctx,
    fence: &Fence,
    command_id: &str,
    challenge: &ChallengeRecord,
) -> Result<(), HandlerError> {
    let cid = &challenge.id;
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
        deployed_from: None,
    };
    let started = Instant::now();
    let result = match locked
        .store
        .put_instance_rev(&record, None, Expect::Absent, None)
        .await
    {
        Ok(revision) => Box::pin(deploy_reserved(&locked, challenge, &mut record, revision)).await,
        Err(e) => Err(e.into()),
    };
    guard.release();
    result?;
    if challenge.pool == PoolMode::Adaptive {
        ctx.note_deploy(cid, started.elapsed()).await;
    }
    Ok(())
}

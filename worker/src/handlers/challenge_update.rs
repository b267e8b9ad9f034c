//! `challenge.update`: change a challenge; move its instances' `until` when
//! `timeout`/`until` change; apply a new scenario (or `additional`) to every
//! running instance, pooled and claimed, with the requested strategy.
//!
//! Parameters: the update request; `update_mask` names the fields to change
//! (empty: every field the request sets); `update_strategy`.
//! Steps: 1. under the challenge write lock: prepare the new scenario (a
//! broken one is refused before anything changes), move instances' `until`,
//! write the challenge (guarded by its revision); 2. release the lock, ask
//! for the pool's refill if the challenge has a pool (a claim's refill that
//! met the lock stepped aside), and publish one `instance.update` per
//! instance, in parallel across workers;
//! 3. wait for their results and report how many succeeded and failed.
//! Which instances step 2 updates comes from the records, not from the
//! request alone: each record says what its stack was deployed from
//! (`deployed_from`), so a delivery after one that wrote the challenge and
//! died before its fan-out still updates every instance left behind.
//! Undo: an instance whose update fails keeps its previous state and record
//! (see `instance_update`); the failure count is reported.

use cm_core::{
    DomainError, Identity, ids,
    lock::LockMode,
    model::{ChallengeRecord, InstanceRecord, to_system_time},
    protocol::reply,
    store::Expect,
};
use cm_schemas::v1::{
    CommandResult, UpdateChallengeRequest, UpdateInstance, UpdateStrategy, command::Request,
    command_result::Outcome,
};
use futures::StreamExt;

use super::{HandlerError, Transient, deployed_from};
use crate::{context::Ctx, failpoint};

#[tracing::instrument(name = "challenge.update", skip_all, fields(challenge = %req.id, updated, failed))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &UpdateChallengeRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.id)?;
    let lock = ctx.lock_challenge(&req.id, LockMode::Write).await?;
    failpoint::pause("challenge-update-locked", &req.id, failpoint::Waits::First).await;
    let prepared = update_record(&ctx.locked(&lock.fence()), command_id, req).await;
    // Awaited: the refill asked for below must find the lock gone.
    lock.release_now().await;
    let (next, targets, strategy, resized) = prepared?;
    failpoint::hit("challenge-update-before-fan-out");
    // A claim's refill that came while this update held the lock stepped
    // aside (it waits only briefly, see `pool_refill`): any pool is asked
    // to refill once the lock is gone, resized or not.
    if resized || has_pool(&next) {
        ctx.request_refill(&next.id).await;
    }

    // The instances are updated by their own commands, in parallel across
    // workers (the challenge lock is free again, so they can take it to read).
    let (updated, failed) = fan_out(ctx, command_id, &next.id, &targets, strategy).await?;
    let span = tracing::Span::current();
    span.record("updated", updated);
    span.record("failed", failed);
    if failed > 0 {
        return Err(DomainError::new(
            cm_schemas::v1::Code::Aborted,
            format!(
                "challenge updated; {updated} of {} instances updated, {failed} failed",
                targets.len()
            ),
        )
        .into());
    }
    let instances = ctx.store.list_instances(&next.id).await?;
    let api = instances
        .iter()
        .filter(|r| r.source_id.is_some())
        .map(InstanceRecord::to_api)
        .collect();
    Ok(Outcome::Challenge(next.to_api(api)))
}

/// Whether the challenge keeps instances pooled: a static pool of `min`
/// above 0, or an adaptive one (its demand may want some).
fn has_pool(challenge: &ChallengeRecord) -> bool {
    challenge.min > 0 || challenge.pool == cm_core::pool_demand::PoolMode::Adaptive
}

fn masked(req: &UpdateChallengeRequest, field: &str, set: bool) -> bool {
    match &req.update_mask {
        Some(mask) if !mask.paths.is_empty() => mask.paths.iter().any(|p| p == field),
        _ => set,
    }
}

/// The record after applying the request.
pub(crate) fn apply(current: &ChallengeRecord, req: &UpdateChallengeRequest) -> ChallengeRecord {
    let mut next = current.clone();
    if masked(req, "scenario", req.scenario.is_some())
        && let Some(s) = &req.scenario
    {
        next.scenario = s.clone();
    }
    if masked(req, "timeout", req.timeout.is_some()) {
        next.timeout = req.timeout;
    }
    if masked(req, "until", req.until.is_some()) {
        next.until = req.until;
    }
    if masked(req, "additional", !req.additional.is_empty()) {
        next.additional = req.additional.clone().into_iter().collect();
    }
    if masked(req, "min", req.min.is_some()) {
        next.min = req.min.unwrap_or(0);
    }
    if masked(req, "max", req.max.is_some()) {
        next.max = req.max.unwrap_or(0);
    }
    if masked(req, "max_per_source", req.max_per_source.is_some()) {
        next.max_per_source = req.max_per_source;
    }
    if masked(req, "pool", req.pool.is_some()) {
        next.pool = req
            .pool
            .as_deref()
            .and_then(cm_core::pool_demand::PoolMode::parse)
            .unwrap_or_default();
    }
    next
}

/// Under the challenge write lock: checks the new scenario (so a broken one
/// changes nothing), moves instances' `until`, writes the challenge. Returns
/// the instances whose stacks must be updated, how, and whether the pool
/// was resized (its refill is asked for once the lock is released).
async fn update_record(
    ctx: &crate::context::Locked<'_>,
    command_id: &str,
    req: &UpdateChallengeRequest,
) -> Result<(ChallengeRecord, Vec<Identity>, UpdateStrategy, bool), HandlerError> {
    let Some(current) = ctx.store.get_challenge(&req.id).await? else {
        return Err(DomainError::challenge_not_found(&req.id).into());
    };
    let next = apply(&current.value, req);
    if next.min < 0 || next.max < 0 || (next.max > 0 && next.min > next.max) {
        let (min, max) = (next.min.to_string(), next.max.to_string());
        return Err(
            DomainError::invalid("min and max must be >= 0, and min <= max when max > 0")
                .with_reason(
                    cm_core::error::reasons::CHALLENGE_POOLER_OUT_OF_BOUNDS,
                    [("min", min.as_str()), ("max", max.as_str())],
                )
                .with_violation(cm_core::error::FieldViolation::new(
                    "min",
                    "INVERTED_BOUNDARIES",
                    "When an upper bound is defined, minimum cannot exceed maximum.",
                ))
                .into(),
        );
    }
    let scenario_changed = next.scenario != current.value.scenario;
    let redeploy = scenario_changed || next.additional != current.value.additional;
    if redeploy {
        ctx.scenario(&next.scenario).await?;
    }
    // The requested strategy applies when the request names a scenario
    // (on its first delivery and on any other alike).
    let strategy = if masked(req, "scenario", req.scenario.is_some()) && req.scenario.is_some() {
        req.update_strategy
            .and_then(|s| UpdateStrategy::try_from(s).ok())
            .unwrap_or(UpdateStrategy::UpdateInPlace)
    } else {
        UpdateStrategy::UpdateInPlace
    };

    let versioned = ctx.store.list_instances_versioned(&req.id).await?;
    for v in &versioned {
        let rec = &v.value;
        if rec.source_id.is_none() {
            continue;
        }
        let until = next.instance_until(to_system_time(&rec.last_renew));
        if rec.until != until {
            let mut moved = rec.clone();
            moved.until = until;
            moved.command_id = command_id.to_owned();
            // The challenge write lock excludes every other writer of its
            // instances; the revision guard and the fence make it checked.
            ctx.store
                .put_instance(&moved, None, Expect::Revision(v.mod_revision), Some(rec))
                .await?;
        }
    }
    ctx.store
        .put_challenge(&next, Expect::Revision(current.mod_revision))
        .await?;
    let resized = next.min != current.value.min
        || next.max != current.value.max
        || next.pool != current.value.pool;
    // Every instance when this delivery changes the program; otherwise
    // those known to run something else than the challenge now says (an
    // earlier delivery wrote the challenge, then died before its fan-out).
    let targets = versioned
        .iter()
        .filter(|v| {
            redeploy
                || v.value
                    .deployed_from
                    .as_ref()
                    .is_some_and(|from| *from != deployed_from(&next, &v.value))
        })
        .map(|v| v.value.identity.clone())
        .collect();
    Ok((next, targets, strategy, resized))
}

/// How long a challenge update waits for its instances' updates.
const FAN_OUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Publishes one `instance.update` per target and waits for their results.
async fn fan_out(
    ctx: &Ctx,
    command_id: &str,
    cid: &str,
    targets: &[Identity],
    strategy: UpdateStrategy,
) -> Result<(usize, usize), HandlerError> {
    if targets.is_empty() {
        return Ok((0, 0));
    }
    let inbox = ctx.nats.new_inbox();
    let mut replies = ctx
        .nats
        .subscribe(reply::subscription(&inbox))
        .await
        .map_err(Transient::Subscribe)?;
    for identity in targets {
        let request = Request::InstanceUpdate(UpdateInstance {
            challenge_id: cid.to_owned(),
            identity: identity.to_string(),
            strategy: strategy as i32,
            parent_command_id: command_id.to_owned(),
        });
        ctx.publish_with_reply(request, Some(&inbox)).await?;
    }
    // From here on this command only waits for its children: its permit
    // lets this worker run them (at concurrency 1 it would wait for ever).
    crate::permit::yield_permit();
    let (mut updated, mut failed) = (0, 0);
    let collect = async {
        while updated + failed < targets.len() {
            let Some(msg) = replies.next().await else {
                break;
            };
            match reply::decode(msg.payload) {
                Ok(CommandResult {
                    outcome: Some(Outcome::Instance(_)),
                    ..
                }) => updated += 1,
                _ => failed += 1,
            }
        }
    };
    if tokio::time::timeout(FAN_OUT_TIMEOUT, collect)
        .await
        .is_err()
    {
        return Err(DomainError::new(
            cm_schemas::v1::Code::DeadlineExceeded,
            format!(
                "challenge updated; {updated} instances updated, {failed} failed, {} still running",
                targets.len() - updated - failed
            ),
        )
        .into());
    }
    Ok((updated, failed))
}

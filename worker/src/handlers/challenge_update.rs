//! `challenge.update`: change a challenge; apply a new scenario to its
//! instances and move their `until` when `timeout`/`until` change.
//!
//! Parameters: the update request; `update_mask` names the fields to change
//! (empty: every field the request sets).
//! Steps: 1. write-lock the challenge; 2. compute the new record; 3. when the
//! scenario changes, prepare it (a broken one is refused before anything
//! changes) and update every instance in place; 4. recompute instances'
//! `until`; 5. write the challenge (guarded by its revision).
//! Undo: an instance whose update fails keeps its previous state and record;
//! the command reports the failure count.

use cm_core::{
    DomainError, ids,
    lock::LockMode,
    model::{ChallengeRecord, InstanceRecord, to_system_time},
    store::Expect,
};
use cm_schemas::v1::{UpdateChallengeRequest, command_result::Outcome};

use super::{HandlerError, encode_state, stack_state};
use crate::context::Ctx;

#[tracing::instrument(name = "challenge.update", skip_all, fields(challenge = %req.id))]
pub async fn handle(
    ctx: &Ctx,
    command_id: &str,
    req: &UpdateChallengeRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.id)?;
    let lock = ctx.lock_challenge(&req.id, LockMode::Write).await?;
    let result = update(ctx, command_id, req).await;
    lock.release();
    result
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
    next
}

async fn update(
    ctx: &Ctx,
    command_id: &str,
    req: &UpdateChallengeRequest,
) -> Result<Outcome, HandlerError> {
    let Some(current) = ctx.store.get_challenge(&req.id).await? else {
        return Err(DomainError::not_found(format!("challenge {} not found", req.id)).into());
    };
    let next = apply(&current.value, req);
    if next.min < 0 || next.max < 0 || (next.max > 0 && next.min > next.max) {
        return Err(
            DomainError::invalid("min and max must be >= 0, and min <= max when max > 0").into(),
        );
    }
    let scenario_changed = next.scenario != current.value.scenario;
    let scenario = if scenario_changed || next.additional != current.value.additional {
        Some(ctx.scenario(&next.scenario).await?)
    } else {
        None
    };

    let mut instances = ctx.store.list_instances(&req.id).await?;
    let mut failed = 0usize;
    for rec in &mut instances {
        let before = rec.clone();
        if let Some(scenario) = &scenario {
            match redeploy(ctx, scenario, &next, rec, command_id).await {
                Ok(()) => {}
                Err(HandlerError::Retry(e)) => return Err(HandlerError::Retry(e)),
                Err(HandlerError::Domain(e)) => {
                    tracing::warn!(identity = %rec.identity, error = %e, "instance update failed");
                    failed += 1;
                    *rec = before;
                    continue;
                }
            }
        }
        let until = next.instance_until(to_system_time(&rec.last_renew));
        if rec.until != until || *rec != before {
            rec.until = until;
            rec.command_id = command_id.to_owned();
            // The challenge write lock excludes every other writer of its instances.
            ctx.store
                .put_instance(rec, None, Expect::Any, Some(&before))
                .await?;
        }
    }
    ctx.store
        .put_challenge(&next, Expect::Revision(current.mod_revision))
        .await?;
    if next.min != current.value.min || next.max != current.value.max {
        ctx.request_refill(&next.id).await;
    }
    if failed > 0 {
        return Err(DomainError::new(
            cm_schemas::v1::Code::Aborted,
            format!(
                "challenge updated, but {failed} of {} instances failed to update",
                instances.len()
            ),
        )
        .into());
    }
    let api = instances.iter().map(InstanceRecord::to_api).collect();
    Ok(Outcome::Challenge(next.to_api(api)))
}

/// Updates one instance in place with the (new) scenario.
async fn redeploy(
    ctx: &Ctx,
    scenario: &crate::pulumi::PreparedScenario,
    challenge: &ChallengeRecord,
    rec: &mut InstanceRecord,
    command_id: &str,
) -> Result<(), HandlerError> {
    let previous = stack_state(ctx, &rec.challenge_id, &rec.identity).await?;
    let mut additional = challenge.additional.clone();
    additional.extend(rec.additional.clone());
    let deployment = ctx
        .driver
        .up(scenario, &rec.identity, &additional, previous.as_ref())
        .await?;
    rec.connection_info = deployment.outputs.connection_info;
    rec.flags = deployment.outputs.flags;
    rec.command_id = command_id.to_owned();
    let stack = encode_state(&deployment.state)?;
    ctx.store
        .put_instance(rec, Some(&stack), Expect::Any, None)
        .await?;
    Ok(())
}

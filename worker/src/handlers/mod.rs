//! Command handlers, one file per command, each written saga-style: the
//! parameters it reads, its steps (each idempotent, since JetStream delivers
//! at least once), and what it undoes when a step fails.
//!
//! A handler returns the command's outcome, a [`DomainError`] that is the
//! command's final answer (not found, already exists, ...), or a retryable
//! error that sends the command back to the queue with backoff.
//!
//! Locks and fencing (see `docs/invariants.md`): a handler takes its locks,
//! then writes only through [`Locked`], whose store is fenced by them; every
//! transition of one deployed identity also takes that identity's lock
//! ([`lock_claimed`] for source-addressed commands); a handler whose lease
//! is lost is stopped ([`handle`]), its Pulumi child killed with it.

mod challenge_create;
mod challenge_delete;
mod challenge_update;
mod fresh;
mod instance_create;
mod instance_delete;
mod instance_expire;
mod instance_renew;
mod instance_reset;
mod instance_update;
mod pool_refill;
mod stack_reclaim;

use cm_core::{
    DomainError,
    lock::{LockGuard, LockSet},
    model::InstanceRecord,
    store::{Expect, Fence, Versioned},
};
use cm_schemas::v1::{Command, command::Request, command_result::Outcome};

pub use crate::error::{HandlerError, Transient};
use crate::{
    context::{Ctx, Locked},
    pulumi::DriverError,
};

/// Runs the handler of `command`, stopped (its future dropped, which kills
/// a Pulumi child: `kill_on_drop`) as soon as the lease its locks hang on is
/// lost: its locks may belong to another worker by now.
pub async fn handle(ctx: &Ctx, command: &Command) -> Result<Outcome, HandlerError> {
    let lost = ctx.session.lost();
    tokio::select! {
        biased;
        () = lost.cancelled() => {
            tracing::error!("the worker's lease was lost: this handler is stopped, its locks are gone");
            Err(Transient::LeaseLost.into())
        }
        // Boxed: handler futures are large, and the select would hold one
        // inline on a worker thread's stack (it overflowed in debug builds).
        outcome = Box::pin(dispatch(ctx, command)) => outcome,
    }
}

async fn dispatch(ctx: &Ctx, command: &Command) -> Result<Outcome, HandlerError> {
    let id = command.command_id.as_str();
    let Some(request) = &command.request else {
        return Err(DomainError::invalid("empty command").into());
    };
    match request {
        Request::ChallengeCreate(r) => challenge_create::handle(ctx, id, r).await,
        Request::ChallengeUpdate(r) => challenge_update::handle(ctx, id, r).await,
        Request::ChallengeDelete(r) => challenge_delete::handle(ctx, id, r).await,
        Request::InstanceCreate(r) => instance_create::handle(ctx, id, r).await,
        Request::InstanceRenew(r) => instance_renew::handle(ctx, id, r).await,
        Request::InstanceDelete(r) => instance_delete::handle(ctx, command, r).await,
        Request::InstanceExpire(r) => instance_expire::handle(ctx, id, r).await,
        Request::PoolRefill(r) => pool_refill::handle(ctx, id, r).await,
        Request::StackReclaim(r) => stack_reclaim::handle(ctx, id, r).await,
        Request::InstanceReset(r) => instance_reset::handle(ctx, id, r).await,
        Request::InstanceUpdate(r) => instance_update::handle(ctx, id, r).await,
    }
}

/// `up` of an instance's own stack, each checkpoint stored as Pulumi writes
/// it (see `pulumi::CheckpointSink`): a worker killed mid-run leaves the
/// state of what it deployed for the next delivery to resume from.
pub(crate) async fn up_persisted(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    record: &cm_core::model::InstanceRecord,
    additional: &std::collections::BTreeMap<String, String>,
    previous: Option<&crate::pulumi::StackState>,
) -> Result<crate::pulumi::Deployment, DriverError> {
    // A new stack is recorded before its first run: whatever kills that
    // run, a state names the stack (and says the run had not ended).
    let fresh;
    let previous = match previous {
        Some(p) => Some(p),
        None => {
            fresh = Box::pin(ctx.driver.new_stack(scenario, &record.identity, additional)).await?;
            Box::pin(crate::stacks::record_new(
                ctx,
                &record.challenge_id,
                &record.identity,
                &fresh,
            ))
            .await
            .map_err(|e| DriverError::EngineUnavailable {
                reason: format!("the run was not started, its new stack not recorded: {e}"),
            })?;
            Some(&fresh)
        }
    };
    let marked = mark_run(ctx, &record.challenge_id, &record.identity).await?;
    let (sink, writer) = crate::stacks::persist_checkpoints(
        ctx,
        &record.challenge_id,
        &record.identity,
        marked.marker(),
    );
    // Boxed (here and below): the driver's futures are large, and nested
    // inline in a handler's they overflowed a worker thread's stack.
    let result = Box::pin(ctx.driver.up_with(
        scenario,
        &record.identity,
        additional,
        previous,
        Some(&sink),
    ))
    .await;
    drop(sink);
    let _ = writer.await;
    marked.end(ctx).await;
    result
}

/// [`crate::run_marker::begin`], a failure telling why the run did not
/// start (retried as a driver that could not run).
async fn mark_run(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &cm_core::Identity,
) -> Result<crate::run_marker::Marked, DriverError> {
    crate::run_marker::begin(ctx, cid, identity)
        .await
        .map_err(|e| DriverError::EngineUnavailable {
            reason: format!("the run was not started, its marker not written: {e}"),
        })
}

/// `destroy` of the stack of `identity`, checkpoints stored as they come.
pub(crate) async fn destroy_persisted(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    cid: &str,
    identity: &cm_core::Identity,
    state: &crate::pulumi::StackState,
) -> Result<crate::pulumi::StackState, DriverError> {
    let marked = mark_run(ctx, cid, identity).await?;
    let (sink, writer) = crate::stacks::persist_checkpoints(ctx, cid, identity, marked.marker());
    let result = Box::pin(ctx.driver.destroy_with(scenario, state, Some(&sink))).await;
    drop(sink);
    let _ = writer.await;
    marked.end(ctx).await;
    result
}

/// The one undo of a deploy that failed part-way: destroys what the run
/// left (`state`, when it holds resources), the destroy's checkpoints
/// stored under `record`'s identity as they come. `Err` hands back the
/// failure and the state still deployed, for the caller to keep.
pub(crate) async fn undo_failed_deploy(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    record: &cm_core::model::InstanceRecord,
    state: Option<Box<crate::pulumi::StackState>>,
) -> Result<(), (DriverError, crate::pulumi::StackState)> {
    let Some(state) = state.filter(|s| s.may_hold_resources()) else {
        return Ok(());
    };
    match destroy_persisted(
        ctx,
        scenario,
        &record.challenge_id,
        &record.identity,
        &state,
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::error!(
                error = %e,
                stack = %state.stack,
                orphaned = ?state.resource_urns(),
                "cleanup of a failed deploy failed"
            );
            Err((e, *state))
        }
    }
}

/// Destroys an instance's stack (when it has state) and deletes its records,
/// guarded by the revision the caller read under its locks.
pub(crate) async fn destroy_instance(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    versioned: &Versioned<InstanceRecord>,
) -> Result<(), HandlerError> {
    let rec = &versioned.value;
    if let Some(state) = crate::stacks::load(ctx, &rec.challenge_id, &rec.identity).await? {
        destroy_or_retry(ctx, scenario, &rec.challenge_id, &rec.identity, &state).await?;
    }
    crate::stacks::delete_record(ctx, rec, Expect::Revision(versioned.mod_revision)).await
}

/// [`destroy_persisted`], a failed program being retried later (the state
/// kept), not forgotten.
pub(crate) async fn destroy_or_retry(
    ctx: &Locked<'_>,
    scenario: &crate::pulumi::PreparedScenario,
    cid: &str,
    identity: &cm_core::Identity,
    state: &crate::pulumi::StackState,
) -> Result<(), HandlerError> {
    destroy_persisted(ctx, scenario, cid, identity, state)
        .await
        .map(drop)
        .map_err(|e| match e {
            DriverError::ProgramFailed { message, .. } => {
                HandlerError::Transient(Transient::Destroy(message))
            }
            other => other.into(),
        })
}

/// The configuration an instance's program sees: the challenge's
/// `additional`, overridden by the instance's own.
pub(crate) fn merged_additional(
    challenge: &cm_core::model::ChallengeRecord,
    record: &cm_core::model::InstanceRecord,
) -> std::collections::BTreeMap<String, String> {
    let mut additional = challenge.additional.clone();
    additional.extend(record.additional.clone());
    additional
}

/// What `record`'s stack is deployed from under `challenge` (see
/// [`cm_core::model::deployment_fingerprint`]).
pub(crate) fn deployed_from(
    challenge: &cm_core::model::ChallengeRecord,
    record: &InstanceRecord,
) -> String {
    cm_core::model::deployment_fingerprint(
        &challenge.scenario,
        &merged_additional(challenge, record),
    )
}

/// Copies a deployment (of `challenge`'s scenario) onto `record` and writes
/// the record with the new stack state; returns the record's new revision.
pub(crate) async fn store_deployment(
    ctx: &Locked<'_>,
    challenge: &cm_core::model::ChallengeRecord,
    record: &mut cm_core::model::InstanceRecord,
    deployment: crate::pulumi::Deployment,
    expect: cm_core::store::Expect,
    previous: Option<&cm_core::model::InstanceRecord>,
) -> Result<i64, HandlerError> {
    record.connection_info = deployment.outputs.connection_info;
    record.flags = deployment.outputs.flags;
    record.deployed_from = Some(deployed_from(challenge, record));
    crate::stacks::write_record(ctx, record, Some(&deployment.state), expect, previous).await
}

/// The locks of a command addressed to a source's claimed instance
/// (delete, reset, expiry): the challenge read lock and the slot's, then the
/// lock of the identity the slot holds, with the record read under them.
pub(crate) struct ClaimLocks {
    slot: LockSet,
    identity: Option<LockGuard>,
    /// The claimed record (none: the slot is empty), read once every lock
    /// was held; its revision guards the command's final write.
    pub record: Option<Versioned<InstanceRecord>>,
}

impl ClaimLocks {
    /// The fence of every lock held.
    pub fn fence(&self) -> Fence {
        match &self.identity {
            Some(g) => self.slot.fence().and(&g.fence()),
            None => self.slot.fence(),
        }
    }

    /// Releases every lock (in the background).
    pub fn release(self) {
        drop(self.identity);
        self.slot.release();
    }
}

/// The prologue and epilogue of every command addressed to a source's
/// claimed instance (delete, reset, expiry): the ids checked, its locks
/// taken ([`lock_claimed`]) and its record read under them, `body` run with
/// the view fenced by those locks, and the locks released whatever `body`
/// returned.
pub(crate) async fn on_claimed<T>(
    ctx: &Ctx,
    cid: &str,
    sid: &str,
    body: impl AsyncFnOnce(&Locked<'_>, Option<Versioned<InstanceRecord>>) -> Result<T, HandlerError>,
) -> Result<T, HandlerError> {
    cm_core::ids::validate("challenge id", cid)?;
    cm_core::ids::validate("source id", sid)?;
    let locks = lock_claimed(ctx, cid, sid).await?;
    let locked = ctx.locked(&locks.fence());
    let result = body(&locked, locks.record.clone()).await;
    locks.release();
    result
}

/// Takes the locks of a source's claimed instance. The identity is known
/// only once the slot is read, so its lock comes second; the slot is read
/// again under it, since a blue-green update (which holds only the identity
/// lock) may have switched the slot to a new identity meanwhile.
pub(crate) async fn lock_claimed(
    ctx: &Ctx,
    cid: &str,
    sid: &str,
) -> Result<ClaimLocks, HandlerError> {
    lock_claimed_within(ctx, cid, sid, ctx.lock_timeout).await
}

/// [`lock_claimed`], each wait at most `timeout`.
pub(crate) async fn lock_claimed_within(
    ctx: &Ctx,
    cid: &str,
    sid: &str,
    timeout: std::time::Duration,
) -> Result<ClaimLocks, HandlerError> {
    let slot = ctx.lock_instance_within(cid, sid, timeout).await?;
    for _ in 0..4 {
        let Some(seen) = ctx.store.get_instance(cid, sid).await? else {
            return Ok(ClaimLocks {
                slot,
                identity: None,
                record: None,
            });
        };
        let guard = ctx
            .lock_identity_within(cid, &seen.value.identity, timeout)
            .await?;
        match ctx.store.get_instance(cid, sid).await? {
            Some(now) if now.value.identity == seen.value.identity => {
                return Ok(ClaimLocks {
                    slot,
                    identity: Some(guard),
                    record: Some(now),
                });
            }
            None => {
                guard.release();
                return Ok(ClaimLocks {
                    slot,
                    identity: None,
                    record: None,
                });
            }
            Some(_) => guard.release_now().await,
        }
    }
    Err(HandlerError::changed(
        "the claimed instance kept changing identity",
    ))
}

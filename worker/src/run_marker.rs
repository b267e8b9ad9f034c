//! One Pulumi run per stack across a lock handover: before a run, its
//! holder writes a marker naming its lease (fenced, so a holder whose lock
//! is gone cannot start one), and removes it when the run has ended.
//!
//! Owns: the wait before a run. A marker of another lease found under the
//! lock means the run it names did not end cleanly: its worker died, or
//! its lease expired or was revoked while the run went on. A dead worker's
//! run died with it, an expired lease's run was stopped by its guard
//! (`pulumi::guard`) before etcd let the lock go; a revoked lease frees
//! the lock at once, while its worker learns of it only at its next
//! keep-alive and only then stops the run. So a marker whose lease etcd no
//! longer holds makes the new holder wait that lease's TTL plus a second
//! (the longest its worker can take to stop the run) before running.
//! A marker whose lease is alive is a run that ended, its removal lost.
//!
//! A run whose lock is lost keeps recording what it deploys for as long as
//! its marker stands (`Store::put_stack_under_marker`), so that what it
//! made is never left without a state naming it. Every read of a stack's
//! state under a lock goes through [`settle`] first: it waits such a run
//! out and removes its marker, so the read sees all the run recorded and
//! the run can record nothing after it.
//!
//! Must not know: what the run does.

use std::time::Duration;

use cm_core::{Identity, store::RunMarker};

use crate::{
    context::{Ctx, Locked},
    error::HandlerError,
};

/// A run's marker, written; [`Marked::end`] removes it.
pub(crate) struct Marked {
    cid: String,
    identity: Identity,
    marker: RunMarker,
}

/// Before reading a stack's state under its lock: waits out the run named
/// by a marker whose lease etcd no longer holds (see [`wait_out_dead`]),
/// then removes that marker. After this, that run's late checkpoint writes
/// are refused (they need its marker), and what it recorded before is
/// there to be read.
pub(crate) async fn settle(ctx: &Ctx, cid: &str, identity: &Identity) -> Result<(), HandlerError> {
    let Some(found) = wait_out_dead(ctx, cid, identity).await? else {
        return Ok(());
    };
    match ctx.store.delete_run_marker(cid, identity, &found).await {
        // Another reader removed it first: as good.
        Ok(()) | Err(cm_core::store::StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Waits until no other run can be going on on the stack, then marks the
/// coming run as this holder's.
pub(crate) async fn begin(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &Identity,
) -> Result<Marked, HandlerError> {
    let mine = RunMarker {
        lease: ctx.session.lease(),
        ttl_secs: ctx.session.ttl().max(1) as u64,
    };
    wait_out_dead(ctx, cid, identity).await?;
    ctx.store.put_run_marker(cid, identity, &mine).await?;
    Ok(Marked {
        cid: cid.to_owned(),
        identity: identity.clone(),
        marker: mine,
    })
}

/// When the stack's marker names another lease that etcd no longer holds,
/// waits that lease's TTL plus a second (the longest its worker can take
/// to stop the run) and returns the marker; `None` at once otherwise.
async fn wait_out_dead(
    ctx: &Ctx,
    cid: &str,
    identity: &Identity,
) -> Result<Option<RunMarker>, HandlerError> {
    let Some(found) = ctx.store.get_run_marker(cid, identity).await? else {
        return Ok(None);
    };
    if found.lease == ctx.session.lease() || ctx.store.lease_alive(found.lease).await? {
        return Ok(None);
    }
    let wait = Duration::from_secs(found.ttl_secs) + Duration::from_secs(1);
    tracing::warn!(
        lease = found.lease,
        ?wait,
        "the stack's last run held a lease that is gone: waiting until its worker must have stopped it"
    );
    tokio::time::sleep(wait).await;
    Ok(Some(found))
}

impl Marked {
    /// This run's marker (what its late checkpoint writes are guarded by).
    pub(crate) fn marker(&self) -> &RunMarker {
        &self.marker
    }

    /// The run has ended: removes its marker (best effort: a marker left
    /// behind costs the next holder one lease check).
    pub(crate) async fn end(self, ctx: &Locked<'_>) {
        if let Err(e) = ctx
            .store
            .delete_run_marker(&self.cid, &self.identity, &self.marker)
            .await
        {
            tracing::debug!(error = %e, "run marker not removed");
        }
    }
}

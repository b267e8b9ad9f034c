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
//! Must not know: what the run does.

use std::time::Duration;

use cm_core::{Identity, store::RunMarker};

use crate::{context::Locked, error::HandlerError};

/// A run's marker, written; [`Marked::end`] removes it.
pub(crate) struct Marked {
    cid: String,
    identity: Identity,
    marker: RunMarker,
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
    if let Some(found) = ctx.store.get_run_marker(cid, identity).await?
        && found.lease != mine.lease
        && !ctx.store.lease_alive(found.lease).await?
    {
        let wait = Duration::from_secs(found.ttl_secs) + Duration::from_secs(1);
        tracing::warn!(
            lease = found.lease,
            ?wait,
            "the stack's last run held a lease that is gone: waiting until its worker must have stopped it"
        );
        tokio::time::sleep(wait).await;
    }
    ctx.store.put_run_marker(cid, identity, &mine).await?;
    Ok(Marked {
        cid: cid.to_owned(),
        identity: identity.clone(),
        marker: mine,
    })
}

impl Marked {
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

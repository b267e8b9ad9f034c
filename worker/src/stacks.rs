//! Where handlers keep an instance's Pulumi state between runs: the bytes
//! in the JetStream object store ([`cm_core::stack_store`]), and in etcd a
//! small pointer written in the same guarded, fenced transaction as the
//! record it belongs to.
//!
//! Owns: turning a [`StackState`] into stored bytes and back, the order of a
//! state write (object first, then the pointer with the record, then the
//! replaced object removed; the new object removed instead when the
//! transaction fails), and checkpoints written while Pulumi runs, at most
//! one per `checkpoint_interval` and only when changed.
//!
//! Must not know: what a state holds (the driver's, `pulumi::StackState`),
//! or the record's own rules (the handlers').
//!
//! Every write here runs under the identity's lock; removing an object is
//! best effort (a failure is logged, and the janitor's sweep collects any
//! object no pointer names).

use cm_core::{
    DomainError, Identity,
    metrics::metrics,
    model::InstanceRecord,
    stack_store::StatePointer,
    store::{Expect, StoreError, StoredStack},
};
use sha2::{Digest, Sha256};

use crate::{
    context::{Ctx, Locked},
    error::HandlerError,
    failpoint,
    pulumi::{CheckpointSink, StackState},
};

/// Bytes of a stored state.
fn encode(state: &StackState) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(state).map_err(|e| {
        tracing::error!(error = %e, "stack state does not serialise");
        HandlerError::Domain(DomainError::internal_error())
    })
}

fn decode(bytes: &[u8]) -> Result<StackState, HandlerError> {
    serde_json::from_slice(bytes).map_err(|e| {
        tracing::error!(error = %e, "stored stack state does not parse");
        HandlerError::Domain(DomainError::internal_error())
    })
}

/// The stored state of a stack, if it has one.
pub(crate) async fn load(
    ctx: &Ctx,
    cid: &str,
    identity: &Identity,
) -> Result<Option<StackState>, HandlerError> {
    match ctx.store.get_stack(cid, identity).await? {
        None => Ok(None),
        Some(StoredStack::Inline(bytes)) => decode(&bytes).map(Some),
        Some(StoredStack::Pointer(p)) => decode(&ctx.stacks.get(&p).await?).map(Some),
    }
}

/// Whether the transaction that was to write a staged pointer committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    Yes,
    No,
    /// etcd failed to answer: the write may have gone through.
    Unknown,
}

impl Committed {
    /// Of a store write.
    pub(crate) fn of<T>(written: &Result<T, StoreError>) -> Self {
        match written {
            Ok(_) => Self::Yes,
            Err(e) => Self::of_error(e),
        }
    }

    /// Of a store write that failed with `e`.
    fn of_error(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Connect { .. } => Self::Unknown,
            _ => Self::No,
        }
    }

    /// Of a handler step made of store writes.
    pub(crate) fn of_step<T>(written: &Result<T, HandlerError>) -> Self {
        match written {
            Ok(_) => Self::Yes,
            Err(HandlerError::Transient(crate::error::Transient::Store(e))) => Self::of_error(e),
            Err(_) => Self::No,
        }
    }
}

/// A state stored in the object store whose pointer is not written yet.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    cid: String,
    identity: Identity,
    pointer: StatePointer,
    /// The object the stack's pointer named when this was staged.
    replaces: Option<String>,
}

impl Staged {
    /// The pointer to write with the record.
    pub(crate) fn pointer(&self) -> &StatePointer {
        &self.pointer
    }

    /// After the transaction that was to write the pointer: removes the
    /// object it replaced when it `committed`, its own object otherwise.
    /// The replaced object is removed in the background: nothing names it
    /// any more, and the command's answer need not wait for it.
    ///
    /// A transaction that failed for want of etcd (the request or its
    /// answer lost) may have committed, or may still commit: a request
    /// etcd's leader took before it died is applied by the next leader,
    /// after any read that says it was not. So a read back that finds the
    /// pointer proves the commit, and one that does not proves nothing:
    /// both objects are kept then (the state sweep collects whichever no
    /// pointer names). The soak found the other way round: a pointer
    /// committed after its object was removed, a stack no one could
    /// destroy.
    pub(crate) async fn settle(self, ctx: &Ctx, committed: Committed) {
        let committed = match committed {
            Committed::Yes => true,
            Committed::No => false,
            Committed::Unknown => {
                if names(&ctx.store, &self.cid, &self.identity, &self.pointer.object).await
                    == Some(true)
                {
                    true
                } else {
                    tracing::warn!(object = %self.pointer.object, "whether the state was recorded is unknown; its object and the one it replaces are kept");
                    return;
                }
            }
        };
        if committed {
            metrics().state_written("etcd", pointer_size(&self.pointer));
            if let Some(old) = self.replaces.filter(|o| *o != self.pointer.object) {
                let objects = ctx.stacks.clone();
                let by = self.pointer.object.clone();
                tokio::spawn(async move {
                    remove_object(&objects, &old, Why::Replaced { by: &by }).await
                });
            }
        } else {
            remove_object(&ctx.stacks, &self.pointer.object, Why::NotRecorded).await;
        }
    }
}

fn pointer_size(p: &StatePointer) -> u64 {
    serde_json::to_vec(p).map_or(0, |v| v.len() as u64)
}

/// Stores `state` as the stack's next state; the caller writes
/// [`Staged::pointer`] with its record, then calls [`Staged::settle`].
pub(crate) async fn stage(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &Identity,
    state: &StackState,
) -> Result<Staged, HandlerError> {
    let bytes = encode(state)?;
    let replaces = stored_object(&ctx.store, cid, identity).await?;
    let pointer = ctx.stacks.put(cid, identity, &bytes).await?;
    metrics().state_written("object", pointer.size);
    Ok(Staged {
        cid: cid.to_owned(),
        identity: identity.clone(),
        pointer,
        replaces,
    })
}

/// Writes `record` and, when given, its stack `state` in one guarded
/// transaction; returns the record's new revision.
pub(crate) async fn write_record(
    ctx: &Locked<'_>,
    record: &InstanceRecord,
    state: Option<&StackState>,
    expect: Expect,
    previous: Option<&InstanceRecord>,
) -> Result<i64, HandlerError> {
    let staged = match state {
        Some(s) => Some(stage(ctx, &record.challenge_id, &record.identity, s).await?),
        None => None,
    };
    if let Some(staged) = staged
        .as_ref()
        .filter(|_| failpoint::answer_lost("instance-write"))
    {
        return write_late(ctx, record, staged, expect, previous).await;
    }
    let written = ctx
        .store
        .put_instance_rev(
            record,
            staged.as_ref().map(Staged::pointer),
            expect,
            previous,
        )
        .await;
    if let Some(staged) = staged {
        staged.settle(ctx, Committed::of(&written)).await;
    }
    Ok(written?)
}

/// The `lose-answer:instance-write` failpoint: the write's answer is lost,
/// the staged state settled as unknown (its read back finds no pointer
/// yet), and then the write applies, as etcd may apply a request after its
/// sender gave up on it. The handler sees etcd unavailable.
async fn write_late(
    ctx: &Locked<'_>,
    record: &InstanceRecord,
    staged: &Staged,
    expect: Expect,
    previous: Option<&InstanceRecord>,
) -> Result<i64, HandlerError> {
    staged.clone().settle(ctx, Committed::Unknown).await;
    let late = ctx
        .store
        .put_instance_rev(record, Some(&staged.pointer), expect, previous)
        .await;
    tracing::warn!(
        applied = late.is_ok(),
        "failpoint: a record write's answer was lost and the write applied late"
    );
    Err(StoreError::Connect {
        endpoints: "(failpoint)".into(),
        detail: "the answer to the record write was lost".into(),
        hint: "",
        permanent: false,
    }
    .into())
}

/// Deletes an instance's records, guarded by `expect`, and its state.
pub(crate) async fn delete_record(
    ctx: &Locked<'_>,
    record: &InstanceRecord,
    expect: Expect,
) -> Result<(), HandlerError> {
    delete_record_answering(ctx, record, expect, None).await
}

/// [`delete_record`], the command's `answer` (its settled operation record)
/// written in the same transaction (see `Store::delete_instance_answering`).
pub(crate) async fn delete_record_answering(
    ctx: &Locked<'_>,
    record: &InstanceRecord,
    expect: Expect,
    answer: Option<&cm_core::protocol::OperationRecord>,
) -> Result<(), HandlerError> {
    let object = stored_object(&ctx.store, &record.challenge_id, &record.identity).await?;
    let answer = match answer {
        Some(a) => Some((a, ctx.retention.id().await?)),
        None => None,
    };
    ctx.store
        .delete_instance_answering(record, expect, answer)
        .await?;
    if let Some(object) = object {
        remove_object(&ctx.stacks, &object, Why::RecordDeleted).await;
    }
    Ok(())
}

/// Deletes a stack's state (the old identity after a reset or a blue/green
/// update, its stack destroyed).
pub(crate) async fn delete(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &Identity,
) -> Result<(), HandlerError> {
    let object = stored_object(&ctx.store, cid, identity).await?;
    ctx.store.delete_stack(cid, identity).await?;
    if let Some(object) = object {
        remove_object(&ctx.stacks, &object, Why::StackDeleted).await;
    }
    Ok(())
}

/// Whether the stack's pointer names `object` now (`None`: etcd did not say).
async fn names(
    store: &cm_core::store::Store,
    cid: &str,
    identity: &Identity,
    object: &str,
) -> Option<bool> {
    let stored = stored_object(store, cid, identity).await.ok()?;
    Some(stored.as_deref() == Some(object))
}

/// The object the stack's pointer names now, if any.
async fn stored_object(
    store: &cm_core::store::Store,
    cid: &str,
    identity: &Identity,
) -> Result<Option<String>, StoreError> {
    Ok(store
        .get_stack(cid, identity)
        .await?
        .and_then(|s| s.object().map(str::to_owned)))
}

/// Why a state object is removed: every removal is logged with it, so an
/// operator (or the soak's checker) finding a pointer to a missing object
/// can tell which step removed it.
#[derive(Debug, Clone, Copy)]
enum Why<'a> {
    /// A newer object the stack's pointer now names replaced it.
    Replaced { by: &'a str },
    /// Its pointer's write failed: nothing names it.
    NotRecorded,
    /// The record naming it was deleted.
    RecordDeleted,
    /// The stack's pointer was deleted (its stack destroyed).
    StackDeleted,
}

impl std::fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Replaced { by } => write!(f, "replaced by {by}"),
            Self::NotRecorded => f.write_str("its pointer was not recorded"),
            Self::RecordDeleted => f.write_str("its record was deleted"),
            Self::StackDeleted => f.write_str("its stack pointer was deleted"),
        }
    }
}

async fn remove_object(objects: &cm_core::stack_store::StackStore, object: &str, why: Why<'_>) {
    match objects.remove(object).await {
        Ok(()) => tracing::info!(object, %why, "stack state object removed"),
        Err(e) => {
            tracing::warn!(error = %e, object, %why, "stack state object not removed; the sweep will")
        }
    }
}

/// A sink whose checkpoints a background task stores as the stack's state,
/// at most one per `ctx.checkpoint_interval` and only when changed: every
/// checkpoint of the run rewrites the run's own object, whose pointer is
/// written once, fenced, at the first (a stale run's pointer is refused and
/// its object removed). The task ends once the sink is dropped and the last
/// checkpoint is stored.
pub(crate) fn persist_checkpoints(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &Identity,
) -> (CheckpointSink, tokio::task::JoinHandle<()>) {
    let (sink, mut rx) = CheckpointSink::channel(ctx.checkpoint_interval);
    let (store, objects) = (ctx.store.clone(), ctx.stacks.clone());
    let (cid, identity) = (cid.to_owned(), identity.clone());
    let writer = tokio::spawn(async move {
        let mut replaced = stored_object(&store, &cid, &identity).await.ok().flatten();
        let live = objects.checkpoint_object(&cid, &identity);
        let (mut written, mut pointed) = (false, false);
        // A pointer write etcd did not answer may still be applied later.
        let mut maybe_pointed = false;
        let mut last_digest = None;
        let (mut stored, mut total) = (0u64, 0u64);
        while rx.changed().await.is_ok() {
            let Some(state) = rx.borrow_and_update().clone() else {
                continue;
            };
            let Ok(bytes) = serde_json::to_vec(&state) else {
                continue;
            };
            let digest = Sha256::digest(&bytes);
            if last_digest == Some(digest) {
                continue;
            }
            if let Err(e) = objects.rewrite(&live, &bytes).await {
                tracing::warn!(error = %e, "checkpoint not stored; the next one will be tried");
                continue;
            }
            written = true;
            metrics().state_written("object", bytes.len() as u64);
            if !pointed {
                match store.put_stack(&cid, &identity, &live).await {
                    Ok(()) => {
                        pointed = true;
                        metrics().state_written("etcd", pointer_size(&live));
                        if let Some(old) = replaced.take() {
                            remove_object(&objects, &old, Why::Replaced { by: &live.object })
                                .await;
                        }
                    }
                    Err(e @ StoreError::Fenced { .. }) => {
                        tracing::warn!(error = %e, "this run lost its lock: its checkpoints are not kept");
                        break;
                    }
                    Err(e) => {
                        maybe_pointed |= Committed::of_error(&e) == Committed::Unknown;
                        tracing::warn!(error = %e, "checkpoint pointer not stored; the next checkpoint tries again");
                        continue;
                    }
                }
            }
            last_digest = Some(digest);
            (stored, total) = (stored + 1, total + bytes.len() as u64);
        }
        // Never pointed to, as far as this task knows. A pointer write
        // whose answer was lost may go through later (see
        // `Staged::settle`): then the object is kept for the sweep.
        if written && !pointed && !maybe_pointed {
            remove_object(&objects, &live.object, Why::NotRecorded).await;
        }
        if stored > 0 {
            tracing::info!(
                checkpoints = stored,
                bytes = total,
                "checkpoints stored while Pulumi ran"
            );
        }
    });
    (sink, writer)
}

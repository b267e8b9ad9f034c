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
    store::{Expect, PointerWrite, RunMarker, StoreError, StoredStack},
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

/// The stored state of a stack, if it has one, once a run that lost its
/// lock can add nothing more to it (see `run_marker::settle`).
pub(crate) async fn load(
    ctx: &Ctx,
    cid: &str,
    identity: &Identity,
) -> Result<Option<StackState>, HandlerError> {
    Box::pin(crate::run_marker::settle(ctx, cid, identity)).await?;
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
    /// The stack key's revision then: the pointer is written only over it.
    over: i64,
}

impl Staged {
    /// The pointer to write with the record, guarded by the revision read.
    pub(crate) fn write(&self) -> PointerWrite<'_> {
        PointerWrite {
            pointer: &self.pointer,
            over: self.over,
        }
    }

    /// After the transaction that was to write the pointer: removes the
    /// object it replaced when it `committed`, its own object otherwise.
    /// The replaced object is removed in the background: nothing names it
    /// any more, and the command's answer need not wait for it.
    ///
    /// A transaction that failed for want of etcd (the request or its
    /// answer lost) may have committed, or may still commit: a request
    /// etcd's leader took before it died is applied by the next leader,
    /// after any read that says it was not. The pointer is written only
    /// over the revision read when staging, so a read back settles it
    /// when it finds the pointer (committed) or the key moved on to
    /// another (it never can commit now); a key still at that revision
    /// proves nothing, and both objects are kept (the state sweep collects
    /// whichever no pointer names). The soak found the other way round: a
    /// pointer committed after its object was removed, a stack no one
    /// could destroy.
    pub(crate) async fn settle(self, ctx: &Ctx, committed: Committed) {
        let committed = match committed {
            Committed::Yes => true,
            Committed::No => false,
            Committed::Unknown => match read_back(&ctx.store, &self).await {
                Some(settled) => settled,
                None => {
                    tracing::warn!(object = %self.pointer.object, "whether the state was recorded is unknown; its object and the one it replaces are kept");
                    return;
                }
            },
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
    let (replaces, over) = stored_object_at(&ctx.store, cid, identity).await?;
    let pointer = ctx.stacks.put(cid, identity, &bytes).await?;
    metrics().state_written("object", pointer.size);
    Ok(Staged {
        cid: cid.to_owned(),
        identity: identity.clone(),
        pointer,
        replaces,
        over,
    })
}

/// Records `state` as the first state of a stack that has none (its pointer
/// written only while the stack key is absent, fenced by the caller's locks).
pub(crate) async fn record_new(
    ctx: &Locked<'_>,
    cid: &str,
    identity: &Identity,
    state: &StackState,
) -> Result<(), HandlerError> {
    let staged = stage(ctx, cid, identity, state).await?;
    let written = ctx.store.put_stack(cid, identity, staged.write()).await;
    staged.settle(ctx, Committed::of(&written)).await;
    written?;
    Ok(())
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
        .put_instance_rev(record, staged.as_ref().map(Staged::write), expect, previous)
        .await;
    if let Some(staged) = staged {
        staged.settle(ctx, Committed::of(&written)).await;
    }
    apply_held_pointers(ctx, &record.challenge_id, &record.identity).await;
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
        .put_instance_rev(record, Some(staged.write()), expect, previous)
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

/// Checkpoint pointer writes the `lose-answer:checkpoint-pointer` failpoint
/// held back: (challenge, identity, pointer, revision it was sent over).
type HeldPointer = (String, Identity, StatePointer, i64);

fn held_pointers() -> &'static std::sync::Mutex<Vec<HeldPointer>> {
    static HELD: std::sync::OnceLock<std::sync::Mutex<Vec<HeldPointer>>> =
        std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// The `lose-answer:checkpoint-pointer` failpoint, second half: a run's
/// checkpoint pointer write whose answer was lost (the run wrote it again
/// at its next checkpoint) is applied by etcd right after the record's
/// final write, its locks still held. Guarded by the revision it was sent
/// over, it must fail.
async fn apply_held_pointers(ctx: &Locked<'_>, cid: &str, identity: &Identity) {
    let held: Vec<HeldPointer> = match held_pointers().lock() {
        // Every record write passes here: nothing to do unless the failpoint held one.
        Ok(all) if all.is_empty() => return,
        Ok(mut all) => {
            let (mine, others) = all
                .drain(..)
                .partition(|(c, i, _, _)| c == cid && i == identity);
            *all = others;
            mine
        }
        Err(_) => return,
    };
    for (_, _, pointer, over) in held {
        let late = ctx
            .store
            .put_stack(
                cid,
                identity,
                PointerWrite {
                    pointer: &pointer,
                    over,
                },
            )
            .await;
        tracing::warn!(
            applied = late.is_ok(),
            "failpoint: a checkpoint pointer write whose answer was lost applied late"
        );
    }
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

/// Whether `staged`'s pointer write committed, read back: `Some(true)` when
/// the stack's pointer names its object, `Some(false)` when the key moved
/// past the revision the write was guarded by to another pointer (the
/// write can never apply), `None` when etcd did not say or the key is
/// still at that revision (the write may yet apply).
async fn read_back(store: &cm_core::store::Store, staged: &Staged) -> Option<bool> {
    let (object, at) = stored_object_at(store, &staged.cid, &staged.identity)
        .await
        .ok()?;
    if object.as_deref() == Some(staged.pointer.object.as_str()) {
        Some(true)
    } else if at != staged.over {
        Some(false)
    } else {
        None
    }
}

/// The object the stack's pointer names now, if any.
async fn stored_object(
    store: &cm_core::store::Store,
    cid: &str,
    identity: &Identity,
) -> Result<Option<String>, StoreError> {
    Ok(stored_object_at(store, cid, identity).await?.0)
}

/// [`stored_object`], and the stack key's revision (0: absent).
async fn stored_object_at(
    store: &cm_core::store::Store,
    cid: &str,
    identity: &Identity,
) -> Result<(Option<String>, i64), StoreError> {
    let (stored, at) = store.get_stack_at(cid, identity).await?;
    Ok((stored.and_then(|s| s.object().map(str::to_owned)), at))
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
    marker: &RunMarker,
) -> (CheckpointSink, tokio::task::JoinHandle<()>) {
    let marker = marker.clone();
    let (sink, mut rx) = CheckpointSink::channel(ctx.checkpoint_interval);
    let (store, objects) = (ctx.store.clone(), ctx.stacks.clone());
    let (cid, identity) = (cid.to_owned(), identity.clone());
    let writer = tokio::spawn(async move {
        // The pointer the run's first checkpoint replaces, and the stack
        // key's revision the write is guarded by (read again if etcd did
        // not answer now).
        let mut base = stored_object_at(&store, &cid, &identity).await.ok();
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
                let (old, over) = match base.clone() {
                    Some(read) => read,
                    None => match stored_object_at(&store, &cid, &identity).await {
                        Ok(read) => base.insert(read).clone(),
                        Err(e) => {
                            tracing::warn!(error = %e, "stack pointer not read; the next checkpoint tries again");
                            continue;
                        }
                    },
                };
                let write = PointerWrite {
                    pointer: &live,
                    over,
                };
                if failpoint::answer_lost("checkpoint-pointer") {
                    if let Ok(mut held) = held_pointers().lock() {
                        held.push((cid.clone(), identity.clone(), live.clone(), over));
                    }
                    maybe_pointed = true;
                    continue;
                }
                failpoint::pause("checkpoint-pointer-first", "", failpoint::Waits::First).await;
                match store.put_stack(&cid, &identity, write).await {
                    Ok(_) => {}
                    // The lock is gone, the run not yet stopped: what it
                    // deployed is recorded while its marker still stands
                    // (no later holder has begun a run on the stack).
                    Err(e @ StoreError::Fenced { .. }) => {
                        match store
                            .put_stack_under_marker(&cid, &identity, write, &marker)
                            .await
                        {
                            Ok(_) => {
                                tracing::warn!(error = %e, "this run lost its lock; its checkpoints are kept under its run marker");
                            }
                            Err(late) => {
                                tracing::warn!(error = %e, refused = %late, "this run lost its lock and another run began: its checkpoints are not kept");
                                break;
                            }
                        }
                    }
                    // An earlier write of this pointer, its answer lost,
                    // may have applied: then the key names this run's object.
                    Err(StoreError::Conflict { .. }) => {
                        match stored_object_at(&store, &cid, &identity).await {
                            Ok((now, _)) if now.as_deref() == Some(live.object.as_str()) => {}
                            Ok(_) => {
                                tracing::warn!(
                                    "the stack's pointer changed under this run: its checkpoints are not kept"
                                );
                                break;
                            }
                            Err(_) => continue,
                        }
                    }
                    Err(e) => {
                        maybe_pointed |= Committed::of_error(&e) == Committed::Unknown;
                        tracing::warn!(error = %e, "checkpoint pointer not stored; the next checkpoint tries again");
                        continue;
                    }
                }
                pointed = true;
                metrics().state_written("etcd", pointer_size(&live));
                if let Some(old) = old {
                    remove_object(&objects, &old, Why::Replaced { by: &live.object }).await;
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

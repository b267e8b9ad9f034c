//! `instance.delete`: destroy an instance and forget it.
//!
//! Parameters: challenge id, source id, `force`.
//! Steps: 1. read-lock the challenge and lock the slot (together), then the
//! lock of the identity the slot holds; 2. destroy the stack (when it has
//! state); 3. delete the records in one transaction, guarded by the revision
//! read under the locks and fenced by them, that also settles the command's
//! operation record as deleted: a worker dying right after it leaves the
//! command answered, and its next delivery answers "deleted" again rather
//! than "not found".
//! Undo: none; a failed destroy is retried with the records intact.
//! Forced (an operator's escape hatch for an instance stuck in a failed
//! state): a destroy that fails, or cannot even start (challenge gone,
//! scenario unusable, state corrupt), is logged with what the stack still
//! holds, and the records are deleted anyway.

use cm_core::{
    DomainError,
    model::InstanceRecord,
    protocol::OperationRecord,
    store::{Expect, Versioned},
};
use cm_schemas::v1::{
    Command, CommandResult, DeleteInstanceRequest, Deleted, command_result::Outcome,
};

use super::{HandlerError, destroy_or_retry, on_claimed};
use crate::{
    context::{Ctx, Locked},
    failpoint,
};

#[tracing::instrument(name = "instance.delete", skip_all, fields(challenge = %req.challenge_id, source = %req.source_id, force = req.force))]
pub async fn handle(
    ctx: &Ctx,
    command: &Command,
    req: &DeleteInstanceRequest,
) -> Result<Outcome, HandlerError> {
    let answer = OperationRecord::settled(
        command,
        CommandResult {
            command_id: command.command_id.clone(),
            finished_at: Some(cm_core::model::now()),
            outcome: Some(Outcome::Deleted(Deleted {})),
        },
    );
    on_claimed(
        ctx,
        &req.challenge_id,
        &req.source_id,
        async |locked, record| delete(locked, record.as_ref(), req, &answer).await,
    )
    .await
}

async fn delete(
    ctx: &Locked<'_>,
    instance: Option<&Versioned<InstanceRecord>>,
    req: &DeleteInstanceRequest,
    answer: &OperationRecord,
) -> Result<Outcome, HandlerError> {
    let (cid, sid) = (&req.challenge_id, &req.source_id);
    let Some(instance) = instance else {
        return Err(DomainError::instance_not_found(cid, sid).into());
    };
    let destroyed = async {
        let challenge = ctx.challenge(cid).await?;
        let scenario = ctx.scenario(&challenge.scenario).await?;
        let rec = &instance.value;
        if let Some(state) = crate::stacks::load(ctx, cid, &rec.identity).await? {
            destroy_or_retry(ctx, &scenario, cid, &rec.identity, &state).await?;
        }
        Ok::<_, HandlerError>(challenge)
    }
    .await;
    match destroyed {
        Ok(challenge) => {
            forget(ctx, instance, answer).await?;
            failpoint::hit("instance-delete-after-write");
            if challenge.min > 0 {
                ctx.request_refill(cid).await;
            }
        }
        Err(e) if req.force => {
            log_leftovers(ctx, &instance.value, &e).await;
            forget(ctx, instance, answer).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(Outcome::Deleted(Deleted {}))
}

/// Deletes the records of an instance, guarded by the revision read under
/// the locks, the command answered in the same transaction.
async fn forget(
    ctx: &Locked<'_>,
    versioned: &Versioned<InstanceRecord>,
    answer: &OperationRecord,
) -> Result<(), HandlerError> {
    crate::stacks::delete_record_answering(
        ctx,
        &versioned.value,
        Expect::Revision(versioned.mod_revision),
        Some(answer),
    )
    .await
}

/// Logs what the stack of an instance that could not be destroyed still
/// holds, for an operator to clean up (a forced delete forgets it anyway).
async fn log_leftovers(ctx: &Locked<'_>, record: &InstanceRecord, why: &HandlerError) {
    let leftover: Vec<String> =
        match crate::stacks::load(ctx, &record.challenge_id, &record.identity).await {
            Ok(Some(state)) => state.resource_urns(),
            Ok(None) => Vec::new(),
            Err(_) => vec!["(unreadable stack state)".to_owned()],
        };
    tracing::error!(
        identity = %record.identity,
        error = %why,
        orphaned = ?leftover,
        "forced delete: the stack could not be destroyed; its resources are orphaned and the records deleted"
    );
}

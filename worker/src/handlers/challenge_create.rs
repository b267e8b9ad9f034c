//! `challenge.create`: register a challenge.
//!
//! Parameters: the create request (validated by the API, re-checked here).
//! Steps: 1. write-lock the challenge; 2. refuse if it exists; 3. resolve and
//! prepare (compile) the scenario, so a broken scenario is refused up front;
//! 4. write the record (guarded: must not exist).
//! Undo: nothing to undo; no step before 4 writes anything.

use cm_core::{
    DomainError, ids,
    lock::LockMode,
    model::ChallengeRecord,
    store::{Expect, StoreError},
};
use cm_schemas::v1::{CreateChallengeRequest, command_result::Outcome};

use super::HandlerError;
use crate::context::Ctx;

#[tracing::instrument(name = "challenge.create", skip_all, fields(challenge = %req.id))]
pub async fn handle(
    ctx: &Ctx,
    _command_id: &str,
    req: &CreateChallengeRequest,
) -> Result<Outcome, HandlerError> {
    ids::validate("challenge id", &req.id)?;
    let lock = ctx.lock_challenge(&req.id, LockMode::Write).await?;
    let record = ChallengeRecord {
        id: req.id.clone(),
        scenario: req.scenario.clone(),
        timeout: req.timeout,
        until: req.until,
        additional: req.additional.clone().into_iter().collect(),
        min: req.min,
        max: req.max,
        max_per_source: req.max_per_source,
        pool: req
            .pool
            .as_deref()
            .and_then(cm_core::pool_demand::PoolMode::parse)
            .unwrap_or_default(),
    };
    if let Some(existing) = ctx.store.get_challenge(&req.id).await? {
        lock.release();
        // A redelivery of this very command finds its own record.
        return if existing.value == record {
            Ok(Outcome::Challenge(record.to_api(Vec::new())))
        } else {
            Err(DomainError::challenge_already_exists(&req.id).into())
        };
    }
    ctx.scenario(&record.scenario).await?;
    let written = ctx
        .store
        .fenced(&lock.fence())
        .put_challenge(&record, Expect::Absent)
        .await;
    lock.release();
    match written {
        Ok(()) => {
            if record.min > 0 {
                ctx.request_refill(&record.id).await;
            }
            Ok(Outcome::Challenge(record.to_api(Vec::new())))
        }
        Err(StoreError::Conflict { .. }) => {
            Err(DomainError::challenge_already_exists(&req.id).into())
        }
        Err(e) => Err(e.into()),
    }
}

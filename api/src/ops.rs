//! The API's operations, shared by the REST routes and the NATS service:
//! reads answered from etcd, writes validated and submitted as commands.

use std::time::Duration;

use cm_core::{
    DomainError, ids,
    model::{ChallengeRecord, InstanceStatus},
    store::Store,
};
use cm_schemas::v1::{
    Challenge, CreateChallengeRequest, CreateInstanceRequest, DeleteChallengeRequest,
    DeleteInstanceRequest, Instance, Operation, RenewInstanceRequest, Requester,
    ResetInstanceRequest, UpdateChallengeRequest, command::Request, command_result::Outcome,
};

use crate::{
    scenarios::Scenarios,
    submit::{Submitted, Submitter, keyed_command_id, validate_idempotency_key},
    validate,
};

/// The result of a write: done, or accepted and still running.
#[derive(Debug)]
pub enum Reply<T> {
    Done(T),
    Accepted { operation_id: String },
}

impl<T: serde::Serialize + prost::Name> Reply<T> {
    /// The result as grpc-gateway prints it ([`crate::json::to_value`]).
    pub fn into_json(self) -> Result<Reply<serde_json::Value>, DomainError> {
        Ok(match self {
            Reply::Done(v) => Reply::Done(crate::json::to_value(&v)?),
            Reply::Accepted { operation_id } => Reply::Accepted { operation_id },
        })
    }
}

impl<T> Reply<T> {
    /// The result, for a caller that waited: a command still running past
    /// the result timeout is [`still_running`].
    pub fn done(self) -> Result<T, DomainError> {
        match self {
            Reply::Done(v) => Ok(v),
            Reply::Accepted { operation_id } => Err(still_running(&operation_id)),
        }
    }
}

/// The answer to a waiting caller whose command outlived the result timeout.
pub fn still_running(operation_id: &str) -> DomainError {
    DomainError::new(
        cm_schemas::v1::Code::DeadlineExceeded,
        format!("the command is still running; poll /api/v1/operation/{operation_id}"),
    )
}

impl Reply<()> {
    /// Deletions answer `{}` (google.protobuf.Empty).
    pub fn into_empty(self) -> Reply<serde_json::Value> {
        match self {
            Reply::Done(()) => Reply::Done(serde_json::json!({})),
            Reply::Accepted { operation_id } => Reply::Accepted { operation_id },
        }
    }
}

/// What the front doors share.
#[derive(Debug, Clone)]
pub struct App {
    pub store: Store,
    pub submitter: Submitter,
    /// How long a write waits for the worker's result.
    pub result_timeout: Duration,
    /// Scenario checks (registries, object store) and uploads.
    pub scenarios: Scenarios,
}

/// How the caller wants a write handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait for the worker's result (up to the result timeout).
    Wait,
    /// Answer as soon as the command is accepted.
    Async,
}

impl Mode {
    /// From the values of the `Prefer` header (RFC 7240), on REST and on
    /// NATS alike: `respond-async` among any comma-separated preferences of
    /// any of the values, in any case, asks for [`Mode::Async`].
    pub fn from_prefer<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let asks_async = values.into_iter().any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        });
        if asks_async { Self::Async } else { Self::Wait }
    }
}

impl App {
    /// Whether the store answers (within 2 s): the health checks' answer.
    pub async fn store_healthy(&self) -> bool {
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            self.store.get_challenge("healthcheck"),
        );
        matches!(read.await, Ok(Ok(_)))
    }

    /// etcd's space (within 2 s), or `None` when the store does not answer.
    pub async fn store_space(&self) -> Option<cm_core::store::EtcdSpace> {
        match tokio::time::timeout(Duration::from_secs(2), self.store.space()).await {
            Ok(Ok(space)) => Some(space),
            _ => None,
        }
    }

    async fn write(
        &self,
        request: Request,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<Outcome>, DomainError> {
        let wait = (mode == Mode::Wait).then_some(self.result_timeout);
        match self.submitter.submit(request, who, wait).await? {
            Submitted::Accepted { operation_id } => Ok(Reply::Accepted { operation_id }),
            Submitted::Done(result) => answer(*result),
        }
    }

    /// A client's retry (same `Idempotency-Key`) of a command already
    /// settled: its recorded answer, given before any check that would now
    /// answer otherwise (the instance it deleted is gone, the challenge it
    /// created exists); keyed writes skip those checks altogether (see
    /// [`unkeyed`]). `None` without a key or a settled command.
    async fn replayed(
        &self,
        request: &Request,
        who: &Requester,
    ) -> Result<Option<Reply<Outcome>>, DomainError> {
        if who.idempotency_key.is_empty() {
            return Ok(None);
        }
        validate_idempotency_key(&who.idempotency_key)?;
        let id = keyed_command_id(&who.principal, request, &who.idempotency_key);
        match self.submitter.settled_result(&id).await? {
            Some(result) => answer(result).map(Some),
            None => Ok(None),
        }
    }

    // ---- challenges ---------------------------------------------------------

    pub async fn create_challenge(
        &self,
        req: CreateChallengeRequest,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<Challenge>, DomainError> {
        validate::create_challenge(&req)?;
        let request = Request::ChallengeCreate(req);
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_challenge(done);
        }
        let Request::ChallengeCreate(req) = request else {
            return Err(unexpected());
        };
        if unkeyed(&who) && self.store.get_challenge(&req.id).await?.is_some() {
            return Err(DomainError::challenge_already_exists(&req.id));
        }
        self.scenarios.check(&req.scenario).await?;
        let scenario = req.scenario.clone();
        let written = self.write(Request::ChallengeCreate(req), who, mode).await;
        expect_challenge(written.map_err(|e| name_scenario(e, &scenario))?)
    }

    pub async fn get_challenge(&self, id: &str) -> Result<Challenge, DomainError> {
        ids::validate("challenge id", id)?;
        let record = self.require_challenge(id).await?;
        let instances = self.ready_instances(id).await?;
        Ok(record.to_api(instances))
    }

    pub async fn list_challenges(&self) -> Result<Vec<Challenge>, DomainError> {
        let mut out = Vec::new();
        for record in self.store.list_challenges().await? {
            let instances = self.ready_instances(&record.id).await?;
            out.push(record.to_api(instances));
        }
        Ok(out)
    }

    /// The challenge `id`, or not found.
    async fn require_challenge(&self, id: &str) -> Result<ChallengeRecord, DomainError> {
        match self.store.get_challenge(id).await? {
            Some(c) => Ok(c.value),
            None => Err(DomainError::challenge_not_found(id)),
        }
    }

    /// Not found unless (`cid`, `sid`) has an instance.
    async fn require_instance(&self, cid: &str, sid: &str) -> Result<(), DomainError> {
        match self.store.get_instance(cid, sid).await? {
            Some(_) => Ok(()),
            None => Err(DomainError::instance_not_found(cid, sid)),
        }
    }

    async fn ready_instances(&self, cid: &str) -> Result<Vec<Instance>, DomainError> {
        Ok(self
            .store
            .list_instances(cid)
            .await?
            .iter()
            .filter(|r| r.status == InstanceStatus::Ready && r.source_id.is_some())
            .map(|r| r.to_api())
            .collect())
    }

    pub async fn update_challenge(
        &self,
        req: UpdateChallengeRequest,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<Challenge>, DomainError> {
        validate::update_challenge(&req)?;
        let request = Request::ChallengeUpdate(req);
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_challenge(done);
        }
        let Request::ChallengeUpdate(req) = request else {
            return Err(unexpected());
        };
        if unkeyed(&who) {
            self.require_challenge(&req.id).await?;
        }
        if let Some(scenario) = &req.scenario {
            self.scenarios.check(scenario).await?;
        }
        let scenario = req.scenario.clone().unwrap_or_default();
        let written = self.write(Request::ChallengeUpdate(req), who, mode).await;
        expect_challenge(written.map_err(|e| name_scenario(e, &scenario))?)
    }

    pub async fn delete_challenge(
        &self,
        id: String,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<()>, DomainError> {
        ids::validate("challenge id", &id)?;
        let request = Request::ChallengeDelete(DeleteChallengeRequest { id: id.clone() });
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_deleted(done);
        }
        if unkeyed(&who) {
            self.require_challenge(&id).await?;
        }
        expect_deleted(self.write(request, who, mode).await?)
    }

    // ---- instances ----------------------------------------------------------

    pub async fn create_instance(
        &self,
        req: CreateInstanceRequest,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<Instance>, DomainError> {
        validate::create_instance(&req)?;
        let request = Request::InstanceCreate(req);
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_instance(done);
        }
        let Request::InstanceCreate(req) = &request else {
            return Err(unexpected());
        };
        if unkeyed(&who) {
            self.require_challenge(&req.challenge_id).await?;
        }
        expect_instance(self.write(request, who, mode).await?)
    }

    pub async fn get_instance(&self, cid: &str, sid: &str) -> Result<Instance, DomainError> {
        validate::instance_key(cid, sid)?;
        match self.store.get_instance(cid, sid).await? {
            Some(v) if v.value.status == InstanceStatus::Ready => Ok(v.value.to_api()),
            _ => Err(DomainError::instance_not_found(cid, sid)),
        }
    }

    pub async fn list_instances(&self, sid: &str) -> Result<Vec<Instance>, DomainError> {
        // No source has the empty id: nothing, as chall-manager answers.
        if sid.is_empty() {
            return Ok(Vec::new());
        }
        ids::validate("source id", sid)?;
        Ok(self
            .store
            .list_by_source(sid)
            .await?
            .iter()
            .filter(|r| r.status == InstanceStatus::Ready)
            .map(|r| r.to_api())
            .collect())
    }

    pub async fn renew_instance(
        &self,
        cid: String,
        sid: String,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<Instance>, DomainError> {
        validate::instance_key(&cid, &sid)?;
        let request = Request::InstanceRenew(RenewInstanceRequest {
            challenge_id: cid,
            source_id: sid,
        });
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_instance(done);
        }
        expect_instance(self.write(request, who, mode).await?)
    }

    pub async fn reset_instance(
        &self,
        cid: String,
        sid: String,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<Instance>, DomainError> {
        validate::instance_key(&cid, &sid)?;
        let request = Request::InstanceReset(ResetInstanceRequest {
            challenge_id: cid.clone(),
            source_id: sid.clone(),
        });
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_instance(done);
        }
        if unkeyed(&who) {
            self.require_instance(&cid, &sid).await?;
        }
        expect_instance(self.write(request, who, mode).await?)
    }

    pub async fn delete_instance(
        &self,
        req: DeleteInstanceRequest,
        who: Requester,
        mode: Mode,
    ) -> Result<Reply<()>, DomainError> {
        validate::instance_key(&req.challenge_id, &req.source_id)?;
        let (cid, sid) = (req.challenge_id.clone(), req.source_id.clone());
        let request = Request::InstanceDelete(req);
        if let Some(done) = self.replayed(&request, &who).await? {
            return expect_deleted(done);
        }
        if unkeyed(&who) {
            // chall-manager answers an unknown challenge before an unknown instance.
            self.require_challenge(&cid).await?;
            self.require_instance(&cid, &sid).await?;
        }
        expect_deleted(self.write(request, who, mode).await?)
    }

    // ---- scenarios ----------------------------------------------------------

    /// Stores an uploaded scenario archive; its `{"scenario": reference}`.
    pub async fn upload_scenario(
        &self,
        archive: bytes::Bytes,
    ) -> Result<serde_json::Value, DomainError> {
        let reference = self.scenarios.upload(archive).await?;
        Ok(serde_json::json!({ "scenario": reference }))
    }

    // ---- operations ---------------------------------------------------------

    pub async fn operation(&self, id: &str) -> Result<Operation, DomainError> {
        ids::validate("operation id", id)?;
        match self.store.get_operation(id).await? {
            Some(record) => Ok(record.into_operation()),
            None => Err(DomainError::operation_not_found(id)),
        }
    }
}

/// A worker's refusal of a scenario names no reference (the worker sees a
/// directory): add the request's, and the `scenario` field at fault, as
/// chall-manager details it.
fn name_scenario(e: DomainError, scenario: &str) -> DomainError {
    use cm_core::error::{FieldViolation, reasons};
    let unnamed = e.reason() == Some(reasons::SCENARIO_NON_MATCHING_SPECIFICATION)
        && e.reason_info()
            .is_some_and(|r| !r.metadata.contains_key("reference"));
    if !unnamed || scenario.is_empty() {
        return e;
    }
    let description = e.message().to_owned();
    e.with_reason(
        reasons::SCENARIO_NON_MATCHING_SPECIFICATION,
        [("reference", scenario)],
    )
    .with_violation(FieldViolation::new("scenario", "VALIDATION", description))
}

/// Whether the write carries no `Idempotency-Key`. Only such writes are
/// checked against the store up front (a quick 404 or 409 without a trip
/// through the queue): a keyed one may be the retry of a command that has
/// just done what the check would refuse (deleted the instance, created the
/// challenge) and not yet recorded it, so it goes to the queue as the same
/// command, where the handler or the recorded answer decides.
fn unkeyed(who: &Requester) -> bool {
    who.idempotency_key.is_empty()
}

/// A command's result as the reply of a write.
fn answer(result: cm_schemas::v1::CommandResult) -> Result<Reply<Outcome>, DomainError> {
    match result.outcome {
        Some(Outcome::Failure(f)) => Err(DomainError::from_failure(&f)),
        Some(other) => Ok(Reply::Done(other)),
        None => Err(DomainError::internal_error()),
    }
}

fn unexpected() -> DomainError {
    DomainError::internal_error()
}

fn expect_challenge(reply: Reply<Outcome>) -> Result<Reply<Challenge>, DomainError> {
    match reply {
        Reply::Done(Outcome::Challenge(c)) => Ok(Reply::Done(c)),
        Reply::Accepted { operation_id } => Ok(Reply::Accepted { operation_id }),
        Reply::Done(_) => Err(unexpected()),
    }
}

fn expect_instance(reply: Reply<Outcome>) -> Result<Reply<Instance>, DomainError> {
    match reply {
        Reply::Done(Outcome::Instance(i)) => Ok(Reply::Done(i)),
        Reply::Accepted { operation_id } => Ok(Reply::Accepted { operation_id }),
        Reply::Done(_) => Err(unexpected()),
    }
}

fn expect_deleted(reply: Reply<Outcome>) -> Result<Reply<()>, DomainError> {
    match reply {
        Reply::Done(Outcome::Deleted(_)) => Ok(Reply::Done(())),
        Reply::Accepted { operation_id } => Ok(Reply::Accepted { operation_id }),
        Reply::Done(_) => Err(unexpected()),
    }
}

#[cfg(test)]
mod mode_tests {
    use super::Mode;

    #[test]
    fn prefer_respond_async_among_other_preferences() {
        assert_eq!(Mode::from_prefer(["respond-async"]), Mode::Async);
        assert_eq!(Mode::from_prefer(["wait=10, Respond-Async"]), Mode::Async);
        assert_eq!(
            Mode::from_prefer(["return=minimal", "respond-async"]),
            Mode::Async
        );
        assert_eq!(Mode::from_prefer(["return=minimal"]), Mode::Wait);
        assert_eq!(Mode::from_prefer(["respond-asynchronously"]), Mode::Wait);
        assert_eq!(Mode::from_prefer([]), Mode::Wait);
    }
}

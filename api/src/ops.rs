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

impl App {
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
            return Err(DomainError::already_exists(format!(
                "challenge {} already exists",
                req.id
            )));
        }
        self.scenarios.check(&req.scenario).await?;
        expect_challenge(self.write(Request::ChallengeCreate(req), who, mode).await?)
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
            None => Err(DomainError::not_found(format!("challenge {id} not found"))),
        }
    }

    /// Not found unless (`cid`, `sid`) has an instance.
    async fn require_instance(&self, cid: &str, sid: &str) -> Result<(), DomainError> {
        match self.store.get_instance(cid, sid).await? {
            Some(_) => Ok(()),
            None => Err(DomainError::not_found(format!(
                "no instance of challenge {cid} for source {sid}"
            ))),
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
        expect_challenge(self.write(Request::ChallengeUpdate(req), who, mode).await?)
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
            _ => Err(DomainError::not_found(format!(
                "no instance of challenge {cid} for source {sid}"
            ))),
        }
    }

    pub async fn list_instances(&self, sid: &str) -> Result<Vec<Instance>, DomainError> {
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
        let Some(bytes) = self.store.get_operation(id).await? else {
            return Err(DomainError::not_found(format!("operation {id} not found")));
        };
        serde_json::from_slice(&bytes).map_err(|_| DomainError::internal("internal error"))
    }
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
        None => Err(DomainError::internal("internal error")),
    }
}

fn unexpected() -> DomainError {
    DomainError::internal("internal error")
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

//! What every command handler works with: the store, the queue, the Pulumi
//! driver, the lease that binds this worker's locks, and the scenario root.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream;
use cm_core::{
    DomainError, ids,
    lock::{self, LockGuard, LockMode, LockSet, Session},
    queue::QueueConfig,
    store::Store,
};

use crate::{
    handlers::HandlerError,
    pulumi::{Driver, PreparedScenario},
};

/// Shared state of a running worker.
#[derive(Debug)]
pub struct Ctx {
    pub store: Store,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub driver: Arc<Driver>,
    pub session: Session,
    pub queue: QueueConfig,
    /// Scenario references resolve to directories under this root.
    pub scenarios_dir: PathBuf,
    /// Longest wait for a lock before the command is retried later.
    pub lock_timeout: Duration,
}

impl Ctx {
    /// Takes the challenge's reader/writer lock.
    pub async fn lock_challenge(
        &self,
        cid: &str,
        mode: LockMode,
    ) -> Result<LockGuard, HandlerError> {
        let prefix = lock::challenge_lock(self.store.root(), cid);
        Ok(lock::acquire(
            &self.store.client(),
            self.session.lease(),
            &prefix,
            mode,
            self.lock_timeout,
        )
        .await?)
    }

    /// Takes the challenge's lock for reading and the (challenge, source)
    /// instance slot's lock for writing, together (one round trip when free).
    pub async fn lock_instance(&self, cid: &str, sid: &str) -> Result<LockSet, HandlerError> {
        let challenge = lock::challenge_lock(self.store.root(), cid);
        let slot = lock::instance_lock(self.store.root(), cid, sid);
        Ok(lock::acquire_all(
            &self.store.client(),
            self.session.lease(),
            &[(&challenge, LockMode::Read), (&slot, LockMode::Write)],
            self.lock_timeout,
        )
        .await?)
    }

    /// Resolves a scenario reference and prepares (validates, compiles) it.
    pub async fn scenario(&self, reference: &str) -> Result<PreparedScenario, HandlerError> {
        let dir = resolve_scenario(&self.scenarios_dir, reference)?;
        Ok(self.driver.prepare(&dir).await?)
    }
}

/// A scenario reference is, for now, a relative directory under the workers'
/// scenario root (`--scenarios-dir`).
pub fn resolve_scenario(root: &std::path::Path, reference: &str) -> Result<PathBuf, DomainError> {
    ids::validate(
        "scenario",
        reference
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default(),
    )?;
    let relative = std::path::Path::new(reference);
    let safe = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !safe {
        return Err(DomainError::invalid(format!(
            "scenario {reference:?} must be a relative path without '..'"
        )));
    }
    let dir = root.join(relative);
    if !dir.is_dir() {
        return Err(DomainError::invalid(format!(
            "scenario {reference:?} not found in the workers' scenario directory"
        )));
    }
    Ok(dir)
}

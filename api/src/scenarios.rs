//! What the API checks about a challenge's scenario before it publishes
//! anything, and direct uploads of scenario archives.
//!
//! - A directory reference is checked for its syntax only (the workers hold
//!   the directories).
//! - An OCI reference is resolved at its registry and its manifest checked
//!   against the scenario layout: it must resolve (tag, repository,
//!   registry reachable), be a scenario artifact, hold a `Pulumi.yaml`, and
//!   have no path leaving the scenario directory. File layers are not
//!   downloaded; a directory layer is, to be checked.
//! - An object reference must name an uploaded archive.
//!
//! Every refusal is a 400 whose message says why.

use async_nats::jetstream;
use bytes::Bytes;
use cm_core::{
    DomainError,
    oci::{self, OciError},
    scenario_ref::ScenarioRef,
    scenario_store::{self, ScenarioStoreError},
};

/// Scenario checks and uploads.
#[derive(Debug, Clone)]
pub struct Scenarios {
    oci: oci::Client,
    js: jetstream::Context,
    /// Largest upload accepted, in bytes.
    pub max_upload: usize,
}

impl Scenarios {
    pub fn new(oci: oci::Client, js: jetstream::Context, max_upload: usize) -> Self {
        Self {
            oci,
            js,
            max_upload,
        }
    }

    /// Checks the scenario `reference` (see the module docs).
    pub async fn check(&self, reference: &str) -> Result<(), DomainError> {
        match parse(reference)? {
            ScenarioRef::Directory(_) => Ok(()),
            ScenarioRef::Oci(r) => match oci::inspect(&self.oci, &r).await {
                Ok(found) => {
                    tracing::debug!(reference = %r, digest = %found.digest, files = found.files.len(), "scenario artifact checked");
                    Ok(())
                }
                Err(e) => Err(oci_error(&e)),
            },
            ScenarioRef::Object(hex) => scenario_store::stat(&self.js, &hex)
                .await
                .map(|_| ())
                .map_err(|e| store_error(&e)),
        }
    }

    /// Checks and stores an uploaded archive; its reference.
    pub async fn upload(&self, archive: Bytes) -> Result<String, DomainError> {
        if archive.is_empty() {
            return Err(DomainError::invalid(
                "the request body is empty; a tar or tar.gz of a scenario directory is expected",
            ));
        }
        let limits = self.oci.config().limits;
        scenario_store::upload(&self.js, archive, self.max_upload as u64, limits)
            .await
            .map_err(|e| store_error(&e))
    }
}

/// Checks a reference's syntax.
pub fn parse(reference: &str) -> Result<ScenarioRef, DomainError> {
    ScenarioRef::parse(reference).map_err(|e| DomainError::invalid(e.to_string()))
}

fn oci_error(e: &OciError) -> DomainError {
    tracing::info!(error = %e, "scenario artifact refused");
    DomainError::invalid(format!("scenario refused: {e}"))
}

fn store_error(e: &ScenarioStoreError) -> DomainError {
    match e {
        ScenarioStoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "object store");
            DomainError::unavailable("the scenario store is unavailable")
        }
        other => DomainError::invalid(other.to_string()),
    }
}

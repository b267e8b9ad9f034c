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
//! Every refusal is a 400 whose message says why, with chall-manager's
//! reason: `OCI_REFERENCE_MALFORMED`, `OCI_REFERENCE_NOT_FOUND`,
//! `OCI_INTERACTION` (registry away or refusing: failed precondition, as
//! chall-manager answers), `SCENARIO_NON_MATCHING_SPECIFICATION`, or
//! `SCENARIO_NOT_FOUND` for an unknown upload.

use async_nats::jetstream;
use bytes::Bytes;
use cm_core::{
    DomainError,
    error::{FieldViolation, reasons},
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
                Err(e) => Err(oci_error(reference, &e)),
            },
            ScenarioRef::Object(hex) => scenario_store::stat(&self.js, &hex)
                .await
                .map(|_| ())
                .map_err(|e| store_error(reference, &e)),
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
            .map_err(|e| store_error("", &e))
    }
}

/// Checks a reference's syntax.
pub fn parse(reference: &str) -> Result<ScenarioRef, DomainError> {
    ScenarioRef::parse(reference).map_err(|e| {
        let text = e.to_string();
        DomainError::invalid(text.clone())
            .with_reason(reasons::OCI_REFERENCE_MALFORMED, [("reference", reference)])
            .with_violation(FieldViolation::new("scenario", "MALFORMED", text))
    })
}

/// A refused scenario: `reason` with the reference, and the `scenario`
/// field at fault.
fn refused(code: cm_schemas::v1::Code, reference: &str, reason: &str, text: String) -> DomainError {
    DomainError::new(code, format!("scenario refused: {text}"))
        .with_reason(reason, [("reference", reference)])
        .with_violation(FieldViolation::new("scenario", reason, text))
}

fn oci_error(reference: &str, e: &OciError) -> DomainError {
    use cm_schemas::v1::Code;
    tracing::info!(error = %e, "scenario artifact refused");
    let text = e.to_string();
    match e {
        OciError::Reference(_) => refused(
            Code::InvalidArgument,
            reference,
            reasons::OCI_REFERENCE_MALFORMED,
            text,
        ),
        OciError::NotFound { .. } => refused(
            Code::InvalidArgument,
            reference,
            reasons::OCI_REFERENCE_NOT_FOUND,
            text,
        ),
        OciError::Unreachable { .. } | OciError::Unauthorized { .. } => refused(
            Code::FailedPrecondition,
            reference,
            reasons::OCI_INTERACTION,
            text,
        ),
        OciError::Registry { .. } => refused(
            Code::InvalidArgument,
            reference,
            reasons::OCI_INTERACTION,
            text,
        ),
        _ => refused(
            Code::InvalidArgument,
            reference,
            reasons::SCENARIO_NON_MATCHING_SPECIFICATION,
            text,
        ),
    }
}

fn store_error(reference: &str, e: &ScenarioStoreError) -> DomainError {
    use cm_schemas::v1::Code;
    match e {
        ScenarioStoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "object store");
            DomainError::unavailable("the scenario store is unavailable")
        }
        ScenarioStoreError::NotFound { .. } => refused(
            Code::InvalidArgument,
            reference,
            reasons::SCENARIO_NOT_FOUND,
            e.to_string(),
        ),
        other => {
            let text = other.to_string();
            let known = (!reference.is_empty()).then_some(("reference", reference));
            let e = DomainError::invalid(text.clone())
                .with_reason(reasons::SCENARIO_NON_MATCHING_SPECIFICATION, known);
            match known {
                Some(_) => e.with_violation(FieldViolation::new("scenario", "VALIDATION", text)),
                None => e,
            }
        }
    }
}

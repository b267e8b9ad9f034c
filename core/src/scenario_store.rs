//! Scenarios uploaded directly (no registry): a tar or tar.gz of a scenario
//! directory kept in the JetStream object store bucket [`BUCKET`] under its
//! SHA-256, and referred to as `nats-object:sha256:<hex>`.
//!
//! An archive is checked by the same rules as OCI layers before it is stored
//! ([`crate::archive`]: no path leaving the directory, no links, size
//! bounds, a `Pulumi.yaml` at the root), and its digest is verified again
//! when a worker fetches it.

use std::path::Path;

use async_nats::jetstream::{self, object_store::ObjectStore};
use sha2::{Digest, Sha256};

use crate::{
    archive::{self, ArchiveError, Budget, Limits},
    object_read::{self, ObjectReadError},
    scenario_ref::ScenarioRef,
};

/// The object store bucket holding uploaded scenarios.
pub const BUCKET: &str = "cm-scenarios";

/// Why an upload or a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioStoreError {
    /// The archive breaks a rule.
    #[error("invalid scenario archive: {0}")]
    Archive(#[from] ArchiveError),
    /// The archive itself is over the size bound.
    #[error("the archive is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// No object under that digest.
    #[error("{reference} is not in the object store; upload it with POST /api/v1/scenario")]
    NotFound { reference: String },
    /// What was read does not hash to its name.
    #[error("{reference} does not match its digest (got sha256:{actual})")]
    DigestMismatch { reference: String, actual: String },
    /// JetStream failed (retryable).
    #[error("object store unavailable: {0}")]
    Unavailable(String),
}

impl ScenarioStoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Archive(ArchiveError::Io { .. })
        )
    }
}

/// The scenario bucket, created (file storage, one replica) when missing.
/// Processes create it with the deployment's replicas at start
/// ([`ensure_bucket`], from `protocol::ensure_streams`).
pub async fn bucket(js: &jetstream::Context) -> Result<ObjectStore, ScenarioStoreError> {
    ensure_bucket(js, 1).await
}

/// The scenario bucket, created with `replicas` when missing.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<ObjectStore, ScenarioStoreError> {
    if let Ok(store) = js.get_object_store(BUCKET).await {
        return Ok(store);
    }
    js.create_object_store(jetstream::object_store::Config {
        bucket: BUCKET.into(),
        description: Some("ctf-instancer: uploaded scenario archives by sha256".into()),
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| ScenarioStoreError::Unavailable(e.to_string()))
}

fn object_name(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// Checks `archive` (tar or tar.gz of a scenario directory, at most
/// `max_archive` bytes, its content within `limits`) and stores it; returns
/// its reference, `nats-object:sha256:<hex>`. Storing the same archive twice
/// stores it once.
pub async fn upload(
    js: &jetstream::Context,
    archive: bytes::Bytes,
    max_archive: u64,
    limits: Limits,
) -> Result<String, ScenarioStoreError> {
    if archive.len() as u64 > max_archive {
        return Err(ScenarioStoreError::TooLarge { limit: max_archive });
    }
    let checked = archive.clone();
    tokio::task::spawn_blocking(move || {
        let files = archive::unpack(checked.as_ref(), None, None, &mut Budget::new(limits))?;
        if archive::has_project(&files) {
            Ok(())
        } else {
            Err(ArchiveError::MissingProject)
        }
    })
    .await
    .map_err(|e| ScenarioStoreError::Unavailable(format!("archive check failed: {e}")))??;
    let hex = hex::encode(Sha256::digest(&archive));
    let store = bucket(js).await?;
    let present = store
        .info(object_name(&hex))
        .await
        .is_ok_and(|info| !info.deleted && info.size == archive.len());
    if !present {
        store
            .put(object_name(&hex).as_str(), &mut archive.as_ref())
            .await
            .map_err(|e| ScenarioStoreError::Unavailable(e.to_string()))?;
    }
    Ok(ScenarioRef::object(&hex))
}

/// The stored size of the archive `hex`, or not found.
pub async fn stat(js: &jetstream::Context, hex: &str) -> Result<usize, ScenarioStoreError> {
    let store = bucket(js).await?;
    match store.info(object_name(hex)).await {
        Ok(info) if !info.deleted => Ok(info.size),
        Ok(_) => Err(not_found(hex)),
        Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => {
            Err(not_found(hex))
        }
        Err(e) => Err(ScenarioStoreError::Unavailable(e.to_string())),
    }
}

fn not_found(hex: &str) -> ScenarioStoreError {
    ScenarioStoreError::NotFound {
        reference: ScenarioRef::object(hex),
    }
}

/// Fetches the archive `hex`, verifies its digest and unpacks it under
/// `dest` (an existing, empty directory). Returns the files' paths.
pub async fn fetch_into(
    js: &jetstream::Context,
    hex: &str,
    dest: &Path,
    limits: Limits,
) -> Result<Vec<String>, ScenarioStoreError> {
    // Made sure of (created when missing); reads go to its stream's leader.
    bucket(js).await?;
    let stream = js
        .get_stream(format!("OBJ_{BUCKET}"))
        .await
        .map_err(|e| ScenarioStoreError::Unavailable(e.to_string()))?;
    let read = object_read::read(&stream, BUCKET, &object_name(hex), limits.max_total).await;
    let data = match read {
        Ok(Some(object)) => object.data,
        Ok(None) => return Err(not_found(hex)),
        Err(ObjectReadError::TooLarge { .. }) => {
            return Err(ScenarioStoreError::TooLarge {
                limit: limits.max_total,
            });
        }
        Err(ObjectReadError::Unavailable(e)) => return Err(ScenarioStoreError::Unavailable(e)),
        Err(e @ (ObjectReadError::ChunksMissing { .. } | ObjectReadError::Digest)) => {
            return Err(ScenarioStoreError::Unavailable(format!(
                "{}: {e}",
                ScenarioRef::object(hex)
            )));
        }
    };
    let actual = hex::encode(Sha256::digest(&data));
    if actual != hex {
        return Err(ScenarioStoreError::DigestMismatch {
            reference: ScenarioRef::object(hex),
            actual,
        });
    }
    let dest = dest.to_owned();
    let files = tokio::task::spawn_blocking(move || {
        archive::unpack(data.as_slice(), None, Some(&dest), &mut Budget::new(limits))
    })
    .await
    .map_err(|e| ScenarioStoreError::Unavailable(format!("unpacking failed: {e}")))??;
    if !archive::has_project(&files) {
        return Err(ArchiveError::MissingProject.into());
    }
    Ok(files)
}

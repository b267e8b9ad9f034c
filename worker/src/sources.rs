//! Scenario sources: turns a challenge's `scenario` into a local directory
//! the Pulumi driver prepares.
//!
//! - A directory name resolves under `--scenarios-dir`.
//! - An OCI reference is resolved to its manifest digest, and pulled once
//!   per digest into `<cache>/sources/oci/<hex>`.
//! - `nats-object:sha256:<hex>` is fetched from the object store bucket,
//!   its digest verified, and unpacked once into `<cache>/sources/object/<hex>`.
//!
//! Cached content is immutable (named by digest) and written atomically: it
//! is staged in a temporary directory beside its final place and renamed in
//! one step, so workers sharing a cache never see half a scenario; the first
//! rename wins and the others drop their copy. A tag is resolved at the
//! registry on every use (one small manifest request); when the registry is
//! unreachable, the digest the tag last resolved to here is used if its
//! content is cached (logged as a warning).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_nats::jetstream;
use cm_core::{
    DomainError,
    archive::Limits,
    ids,
    oci::{self, OciError, Reference},
    scenario_ref::{ScenarioRef, ScenarioRefError},
    scenario_store::{self, ScenarioStoreError},
};
use sha2::{Digest, Sha256};

/// Where a scenario's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory under the scenario root (its content may change).
    Directory(PathBuf),
    /// Immutable cached content, `key` naming it (`oci:sha256:...`).
    Cached { key: String, dir: PathBuf },
}

impl Source {
    /// The directory holding the scenario.
    pub fn dir(&self) -> &Path {
        match self {
            Self::Directory(d) | Self::Cached { dir: d, .. } => d,
        }
    }
}

/// Why a scenario reference does not resolve.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Reference(#[from] ScenarioRefError),
    #[error(transparent)]
    Directory(DomainError),
    #[error("scenario {reference}: {source}")]
    Oci {
        reference: String,
        #[source]
        source: OciError,
    },
    #[error(transparent)]
    Store(#[from] ScenarioStoreError),
    #[error("scenario cache: {0}")]
    Cache(String),
}

impl SourceError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Oci { source, .. } => source.is_retryable(),
            Self::Store(e) => e.is_retryable(),
            Self::Cache(_) => true,
            Self::Reference(_) | Self::Directory(_) => false,
        }
    }
}

/// Resolves scenario references (see the module docs).
#[derive(Debug)]
pub struct Sources {
    root: PathBuf,
    cache: PathBuf,
    oci: oci::Client,
    js: jetstream::Context,
    limits: Limits,
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Sources {
    /// Directories resolve under `root`; fetched content is cached under
    /// `cache` (`<worker cache>/sources`).
    pub fn new(root: PathBuf, cache: PathBuf, oci: oci::Client, js: jetstream::Context) -> Self {
        let limits = oci.config().limits;
        Self {
            root,
            cache,
            oci,
            js,
            limits,
            fetching: Mutex::default(),
        }
    }

    /// The local directory of the scenario `reference`.
    pub async fn resolve(&self, reference: &str) -> Result<Source, SourceError> {
        match ScenarioRef::parse(reference)? {
            ScenarioRef::Directory(d) => resolve_directory(&self.root, &d)
                .map(Source::Directory)
                .map_err(SourceError::Directory),
            ScenarioRef::Oci(r) => self.resolve_oci(&r).await,
            ScenarioRef::Object(hex) => self.resolve_object(&hex).await,
        }
    }

    async fn resolve_oci(&self, r: &Reference) -> Result<Source, SourceError> {
        let oci_err = |source| SourceError::Oci {
            reference: r.to_string(),
            source,
        };
        let dir = self.cache.join("oci");
        if let Some(digest) = &r.digest {
            let target = dir.join(hex_of(digest));
            if target.is_dir() {
                return Ok(cached("oci", digest, target));
            }
        }
        let (digest, manifest) = match self.oci.manifest(r).await {
            Ok(found) => found,
            Err(e) if e.is_retryable() && r.digest.is_none() => {
                let Some(digest) = self.recall(r).await else {
                    return Err(oci_err(e));
                };
                let target = dir.join(hex_of(&digest));
                if !target.is_dir() {
                    return Err(oci_err(e));
                }
                tracing::warn!(reference = %r, %digest, error = %e, "registry unreachable; using the digest this tag last resolved to");
                return Ok(cached("oci", &digest, target));
            }
            Err(e) => return Err(oci_err(e)),
        };
        self.remember(r, &digest).await;
        let target = dir.join(hex_of(&digest));
        if target.is_dir() {
            return Ok(cached("oci", &digest, target));
        }
        let lock = self.fetch_lock(&digest);
        let _guard = lock.lock().await;
        if !target.is_dir() {
            tracing::info!(reference = %r, %digest, "pulling scenario");
            let staging = self.staging(&dir).await?;
            oci::pull_manifest(&self.oci, r, &manifest, staging.path())
                .await
                .map_err(oci_err)?;
            commit(staging, &target).await?;
        }
        Ok(cached("oci", &digest, target))
    }

    async fn resolve_object(&self, hex: &str) -> Result<Source, SourceError> {
        let dir = self.cache.join("object");
        let target = dir.join(hex);
        let digest = format!("sha256:{hex}");
        if !target.is_dir() {
            let lock = self.fetch_lock(&digest);
            let _guard = lock.lock().await;
            if !target.is_dir() {
                tracing::info!(%digest, "fetching uploaded scenario");
                let staging = self.staging(&dir).await?;
                scenario_store::fetch_into(&self.js, hex, staging.path(), self.limits).await?;
                commit(staging, &target).await?;
            }
        }
        Ok(cached("object", &digest, target))
    }

    async fn staging(&self, dir: &Path) -> Result<tempfile::TempDir, SourceError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| SourceError::Cache(format!("creating {}: {e}", dir.display())))?;
        tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(dir)
            .map_err(|e| SourceError::Cache(format!("staging in {}: {e}", dir.display())))
    }

    fn fetch_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.fetching.lock() {
            Ok(mut map) => map.entry(key.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Where the digest a reference last resolved to is noted.
    fn ref_note(&self, r: &Reference) -> PathBuf {
        let name = hex::encode(Sha256::digest(r.to_string().as_bytes()));
        self.cache.join("oci-refs").join(name)
    }

    async fn remember(&self, r: &Reference, digest: &str) {
        let note = self.ref_note(r);
        let written = async {
            let dir = note.parent().unwrap_or(&self.cache).to_owned();
            tokio::fs::create_dir_all(&dir).await?;
            let tmp = tempfile::NamedTempFile::new_in(&dir)?;
            tokio::fs::write(tmp.path(), digest).await?;
            tmp.persist(&note).map_err(|e| e.error)?;
            Ok::<_, std::io::Error>(())
        };
        if let Err(e) = written.await {
            tracing::debug!(error = %e, "could not note the resolved digest");
        }
    }

    async fn recall(&self, r: &Reference) -> Option<String> {
        let digest = tokio::fs::read_to_string(self.ref_note(r)).await.ok()?;
        oci::reference::is_digest(digest.trim()).then(|| digest.trim().to_owned())
    }
}

fn hex_of(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

fn cached(kind: &str, digest: &str, dir: PathBuf) -> Source {
    Source::Cached {
        key: format!("{kind}:{digest}"),
        dir,
    }
}

/// Moves a filled staging directory to `target`; the first one there wins.
async fn commit(staging: tempfile::TempDir, target: &Path) -> Result<(), SourceError> {
    let staged = staging.keep();
    match tokio::fs::rename(&staged, target).await {
        Ok(()) => Ok(()),
        Err(_) if target.is_dir() => {
            // Another worker finished first: keep its copy.
            let _ = tokio::fs::remove_dir_all(&staged).await;
            Ok(())
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&staged).await;
            Err(SourceError::Cache(format!(
                "moving the scenario to {}: {e}",
                target.display()
            )))
        }
    }
}

/// A directory reference resolves to a relative directory under the
/// workers' scenario root (`--scenarios-dir`).
pub fn resolve_directory(root: &Path, reference: &str) -> Result<PathBuf, DomainError> {
    ids::validate(
        "scenario",
        reference
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default(),
    )?;
    let relative = Path::new(reference);
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

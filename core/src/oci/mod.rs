//! Scenarios in OCI registries, compatible with chall-manager: pull into a
//! directory, inspect without writing, push a directory.
//!
//! Used by the worker (pull into its cache), the API (inspect before a
//! challenge is accepted) and the operator CLI (push).
//!
//! # Layout
//! - [`reference`]: `registry/repo[:tag][@sha256:...]` parsing.
//! - [`manifest`]: the image manifest and the scenario layout rules.
//! - [`client`]: the distribution API client (digests verified, sizes bounded).
//! - [`auth`]: credentials (flags, docker `config.json`) and the
//!   `WWW-Authenticate` handshake (basic, bearer tokens).
//! - [`config`]: the shared `--oci-*` flags.
//! - [`error`]: the client's errors, [`OciError`].

pub mod auth;
pub mod client;
pub mod config;
pub mod error;
pub mod manifest;
pub mod reference;

use std::path::Path;

use bytes::Bytes;

pub use auth::Credentials;
pub use client::{Client, ClientConfig};
pub use error::OciError;
pub use manifest::Manifest;
pub use reference::Reference;

use crate::archive::{self, Budget};
use manifest::{LayerKind, SCENARIO_ARTIFACT_TYPE, SCENARIO_FILE_MEDIA_TYPE};

/// What a pull or an inspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// `sha256:<hex>` of the manifest (what the content is cached under).
    pub digest: String,
    /// Normalised paths of the scenario's files, sorted.
    pub files: Vec<String>,
}

/// Resolves `r` and checks it is a scenario, without downloading file
/// layers (directory layers are downloaded to be checked, then dropped).
pub async fn inspect(client: &Client, r: &Reference) -> Result<Scenario, OciError> {
    let (digest, manifest) = client.manifest(r).await?;
    let files = fetch_layers(client, r, &manifest, None).await?;
    Ok(Scenario { digest, files })
}

/// Resolves `r`, checks it is a scenario and writes its files under `dest`
/// (an existing, empty directory).
pub async fn pull(client: &Client, r: &Reference, dest: &Path) -> Result<Scenario, OciError> {
    let (digest, manifest) = client.manifest(r).await?;
    let files = pull_manifest(client, r, &manifest, dest).await?;
    Ok(Scenario { digest, files })
}

/// Writes the files of an already fetched `manifest` under `dest`.
pub async fn pull_manifest(
    client: &Client,
    r: &Reference,
    manifest: &Manifest,
    dest: &Path,
) -> Result<Vec<String>, OciError> {
    fetch_layers(client, r, manifest, Some(dest)).await
}

async fn fetch_layers(
    client: &Client,
    r: &Reference,
    manifest: &Manifest,
    dest: Option<&Path>,
) -> Result<Vec<String>, OciError> {
    let shown = r.to_string();
    let mut budget = Budget::new(client.config().limits);
    let layers = manifest.scenario_layers(&shown, &mut budget)?;
    // Sizes were counted from the descriptors; tar contents count afresh.
    let mut contents = Budget::new(client.config().limits);
    let mut files = Vec::new();
    for layer in &layers {
        match &layer.kind {
            LayerKind::File(path) => {
                if let Some(dest) = dest {
                    let target = dest.join(path);
                    if let Some(parent) = target.parent() {
                        tokio::fs::create_dir_all(parent)
                            .await
                            .map_err(archive::ArchiveError::io("creating", parent))?;
                    }
                    let mut file = tokio::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .await
                        .map_err(archive::ArchiveError::io("creating", &target))?;
                    client
                        .blob_to(r, &layer.descriptor, path, &mut file)
                        .await?;
                }
                contents.add(path, layer.descriptor.size)?;
                files.push(path.clone());
            }
            LayerKind::Directory(prefix) => {
                let tmp = tempfile::tempfile().map_err(archive::ArchiveError::io(
                    "creating a temporary file in",
                    &std::env::temp_dir(),
                ))?;
                let mut out = tokio::fs::File::from_std(tmp);
                client
                    .blob_to(r, &layer.descriptor, prefix, &mut out)
                    .await?;
                let mut std_file = out.into_std().await;
                let (prefix, dest) = (prefix.clone(), dest.map(Path::to_owned));
                let unpacked = tokio::task::spawn_blocking(move || {
                    use std::io::Seek;
                    std_file
                        .rewind()
                        .map_err(archive::ArchiveError::io("reading", Path::new(&prefix)))?;
                    let listed =
                        archive::unpack(&std_file, Some(&prefix), dest.as_deref(), &mut contents)?;
                    Ok::<_, archive::ArchiveError>((listed, contents))
                })
                .await
                .map_err(|e| OciError::layout(r, format!("unpacking failed: {e}")))??;
                files.extend(unpacked.0);
                contents = unpacked.1;
            }
        }
    }
    files.sort();
    let before = files.len();
    files.dedup();
    if files.len() != before {
        return Err(OciError::layout(r, "two layers hold the same file"));
    }
    if !archive::has_project(&files) {
        return Err(archive::ArchiveError::MissingProject.into());
    }
    Ok(files)
}

/// Pushes the files under `dir` as a scenario artifact, laid out exactly as
/// `oras push --artifact-type application/vnd.ctfer-io.scenario` lays it
/// out: the empty config, one `application/vnd.ctfer-io.file` layer per
/// file titled with its relative path. Returns the manifest digest.
pub async fn push(client: &Client, dir: &Path, r: &Reference) -> Result<String, OciError> {
    let dir = dir.to_owned();
    let files = tokio::task::spawn_blocking(move || archive::list_files(&dir))
        .await
        .map_err(|e| OciError::layout(r, format!("listing failed: {e}")))??;
    let names: Vec<String> = files.iter().map(|(rel, _)| rel.clone()).collect();
    if !archive::has_project(&names) {
        return Err(archive::ArchiveError::MissingProject.into());
    }
    let config = client
        .push_blob(r, manifest::EMPTY_CONFIG, Bytes::from_static(b"{}"))
        .await?;
    let mut layers = Vec::with_capacity(files.len());
    for (rel, path) in files {
        let data = tokio::fs::read(&path)
            .await
            .map_err(archive::ArchiveError::io("reading", &path))?;
        let mut layer = client
            .push_blob(r, SCENARIO_FILE_MEDIA_TYPE, Bytes::from(data))
            .await?;
        layer
            .annotations
            .insert(manifest::TITLE_ANNOTATION.into(), rel);
        layers.push(layer);
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(manifest::IMAGE_MANIFEST.into()),
        artifact_type: Some(SCENARIO_ARTIFACT_TYPE.into()),
        config: manifest::Descriptor {
            data: Some("e30=".into()),
            ..config
        },
        layers,
        annotations: Default::default(),
    };
    let body = serde_json::to_vec(&manifest)
        .map_err(|e| OciError::layout(r, format!("the manifest cannot be encoded: {e}")))?;
    client.push_manifest(r, Bytes::from(body)).await
}

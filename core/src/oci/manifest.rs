//! The OCI image manifest and chall-manager's scenario layout on it.
//!
//! `oras push --artifact-type application/vnd.ctfer-io.scenario <ref>
//! main:application/vnd.ctfer-io.file Pulumi.yaml:application/vnd.ctfer-io.file`
//! gives an image manifest whose `artifactType` is the scenario type (older
//! oras put it in `config.mediaType` instead), whose config is the empty
//! descriptor (`application/vnd.oci.empty.v1+json`, content `{}`), and with one
//! layer per file: media type `application/vnd.ctfer-io.file`, path in the
//! `org.opencontainers.image.title` annotation. A layer that oras made from a
//! directory is a tar.gz marked `io.deis.oras.content.unpack: "true"` whose
//! entries lie under the title.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{OciError, reference::is_digest};
use crate::archive::{self, Budget};

/// chall-manager's artifact type for scenarios.
pub const SCENARIO_ARTIFACT_TYPE: &str = "application/vnd.ctfer-io.scenario";
/// chall-manager's media type of a scenario file layer.
pub const SCENARIO_FILE_MEDIA_TYPE: &str = "application/vnd.ctfer-io.file";
/// OCI image manifest.
pub const IMAGE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config descriptor's media type (image-spec 1.1).
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
/// The annotation holding a layer's file path.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// oras's mark on a layer that is a tar.gz of a directory.
pub const UNPACK_ANNOTATION: &str = "io.deis.oras.content.unpack";
/// What a manifest request accepts (others are recognised to be refused).
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest manifest read.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest (only the members a scenario uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// How a layer lands in the scenario directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerKind {
    /// One file at this path.
    File(String),
    /// A tar(.gz) whose entries lie under this directory.
    Directory(String),
}

/// A layer to fetch, checked against the scenario rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub descriptor: Descriptor,
    pub kind: LayerKind,
}

/// Reads a manifest, refusing what is not an image manifest.
pub fn parse(
    reference: &str,
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<Manifest, OciError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: u32,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| OciError::layout(&reference, format!("the manifest is not JSON: {e}")))?;
    let media_type = probe
        .media_type
        .clone()
        .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_owned()))
        .unwrap_or_default();
    let is_index =
        probe.manifests.is_some() || media_type.contains("index") || media_type.contains("list");
    if probe.schema_version != 2 || is_index {
        return Err(OciError::UnsupportedManifest {
            reference: reference.to_owned(),
            media_type: if media_type.is_empty() {
                format!("schema {} manifest", probe.schema_version)
            } else {
                media_type
            },
        });
    }
    serde_json::from_slice(bytes)
        .map_err(|e| OciError::layout(&reference, format!("the manifest does not parse: {e}")))
}

impl Manifest {
    /// The artifact type: `artifactType`, else the config's media type
    /// (how older oras marked artifacts).
    pub fn artifact_type(&self) -> &str {
        self.artifact_type
            .as_deref()
            .filter(|t| !t.is_empty())
            .unwrap_or(&self.config.media_type)
    }

    /// Checks the scenario layout and returns the layers to fetch.
    ///
    /// Refuses another artifact type, layers of another media type, titles
    /// that are missing, duplicated or escape the directory, sizes over the
    /// budget, and file layers without a `Pulumi.yaml` (when no directory
    /// layer could bring one).
    pub fn scenario_layers(
        &self,
        reference: &str,
        budget: &mut Budget,
    ) -> Result<Vec<Layer>, OciError> {
        if self.artifact_type() != SCENARIO_ARTIFACT_TYPE {
            return Err(OciError::NotAScenario {
                reference: reference.to_owned(),
                found: self.artifact_type().to_owned(),
            });
        }
        if self.layers.is_empty() {
            return Err(OciError::layout(&reference, "the artifact has no layer"));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut titles = std::collections::HashSet::new();
        for layer in &self.layers {
            if !is_digest(&layer.digest) {
                return Err(OciError::layout(
                    &reference,
                    format!("layer digest {:?} is not a sha256 digest", layer.digest),
                ));
            }
            if layer.media_type != SCENARIO_FILE_MEDIA_TYPE {
                return Err(OciError::layout(
                    &reference,
                    format!(
                        "layer {} has media type {:?}, expected {SCENARIO_FILE_MEDIA_TYPE:?}",
                        layer.digest, layer.media_type
                    ),
                ));
            }
            let Some(title) = layer.annotations.get(TITLE_ANNOTATION) else {
                return Err(OciError::layout(
                    &reference,
                    format!(
                        "layer {} has no {TITLE_ANNOTATION} annotation",
                        layer.digest
                    ),
                ));
            };
            let path = archive::safe_relative(title)?;
            if !titles.insert(path.clone()) {
                return Err(archive::ArchiveError::Duplicate { path }.into());
            }
            budget.add(&path, layer.size)?;
            let unpack = layer
                .annotations
                .get(UNPACK_ANNOTATION)
                .is_some_and(|v| v == "true");
            layers.push(Layer {
                descriptor: layer.clone(),
                kind: if unpack {
                    LayerKind::Directory(path)
                } else {
                    LayerKind::File(path)
                },
            });
        }
        let has_directory = layers
            .iter()
            .any(|l| matches!(l.kind, LayerKind::Directory(_)));
        let files: Vec<String> = layers
            .iter()
            .filter_map(|l| match &l.kind {
                LayerKind::File(p) => Some(p.clone()),
                LayerKind::Directory(_) => None,
            })
            .collect();
        if !has_directory && !archive::has_project(&files) {
            return Err(archive::ArchiveError::MissingProject.into());
        }
        Ok(layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Limits;

    fn layer(title: &str) -> Descriptor {
        Descriptor {
            media_type: SCENARIO_FILE_MEDIA_TYPE.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 10,
            data: None,
            annotations: BTreeMap::from([(TITLE_ANNOTATION.into(), title.into())]),
        }
    }

    fn manifest(artifact_type: Option<&str>, config: &str, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(IMAGE_MANIFEST.into()),
            artifact_type: artifact_type.map(Into::into),
            config: Descriptor {
                media_type: config.into(),
                digest: format!("sha256:{}", "b".repeat(64)),
                size: 2,
                data: None,
                annotations: BTreeMap::new(),
            },
            layers,
            annotations: BTreeMap::new(),
        }
    }

    fn check(m: &Manifest) -> Result<Vec<Layer>, OciError> {
        m.scenario_layers("r", &mut Budget::new(Limits::default()))
    }

    #[test]
    fn accepts_both_ways_of_marking_the_artifact_type() {
        let files = vec![layer("Pulumi.yaml"), layer("main")];
        let new = manifest(Some(SCENARIO_ARTIFACT_TYPE), EMPTY_CONFIG, files.clone());
        let old = manifest(None, SCENARIO_ARTIFACT_TYPE, files);
        for m in [new, old] {
            let layers = check(&m).expect("scenario");
            assert_eq!(layers[1].kind, LayerKind::File("main".into()));
        }
    }

    #[test]
    fn refuses_what_is_not_a_scenario_with_reasons() {
        let wrong_type = manifest(
            Some("application/vnd.example"),
            EMPTY_CONFIG,
            vec![layer("Pulumi.yaml")],
        );
        assert!(
            check(&wrong_type)
                .expect_err("type")
                .to_string()
                .contains("is not a scenario")
        );
        let no_project = manifest(
            Some(SCENARIO_ARTIFACT_TYPE),
            EMPTY_CONFIG,
            vec![layer("main")],
        );
        assert!(
            check(&no_project)
                .expect_err("project")
                .to_string()
                .contains("no Pulumi.yaml")
        );
        for bad in ["../../etc/cron.d/x", "/etc/passwd", "a/../../b"] {
            let escaping = manifest(
                Some(SCENARIO_ARTIFACT_TYPE),
                EMPTY_CONFIG,
                vec![layer("Pulumi.yaml"), layer(bad)],
            );
            let err = check(&escaping).expect_err(bad).to_string();
            assert!(err.contains("is refused"), "{bad}: {err}");
        }
        let twice = manifest(
            Some(SCENARIO_ARTIFACT_TYPE),
            EMPTY_CONFIG,
            vec![layer("Pulumi.yaml"), layer("./Pulumi.yaml")],
        );
        assert!(
            check(&twice)
                .expect_err("twice")
                .to_string()
                .contains("twice")
        );
        let mut untitled = layer("x");
        untitled.annotations.clear();
        let m = manifest(
            Some(SCENARIO_ARTIFACT_TYPE),
            EMPTY_CONFIG,
            vec![layer("Pulumi.yaml"), untitled],
        );
        assert!(
            check(&m)
                .expect_err("title")
                .to_string()
                .contains("no org.opencontainers.image.title")
        );
        let mut big = layer("main");
        big.size = 1 << 40;
        let m = manifest(
            Some(SCENARIO_ARTIFACT_TYPE),
            EMPTY_CONFIG,
            vec![layer("Pulumi.yaml"), big],
        );
        assert!(
            check(&m)
                .expect_err("size")
                .to_string()
                .contains("larger than")
        );
    }

    #[test]
    fn indexes_and_docker_images_are_named() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let err = parse("r", None, index).expect_err("index").to_string();
        assert!(err.contains("index"), "{err}");
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:x","size":1},"layers":[]}"#;
        let m = parse("r", None, docker).expect("parses");
        let err = check(&m).expect_err("not a scenario").to_string();
        assert!(
            err.contains("application/vnd.docker.container.image.v1+json"),
            "{err}"
        );
    }
}

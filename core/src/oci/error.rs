//! What can go wrong talking to a registry or reading a scenario artifact,
//! in words a challenge author can act on. Credentials never appear here.

use crate::archive::ArchiveError;

use super::reference::ReferenceError;

/// An error of the OCI client.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),

    /// The registry could not be reached (connection refused, DNS, TLS, timeout).
    #[error("registry {registry} is unreachable over {scheme}: {reason}{hint}")]
    Unreachable {
        registry: String,
        scheme: &'static str,
        reason: String,
        hint: &'static str,
    },

    /// No manifest under that tag or digest (or no such repository).
    #[error("{reference} not found in the registry (no such tag, digest or repository)")]
    NotFound { reference: String },

    /// The registry wants credentials we do not have, or refused ours.
    #[error("registry {registry} refused access to {repository}: {reason}")]
    Unauthorized {
        registry: String,
        repository: String,
        reason: String,
    },

    /// Any other answer the registry gave.
    #[error("registry {registry} answered {status}{detail}")]
    Registry {
        registry: String,
        status: u16,
        detail: String,
    },

    /// The manifest is no scenario artifact.
    #[error(
        "{reference} is not a scenario: its artifact type is {found:?}, expected \"application/vnd.ctfer-io.scenario\""
    )]
    NotAScenario { reference: String, found: String },

    /// The manifest is of a kind we do not read (an index, a schema 1 manifest).
    #[error("{reference} is a {media_type:?}, not an OCI image manifest")]
    UnsupportedManifest {
        reference: String,
        media_type: String,
    },

    /// The manifest or a layer does not follow the scenario layout.
    #[error("{reference}: {reason}")]
    BadLayout { reference: String, reason: String },

    /// Content does not hash to the digest that names it.
    #[error("{what} does not match its digest (expected {expected}, got {actual})")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    /// A file's path, kind or size is refused.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

impl OciError {
    /// Whether trying again later may succeed (the registry is away or
    /// overloaded); everything else is the artifact's or the reference's fault.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Registry { status, .. } => *status >= 500 || *status == 429,
            Self::Archive(ArchiveError::Io { .. }) => true,
            _ => false,
        }
    }

    pub(crate) fn layout(reference: &impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::BadLayout {
            reference: reference.to_string(),
            reason: reason.into(),
        }
    }
}

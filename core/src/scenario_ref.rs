//! What a challenge's `scenario` names, told apart by syntax alone:
//!
//! - `nats-object:sha256:<hex>`: an archive uploaded to the JetStream object
//!   store (`POST /api/v1/scenario`), named by its SHA-256;
//! - an OCI reference (`registry[:port]/repository[:tag][@sha256:...]`): its
//!   first segment holds a `.` or `:` or is `localhost`;
//! - anything else: a directory under the workers' `--scenarios-dir`
//!   (`identity`, `ctf/web`), relative and without `..`.

use crate::oci::{Reference, reference};

/// The prefix of object-store references.
pub const OBJECT_PREFIX: &str = "nats-object:";

/// Longest scenario reference accepted.
pub const MAX_LEN: usize = 512;

/// A scenario reference, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScenarioRef {
    /// A directory under the workers' scenario root.
    Directory(String),
    /// A scenario artifact in an OCI registry.
    Oci(Reference),
    /// An uploaded archive; the 64 hex digits of its SHA-256.
    Object(String),
}

/// Why a scenario reference is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioRefError {
    #[error("scenario must not be empty")]
    Empty,
    #[error("scenario is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("scenario must not contain whitespace or control characters")]
    BadCharacters,
    #[error("scenario must be a relative reference without '..'")]
    Escapes,
    #[error("scenario {0:?}: object references are nats-object:sha256:<64 lowercase hex digits>")]
    BadObject(String),
    #[error("scenario {reference:?} is not a valid OCI reference: {source}")]
    BadOci {
        reference: String,
        #[source]
        source: reference::ReferenceError,
    },
}

impl ScenarioRef {
    /// Classifies and checks `s`.
    pub fn parse(s: &str) -> Result<Self, ScenarioRefError> {
        if s.is_empty() {
            return Err(ScenarioRefError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(ScenarioRefError::TooLong);
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ScenarioRefError::BadCharacters);
        }
        if let Some(rest) = s.strip_prefix(OBJECT_PREFIX) {
            return if reference::is_digest(rest) {
                Ok(Self::Object(rest.trim_start_matches("sha256:").to_owned()))
            } else {
                Err(ScenarioRefError::BadObject(s.to_owned()))
            };
        }
        if s.starts_with('/') || s.split('/').any(|part| part == "..") {
            return Err(ScenarioRefError::Escapes);
        }
        if reference::looks_like_reference(s) || s.contains('@') {
            return Reference::parse(s)
                .map(Self::Oci)
                .map_err(|source| ScenarioRefError::BadOci {
                    reference: s.to_owned(),
                    source,
                });
        }
        Ok(Self::Directory(s.to_owned()))
    }

    /// The object-store reference of an archive with SHA-256 `hex`.
    pub fn object(hex: &str) -> String {
        format!("{OBJECT_PREFIX}sha256:{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_kind() {
        let hex = "ab".repeat(32);
        assert_eq!(
            ScenarioRef::parse("identity"),
            Ok(ScenarioRef::Directory("identity".into()))
        );
        assert_eq!(
            ScenarioRef::parse("ctf/web"),
            Ok(ScenarioRef::Directory("ctf/web".into()))
        );
        assert!(matches!(
            ScenarioRef::parse("localhost:5000/ctf/web:v1"),
            Ok(ScenarioRef::Oci(r)) if r.repository == "ctf/web"
        ));
        assert_eq!(
            ScenarioRef::parse(&ScenarioRef::object(&hex)),
            Ok(ScenarioRef::Object(hex.clone()))
        );
    }

    #[test]
    fn refuses_with_reasons() {
        for (bad, why) in [
            ("", "empty"),
            ("../x", "'..'"),
            ("/etc", "'..'"),
            ("a b", "whitespace"),
            ("nats-object:sha256:xyz", "64 lowercase hex"),
            ("nats-object:../../x", "64 lowercase hex"),
            ("registry.io/UP:v1", "not a valid OCI reference"),
            ("identity@sha256:00", "not a valid OCI reference"),
        ] {
            let err = ScenarioRef::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }
}

//! Domain errors, as gRPC status codes with a client-safe message.
//!
//! Knows nothing of HTTP or NATS: the API turns a [`DomainError`] into a REST
//! response in one place and into a NATS service error in another. The
//! `message` is what clients see; internal detail goes to logs and spans.

use std::collections::BTreeMap;

use cm_schemas::v1::{Code, Failure};

/// chall-manager's `google.rpc.ErrorInfo` reasons (its `pkg/errors`), the
/// ones this system can give.
pub mod reasons {
    pub const CHALLENGE_ALREADY_EXISTS: &str = "CHALLENGE_ALREADY_EXISTS";
    pub const CHALLENGE_NOT_FOUND: &str = "CHALLENGE_NOT_FOUND";
    pub const CHALLENGE_EXPIRED: &str = "CHALLENGE_EXPIRED";
    pub const CHALLENGE_NO_RENEWAL: &str = "CHALLENGE_NO_RENEWAL";
    pub const CHALLENGE_POOLER_OUT_OF_BOUNDS: &str = "CHALLENGE_POOLER_OUT_OF_BOUNDS";
    pub const CHALLENGE_INVALID_UPDATE_MASK: &str = "CHALLENGE_INVALID_UPDATE_MASK";
    pub const INSTANCE_ALREADY_EXISTS: &str = "INSTANCE_ALREADY_EXISTS";
    pub const INSTANCE_NOT_FOUND: &str = "INSTANCE_NOT_FOUND";
    pub const INSTANCE_EXPIRED: &str = "INSTANCE_EXPIRED";
    pub const OCI_REFERENCE_MALFORMED: &str = "OCI_REFERENCE_MALFORMED";
    pub const OCI_INTERACTION: &str = "OCI_INTERACTION";
    pub const OCI_REFERENCE_NOT_FOUND: &str = "OCI_REFERENCE_NOT_FOUND";
    pub const SCENARIO_NON_MATCHING_SPECIFICATION: &str = "SCENARIO_NON_MATCHING_SPECIFICATION";
    pub const SCENARIO_NOT_FOUND: &str = "SCENARIO_NOT_FOUND";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
}

/// A `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub reason: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &str, reason: &str, description: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.to_owned(),
            description: description.into(),
        }
    }
}

/// Why, in machine terms: a `google.rpc.ErrorInfo` reason with its metadata,
/// and the request fields at fault. The API renders the details.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reason {
    /// One of [`reasons`].
    pub reason: String,
    pub metadata: BTreeMap<String, String>,
    pub field_violations: Vec<FieldViolation>,
}

/// An error a client may see, with its gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct DomainError {
    /// The gRPC status code.
    pub code: Code,
    /// A message safe to show to the client.
    pub message: String,
    /// chall-manager's reason for this error, when it has one.
    pub reason: Option<Box<Reason>>,
}

impl DomainError {
    /// An error with `code` and client-safe `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// The same error with a reason and its metadata.
    pub fn with_reason<'a>(
        mut self,
        reason: &str,
        metadata: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let metadata = metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let violations = self
            .reason
            .take()
            .map(|r| r.field_violations)
            .unwrap_or_default();
        self.reason = Some(Box::new(Reason {
            reason: reason.to_owned(),
            metadata,
            field_violations: violations,
        }));
        self
    }

    /// The same error with a field violation (needs a reason first).
    pub fn with_violation(mut self, violation: FieldViolation) -> Self {
        self.reason
            .get_or_insert_with(Box::default)
            .field_violations
            .push(violation);
        self
    }

    /// The reason, if any.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref().map(|r| r.reason.as_str())
    }

    /// No challenge `id` (404, `CHALLENGE_NOT_FOUND`).
    pub fn challenge_not_found(id: &str) -> Self {
        Self::not_found(format!("challenge {id} not found"))
            .with_reason(reasons::CHALLENGE_NOT_FOUND, [("id", id)])
    }

    /// Challenge `id` exists (409, `CHALLENGE_ALREADY_EXISTS`).
    pub fn challenge_already_exists(id: &str) -> Self {
        Self::already_exists(format!("challenge {id} already exists"))
            .with_reason(reasons::CHALLENGE_ALREADY_EXISTS, [("id", id)])
    }

    /// Challenge `id` is past its `until` (400, `CHALLENGE_EXPIRED`).
    pub fn challenge_expired(id: &str) -> Self {
        Self::failed_precondition("Challenge has expired.")
            .with_reason(reasons::CHALLENGE_EXPIRED, [("id", id)])
    }

    /// Challenge `id` has no timeout (400, `CHALLENGE_NO_RENEWAL`).
    pub fn challenge_no_renewal(id: &str) -> Self {
        Self::failed_precondition("Challenge does not accept renewal.")
            .with_reason(reasons::CHALLENGE_NO_RENEWAL, [("id", id)])
    }

    /// No instance of (`cid`, `sid`) (404, `INSTANCE_NOT_FOUND`).
    pub fn instance_not_found(cid: &str, sid: &str) -> Self {
        Self::not_found(format!("no instance of challenge {cid} for source {sid}")).with_reason(
            reasons::INSTANCE_NOT_FOUND,
            [("challenge_id", cid), ("source_id", sid)],
        )
    }

    /// (`cid`, `sid`) already has an instance (409, `INSTANCE_ALREADY_EXISTS`).
    pub fn instance_already_exists(cid: &str, sid: &str, message: impl Into<String>) -> Self {
        Self::already_exists(message).with_reason(
            reasons::INSTANCE_ALREADY_EXISTS,
            [("challenge_id", cid), ("source_id", sid)],
        )
    }

    /// The instance of (`cid`, `sid`) is past its `until` (400, `INSTANCE_EXPIRED`).
    pub fn instance_expired(cid: &str, sid: &str, message: impl Into<String>) -> Self {
        Self::failed_precondition(message).with_reason(
            reasons::INSTANCE_EXPIRED,
            [("challenge_id", cid), ("source_id", sid)],
        )
    }

    /// Invalid input (HTTP 400).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// Unknown resource (HTTP 404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// Resource already exists (HTTP 409).
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    /// The system is not in a state allowing the operation (HTTP 400).
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    /// A dependency is away (HTTP 503); worth retrying.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    /// Something broke inside; the message must say nothing internal.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// The wire form of this error.
    pub fn to_failure(&self) -> Failure {
        let reason = self.reason.as_deref();
        Failure {
            code: self.code as i32,
            message: self.message.clone(),
            reason: reason.map(|r| r.reason.clone()).unwrap_or_default(),
            metadata: reason
                .map(|r| r.metadata.clone().into_iter().collect())
                .unwrap_or_default(),
            field_violations: reason
                .map(|r| {
                    r.field_violations
                        .iter()
                        .map(|v| cm_schemas::v1::FieldViolation {
                            field: v.field.clone(),
                            reason: v.reason.clone(),
                            description: v.description.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Back from the wire form.
    pub fn from_failure(failure: &Failure) -> Self {
        let reason =
            (!failure.reason.is_empty() || !failure.field_violations.is_empty()).then(|| {
                Box::new(Reason {
                    reason: failure.reason.clone(),
                    metadata: failure.metadata.clone().into_iter().collect(),
                    field_violations: failure
                        .field_violations
                        .iter()
                        .map(|v| FieldViolation {
                            field: v.field.clone(),
                            reason: v.reason.clone(),
                            description: v.description.clone(),
                        })
                        .collect(),
                })
            });
        Self {
            code: Code::try_from(failure.code).unwrap_or(Code::Unknown),
            message: failure.message.clone(),
            reason,
        }
    }
}

/// `error: source: source...`, the whole chain of an error on one line (for
/// startup failures, where the innermost cause, e.g. a TLS alert, is the
/// useful part). Adjacent repeats are dropped.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

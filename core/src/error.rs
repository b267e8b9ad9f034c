//! Domain errors: [`DomainError`], one case per domain situation (not found
//! and of what, already exists, invalid argument, failed precondition,
//! aborted, unavailable, internal), each with a client-safe message and
//! chall-manager's reason.
//!
//! Owns: the cases, their messages (the not-found messages and
//! [`INTERNAL_MESSAGE`] are written here once) and their wire form
//! ([`Failure`]). Must not know: HTTP, gRPC or NATS statuses (the API maps
//! them in one place), acks (the worker's consumer maps those). Internal
//! detail goes to logs and spans, never into a message.

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

/// What a client sees of an internal failure; the detail goes to the log.
pub const INTERNAL_MESSAGE: &str = "internal error";

/// What a request named and was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// A challenge, by id.
    Challenge(String),
    /// A source's instance of a challenge.
    Instance {
        challenge_id: String,
        source_id: String,
    },
    /// An operation (a command accepted with `Prefer: respond-async`).
    Operation(String),
    /// Anything else; the message says what.
    Other,
}

/// The client-facing part of an error: its message, and chall-manager's
/// reason when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    /// A message safe to show to the client.
    pub message: String,
    /// chall-manager's reason for this error, when it has one.
    pub reason: Option<Box<Reason>>,
}

impl Detail {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: None,
        }
    }
}

/// An error a client may see: one case per domain situation. The one
/// mapping to HTTP, gRPC and NATS statuses is the API's (`api/src/error.rs`),
/// by [`DomainError::code`]; the worker's consumer maps handler outcomes to
/// acks. Crosses the queue as a [`Failure`] ([`DomainError::to_failure`],
/// [`DomainError::from_failure`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Something the request names does not exist.
    #[error("NotFound: {}", .1.message)]
    NotFound(Missing, Detail),
    /// What the request would create exists.
    #[error("AlreadyExists: {}", .0.message)]
    AlreadyExists(Detail),
    /// The request is malformed; the fields at fault are its reason's field
    /// violations.
    #[error("InvalidArgument: {}", .0.message)]
    InvalidArgument(Detail),
    /// The system is not in a state allowing the operation.
    #[error("FailedPrecondition: {}", .0.message)]
    FailedPrecondition(Detail),
    /// A concurrent change won; retrying may succeed.
    #[error("Aborted: {}", .0.message)]
    Aborted(Detail),
    /// A dependency is away; worth retrying.
    #[error("Unavailable: {}", .0.message)]
    Unavailable(Detail),
    /// Something broke inside; the message says nothing internal.
    #[error("Internal: {}", .0.message)]
    Internal(Detail),
    /// Any other status (authentication, deadline, ...), by its gRPC code.
    #[error("{:?}: {}", .0, .1.message)]
    Other(Code, Detail),
}

/// The [`Detail`] of any case (by reference, shared or mutable).
macro_rules! each_detail {
    ($e:expr) => {
        match $e {
            DomainError::NotFound(_, d)
            | DomainError::AlreadyExists(d)
            | DomainError::InvalidArgument(d)
            | DomainError::FailedPrecondition(d)
            | DomainError::Aborted(d)
            | DomainError::Unavailable(d)
            | DomainError::Internal(d)
            | DomainError::Other(_, d) => d,
        }
    };
}

impl DomainError {
    /// An error with `code` and client-safe `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self::of_code(code, Detail::new(message))
    }

    fn of_code(code: Code, detail: Detail) -> Self {
        match code {
            Code::NotFound => Self::NotFound(Missing::Other, detail),
            Code::AlreadyExists => Self::AlreadyExists(detail),
            Code::InvalidArgument => Self::InvalidArgument(detail),
            Code::FailedPrecondition => Self::FailedPrecondition(detail),
            Code::Aborted => Self::Aborted(detail),
            Code::Unavailable => Self::Unavailable(detail),
            Code::Internal => Self::Internal(detail),
            other => Self::Other(other, detail),
        }
    }

    /// The gRPC status code of this case.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(..) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
            Self::Other(code, _) => *code,
        }
    }

    /// The message and reason.
    pub fn detail(&self) -> &Detail {
        each_detail!(self)
    }

    fn detail_mut(&mut self) -> &mut Detail {
        each_detail!(self)
    }

    /// The message a client sees.
    pub fn message(&self) -> &str {
        &self.detail().message
    }

    /// chall-manager's reason with its metadata and field violations.
    pub fn reason_info(&self) -> Option<&Reason> {
        self.detail().reason.as_deref()
    }

    /// Whether this is a failure of the system rather than a refusal of the
    /// request (what the worker counts as `failed`, not `refused`).
    pub fn is_internal(&self) -> bool {
        matches!(self.code(), Code::Internal | Code::Unknown | Code::DataLoss)
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
        let detail = self.detail_mut();
        let violations = detail
            .reason
            .take()
            .map(|r| r.field_violations)
            .unwrap_or_default();
        detail.reason = Some(Box::new(Reason {
            reason: reason.to_owned(),
            metadata,
            field_violations: violations,
        }));
        self
    }

    /// The same error with a field violation (needs a reason first).
    pub fn with_violation(mut self, violation: FieldViolation) -> Self {
        self.detail_mut()
            .reason
            .get_or_insert_with(Box::default)
            .field_violations
            .push(violation);
        self
    }

    /// The reason, if any.
    pub fn reason(&self) -> Option<&str> {
        self.reason_info().map(|r| r.reason.as_str())
    }

    /// No challenge `id` (404, `CHALLENGE_NOT_FOUND`).
    pub fn challenge_not_found(id: &str) -> Self {
        Self::missing(Missing::Challenge(id.to_owned()))
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
        Self::missing(Missing::Instance {
            challenge_id: cid.to_owned(),
            source_id: sid.to_owned(),
        })
    }

    /// No operation `id` (404).
    pub fn operation_not_found(id: &str) -> Self {
        Self::missing(Missing::Operation(id.to_owned()))
    }

    /// `what` is not found (404): its message and reason, written once.
    pub fn missing(what: Missing) -> Self {
        let (message, reason) = match &what {
            Missing::Challenge(id) => (
                format!("challenge {id} not found"),
                Some(Reason::new(
                    reasons::CHALLENGE_NOT_FOUND,
                    [("id", id.as_str())],
                )),
            ),
            Missing::Instance {
                challenge_id: cid,
                source_id: sid,
            } => (
                format!("no instance of challenge {cid} for source {sid}"),
                Some(Reason::new(
                    reasons::INSTANCE_NOT_FOUND,
                    [("challenge_id", cid.as_str()), ("source_id", sid.as_str())],
                )),
            ),
            Missing::Operation(id) => (format!("operation {id} not found"), None),
            Missing::Other => (String::new(), None),
        };
        Self::NotFound(
            what,
            Detail {
                message,
                reason: reason.map(Box::new),
            },
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
        Self::InvalidArgument(Detail::new(message))
    }

    /// Unknown resource other than a challenge, an instance or an
    /// operation (HTTP 404); `message` says what.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(Missing::Other, Detail::new(message))
    }

    /// Resource already exists (HTTP 409).
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::AlreadyExists(Detail::new(message))
    }

    /// The system is not in a state allowing the operation (HTTP 400).
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::FailedPrecondition(Detail::new(message))
    }

    /// A dependency is away (HTTP 503); worth retrying.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(Detail::new(message))
    }

    /// Something broke inside, said with a client-safe `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(Detail::new(message))
    }

    /// Something broke inside, and nothing more is said
    /// ([`INTERNAL_MESSAGE`]); the caller logs the detail.
    pub fn internal_error() -> Self {
        Self::internal(INTERNAL_MESSAGE)
    }

    /// The wire form of this error.
    pub fn to_failure(&self) -> Failure {
        let reason = self.reason_info();
        Failure {
            code: self.code() as i32,
            message: self.message().to_owned(),
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

    /// Back from the wire form: the same case, message and reason.
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
        let meta = |k: &str| failure.metadata.get(k).cloned().unwrap_or_default();
        let detail = Detail {
            message: failure.message.clone(),
            reason,
        };
        match Code::try_from(failure.code).unwrap_or(Code::Unknown) {
            Code::NotFound => {
                let what = match failure.reason.as_str() {
                    reasons::CHALLENGE_NOT_FOUND => Missing::Challenge(meta("id")),
                    reasons::INSTANCE_NOT_FOUND => Missing::Instance {
                        challenge_id: meta("challenge_id"),
                        source_id: meta("source_id"),
                    },
                    _ => Missing::Other,
                };
                Self::NotFound(what, detail)
            }
            code => Self::of_code(code, detail),
        }
    }
}

impl Reason {
    fn new<'a>(reason: &str, metadata: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            reason: reason.to_owned(),
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            field_violations: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_case_crosses_the_wire_unchanged() {
        let cases = [
            DomainError::challenge_not_found("web"),
            DomainError::instance_not_found("web", "team 1"),
            DomainError::operation_not_found("0190"),
            DomainError::challenge_already_exists("web"),
            DomainError::invalid("bad").with_violation(FieldViolation::new(
                "id",
                "VALIDATION",
                "x",
            )),
            DomainError::challenge_no_renewal("web"),
            DomainError::new(Code::Aborted, "a concurrent change won, retry"),
            DomainError::unavailable("away"),
            DomainError::internal_error(),
            DomainError::new(Code::Unauthenticated, "who are you"),
        ];
        for e in cases {
            let wire = e.to_failure();
            let back = DomainError::from_failure(&wire);
            assert_eq!(back.to_failure(), wire, "{e}");
            assert_eq!(back.code(), e.code(), "{e}");
        }
        let e = DomainError::instance_not_found("web", "team 1");
        assert_eq!(DomainError::from_failure(&e.to_failure()), e);
    }

    #[test]
    fn not_found_says_what_once() {
        let e = DomainError::instance_not_found("web", "t1");
        assert_eq!(e.message(), "no instance of challenge web for source t1");
        assert_eq!(e.reason(), Some(reasons::INSTANCE_NOT_FOUND));
        assert!(matches!(
            e,
            DomainError::NotFound(Missing::Instance { .. }, _)
        ));
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(DomainError::internal_error().message(), "internal error");
        assert!(DomainError::internal_error().is_internal());
    }
}

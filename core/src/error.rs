//! Domain errors, as gRPC status codes with a client-safe message.
//!
//! Knows nothing of HTTP or NATS: the API turns a [`DomainError`] into a REST
//! response in one place and into a NATS service error in another. The
//! `message` is what clients see; internal detail goes to logs and spans.

use cm_schemas::v1::{Code, Failure};

/// An error a client may see, with its gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct DomainError {
    /// The gRPC status code.
    pub code: Code,
    /// A message safe to show to the client.
    pub message: String,
}

impl DomainError {
    /// An error with `code` and client-safe `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
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
        Failure {
            code: self.code as i32,
            message: self.message.clone(),
        }
    }

    /// Back from the wire form.
    pub fn from_failure(failure: &Failure) -> Self {
        Self {
            code: Code::try_from(failure.code).unwrap_or(Code::Unknown),
            message: failure.message.clone(),
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

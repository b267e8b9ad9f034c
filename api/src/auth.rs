//! Who may call the REST API: bearer tokens, checked before anything else.
//!
//! [`require_token`] runs in front of every route but `/healthcheck`: a
//! request without `Authorization: Bearer <token>` naming one of the
//! configured tokens is answered `401` in the API's error shape
//! (`{"code": 16, "message", "details"}`) before its body is read, so it
//! publishes nothing and writes nothing. Only SHA-256 digests of the tokens
//! are kept, and they are compared in constant time. Tokens never reach a
//! log line or a span. (Mutual TLS, the other credential, is checked earlier,
//! during the handshake: see [`crate::tls`].)

use std::{path::Path, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use cm_core::{DomainError, Secret};
use cm_schemas::v1::Code;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer tokens the API accepts; none configured means no token check.
#[derive(Clone, Default)]
pub struct ApiAuth {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("tokens", &self.digests.len())
            .finish()
    }
}

/// A token that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("an API token is shorter than {MIN_TOKEN_LEN} characters")]
    TooShort,
    #[error("cannot read the token file {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl ApiAuth {
    /// Accepts any request (development, or mTLS alone).
    pub fn open() -> Self {
        Self::default()
    }

    /// Accepts requests bearing one of `tokens`.
    pub fn tokens<'a>(
        tokens: impl IntoIterator<Item = &'a Secret<String>>,
    ) -> Result<Self, AuthConfigError> {
        let mut digests = Vec::new();
        for token in tokens {
            let token = token.expose().trim();
            if token.len() < MIN_TOKEN_LEN {
                return Err(AuthConfigError::TooShort);
            }
            digests.push(digest(token.as_bytes()));
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    /// Whether no token is required.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens. Every digest is compared,
    /// each in constant time, so timing says nothing about which matched.
    pub fn allows(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        self.digests
            .iter()
            .fold(false, |found, d| found | constant_time_eq(d, &presented))
    }
}

/// The tokens of a file: one per line; blank lines and `#` comments skipped.
pub fn tokens_from_file(path: &Path) -> Result<Vec<Secret<String>>, AuthConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Secret::new(l.to_owned()))
        .collect())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiAuth {
    /// Checks the `Authorization: Bearer <token>` header of a request (REST)
    /// or the `authorization` metadata of a call (gRPC); why it is refused.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), &'static str> {
        if self.is_open() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match presented {
            Some(token) if self.allows(token.as_bytes()) => Ok(()),
            Some(_) => Err("invalid bearer token"),
            None => Err("missing bearer token (Authorization: Bearer <token>)"),
        }
    }
}

/// Middleware: lets the request through only with a valid bearer token.
pub async fn require_token(State(auth): State<ApiAuth>, request: Request, next: Next) -> Response {
    match auth.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(why) => unauthorized(why),
    }
}

fn unauthorized(message: &str) -> Response {
    tracing::info!(reason = message, "request refused: unauthenticated");
    let mut response = ApiError(DomainError::new(Code::Unauthenticated, message)).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"cm-api\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let a = Secret::new("first-token-0123456789".to_owned());
        let b = Secret::new("second-token-0123456789".to_owned());
        let auth = ApiAuth::tokens([&a, &b]).expect("valid");
        assert!(!auth.is_open());
        assert!(auth.allows(b"first-token-0123456789"));
        assert!(auth.allows(b"second-token-0123456789"));
        assert!(!auth.allows(b"first-token-012345678"));
        assert!(!auth.allows(b""));
        assert!(!format!("{auth:?}").contains("first"));
        assert!(ApiAuth::open().is_open());
    }

    #[test]
    fn short_tokens_are_refused() {
        let short = Secret::new("hunter2".to_owned());
        assert!(matches!(
            ApiAuth::tokens([&short]),
            Err(AuthConfigError::TooShort)
        ));
    }
}

//! Connecting to NATS with the configured authentication and TLS.
//!
//! Every binary connects through [`connect`], so user/password, token, nkey
//! seed, creds file, CA bundle, client certificate and "TLS required" apply
//! the same way everywhere. A refused connection is an error at once (no
//! endless retry), carrying the server's reason and the flags to check.
//! Credentials never appear in an error: secrets are [`Secret`]s, and URLs
//! are shown without their user-info part ([`redact_url`]).

use std::path::PathBuf;

use async_nats::ConnectErrorKind;

use crate::Secret;

/// How to authenticate to NATS (one method at most).
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    /// No credentials (a server without authorization).
    #[default]
    None,
    /// A user of the server's `authorization.users`.
    UserPassword {
        user: String,
        password: Secret<String>,
    },
    /// The server's `authorization.token`.
    Token(Secret<String>),
    /// An nkey seed (`SU...`) whose public key the server lists.
    NkeySeed(Secret<String>),
    /// A `.creds` file (user JWT + nkey seed) for operator/JWT mode.
    CredsFile(PathBuf),
}

/// TLS towards NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsTls {
    /// CA bundle (PEM) the server certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients
    /// (`tls { verify: true }`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse to talk to a server that does not offer TLS.
    pub required: bool,
}

/// Authentication and TLS for a NATS connection (the URL is given apart).
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

/// Why a NATS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server refused the credentials; retrying cannot help.
    #[error("NATS at {url} refused the credentials ({detail}); check {hint}")]
    Rejected {
        url: String,
        detail: String,
        hint: &'static str,
    },
    /// The TLS handshake failed (unknown CA, wrong name, missing client
    /// certificate, plain-text server while TLS is required...).
    #[error("TLS with NATS at {url} failed: {detail}; check --nats-ca, --nats-cert/--nats-key")]
    Tls { url: String, detail: String },
    /// The server could not be reached (worth retrying).
    #[error("cannot connect to NATS at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The creds file could not be read.
    #[error("cannot read the NATS creds file {}: {source}", path.display())]
    CredsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NatsError {
    /// Whether retrying cannot help (credentials or TLS refused, bad files).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Unreachable { .. })
    }
}

impl NatsOptions {
    /// The flags to check when the server refuses our credentials.
    fn hint(&self) -> &'static str {
        match self.auth {
            NatsAuth::None => {
                "the server wants credentials: --nats-user/--nats-password, --nats-token, \
                 --nats-nkey-seed-file or --nats-creds-file"
            }
            NatsAuth::UserPassword { .. } => "--nats-user and --nats-password",
            NatsAuth::Token(_) => "--nats-token",
            NatsAuth::NkeySeed(_) => "--nats-nkey-seed-file",
            NatsAuth::CredsFile(_) => "--nats-creds-file",
        }
    }

    /// async-nats options carrying this authentication and TLS, named `name`.
    pub async fn connect_options(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, NatsError> {
        let mut options = match &self.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(
                    user.clone(),
                    password.expose().clone(),
                )
            }
            NatsAuth::Token(token) => {
                async_nats::ConnectOptions::with_token(token.expose().clone())
            }
            NatsAuth::NkeySeed(seed) => {
                async_nats::ConnectOptions::with_nkey(seed.expose().clone())
            }
            NatsAuth::CredsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsError::CredsFile {
                    path: path.clone(),
                    source,
                })?,
        };
        options = options.name(name);
        if let Some(ca) = &self.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls.required {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// Connects to `url` (comma-separated server URLs) as `name`.
///
/// Fails at once, without retrying, when the server refuses us; the error
/// says why and which flags to check.
pub async fn connect(
    url: &str,
    name: &str,
    options: &NatsOptions,
) -> Result<async_nats::Client, NatsError> {
    let connect = options.connect_options(name).await?;
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let shown = redact_url(url);
    connect.connect(servers).await.map_err(|e| {
        let detail = crate::error::chain(&e);
        match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                NatsError::Rejected {
                    url: shown,
                    detail,
                    hint: options.hint(),
                }
            }
            ConnectErrorKind::Tls => NatsError::Tls { url: shown, detail },
            _ if rustls_failure(&e) => NatsError::Tls { url: shown, detail },
            _ => NatsError::Unreachable { url: shown, detail },
        }
    })
}

/// Whether an I/O error under `e` is a TLS failure (a handshake alert, a
/// plain-text server), which async-nats reports as a mere I/O error.
fn rustls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// `url` without credentials: `nats://user:pass@host` becomes
/// `nats://[redacted]@host`, for each comma-separated URL.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let (scheme, rest) = one.split_once("://").unwrap_or(("", one));
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => {
                    let prefix = if scheme.is_empty() {
                        String::new()
                    } else {
                        format!("{scheme}://")
                    };
                    format!("{prefix}[redacted]@{}", &rest[at + 1..])
                }
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("nats://cm:hunter2@127.0.0.1:4222"),
            "nats://[redacted]@127.0.0.1:4222"
        );
        assert_eq!(
            redact_url("tls://a:4222, nats://tok@b:4222"),
            "tls://a:4222,nats://[redacted]@b:4222"
        );
        assert_eq!(redact_url("user:pw@host:4222"), "[redacted]@host:4222");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn options_never_print_secrets() {
        let options = NatsOptions {
            auth: NatsAuth::UserPassword {
                user: "cm".into(),
                password: Secret::new("hunter2".into()),
            },
            tls: NatsTls::default(),
        };
        let printed = format!("{options:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        let token = NatsAuth::Token(Secret::new("s3cr3t-token".into()));
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }

    #[tokio::test]
    async fn an_unreadable_creds_file_is_a_clear_error() {
        let options = NatsOptions {
            auth: NatsAuth::CredsFile("/nonexistent/cm.creds".into()),
            tls: NatsTls::default(),
        };
        let e = connect("nats://127.0.0.1:1", "t", &options)
            .await
            .expect_err("no creds file");
        assert!(e.is_permanent());
        assert!(e.to_string().contains("/nonexistent/cm.creds"), "{e}");
    }
}

//! The `cm-api` command line: every flag (each also an environment variable)
//! and its translation into an [`ApiConfig`].
//!
//! Lives in the library so tests drive the real flags. Refuses an API open to
//! anyone unless `--dev` says so: give bearer tokens (`--auth-token`,
//! `--auth-token-file`) and/or client certificates (`--tls-client-ca`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use cm_core::{
    Secret,
    config::{ConfigError, ConnectArgs, MetricsListen},
};

use crate::{
    ApiConfig,
    auth::{ApiAuth, AuthConfigError, tokens_from_file},
    tls::{TlsConfigError, server_config},
};

/// Front door of the CTF instance manager: the chall-manager compatible REST
/// API (/api/v1/challenge, /api/v1/instance) and gRPC API (api.v1, same
/// port), and a NATS service, publishing
/// commands to JetStream for the workers. Every flag can also be set through
/// the environment variable shown in brackets.
#[derive(Debug, clap::Parser)]
#[command(name = "cm-api", version)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Address the REST and gRPC APIs listen on.
    #[arg(long, env = "CM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// How long a write waits for the worker's result before answering 504
    /// with the operation to poll.
    #[arg(long, env = "CM_RESULT_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub result_timeout: Duration,

    /// Do not serve the NATS service front door (REST only).
    #[arg(long, env = "CM_NO_NATS_SERVICE")]
    pub no_nats_service: bool,

    /// Serve /metrics on this address, without authentication, instead of on
    /// the API's port behind its authentication (`off`: on the API's port).
    #[arg(long, env = "CM_METRICS_LISTEN", default_value = "off")]
    pub metrics_listen: MetricsListen,

    #[command(flatten)]
    pub security: SecurityArgs,

    #[command(flatten)]
    pub oci: cm_core::oci::config::OciArgs,

    /// Largest scenario archive `POST /api/v1/scenario` accepts, in bytes.
    #[arg(long, env = "CM_SCENARIO_MAX_UPLOAD", default_value_t = crate::DEFAULT_MAX_UPLOAD)]
    pub scenario_max_upload: usize,
}

/// Who may call the REST API.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "API access control")]
pub struct SecurityArgs {
    /// Bearer token(s) a client must send (`Authorization: Bearer <token>`),
    /// comma-separated, at least 16 characters each.
    #[arg(
        long = "auth-token",
        env = "CM_AUTH_TOKEN",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub auth_tokens: Vec<Secret<String>>,

    /// File of bearer tokens, one per line (`#` comments allowed); adds to
    /// --auth-token.
    #[arg(long, env = "CM_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Serve HTTPS with this certificate chain (PEM), with --tls-key.
    #[arg(long, env = "CM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "CM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates chaining to this CA bundle (PEM): mutual
    /// TLS. Needs --tls-cert/--tls-key.
    #[arg(long, env = "CM_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Development mode: allows an API that anyone may call (no token, no
    /// client certificate).
    #[arg(long, env = "CM_DEV")]
    pub dev: bool,
}

/// The flags do not make a working API.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Connect(#[from] ConfigError),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(
        "the API would accept requests from anyone: give --auth-token/--auth-token-file \
         (CM_AUTH_TOKEN/CM_AUTH_TOKEN_FILE) and/or --tls-client-ca, or pass --dev for an \
         open development API"
    )]
    Open,
    #[error("{0}")]
    Invalid(String),
}

impl Cli {
    /// The configuration these flags describe, files read and checked.
    pub fn config(&self) -> Result<ApiConfig, CliError> {
        let s = &self.security;
        let mut tokens = s.auth_tokens.clone();
        if let Some(path) = &s.auth_token_file {
            let from_file = tokens_from_file(path)?;
            if from_file.is_empty() {
                return Err(CliError::Invalid(format!(
                    "--auth-token-file {} holds no token",
                    path.display()
                )));
            }
            tokens.extend(from_file);
        }
        let auth = ApiAuth::tokens(&tokens)?;
        let tls = match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => Some(server_config(cert, key, s.tls_client_ca.as_deref())?),
            (None, None) if s.tls_client_ca.is_some() => {
                return Err(CliError::Invalid(
                    "--tls-client-ca needs --tls-cert and --tls-key".into(),
                ));
            }
            (None, None) => None,
            _ => {
                return Err(CliError::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
        };
        if auth.is_open() && s.tls_client_ca.is_none() && !s.dev {
            return Err(CliError::Open);
        }
        Ok(ApiConfig {
            connection: self.connect.connection()?,
            result_timeout: self.result_timeout,
            nats_service: !self.no_nats_service,
            auth,
            tls,
            metrics_listen: self.metrics_listen.0,
            oci: self
                .oci
                .client_config()
                .map_err(|e| CliError::Invalid(format!("OCI registry credentials: {e}")))?,
            max_upload: self.scenario_max_upload,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Result<ApiConfig, CliError> {
        let mut argv = vec!["cm-api"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses").config()
    }

    #[test]
    fn an_open_api_needs_dev() {
        assert!(matches!(config(&[]), Err(CliError::Open)));
        let open = config(&["--dev"]).expect("dev");
        assert!(open.auth.is_open() && open.tls.is_none());
        let tokens = config(&["--auth-token", "0123456789abcdef,fedcba9876543210"]).expect("ok");
        assert!(tokens.auth.allows(b"fedcba9876543210"));
        assert!(!format!("{tokens:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn tls_flags_go_together() {
        let e = config(&["--dev", "--tls-cert", "/c"]).expect_err("alone");
        assert!(e.to_string().contains("go together"), "{e}");
        let e = config(&["--dev", "--tls-client-ca", "/ca"]).expect_err("alone");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
        let e = config(&["--dev", "--tls-cert", "/nonexistent/c", "--tls-key", "/k"])
            .expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/c"), "{e}");
    }
}

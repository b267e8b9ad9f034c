//! The flags every subcommand takes (every one also an environment
//! variable): the API's address and credentials, NATS, output, timeout.
//!
//! Owns: those flags. Must not know: the subcommands or the parser's top.

use std::{path::PathBuf, time::Duration};

use cm_core::{Secret, config::NatsArgs};

use crate::output::Format;

/// Flags every subcommand takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Base URL of cm-api's REST API (challenge, instance, operation).
    #[arg(
        long,
        env = "CM_API_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api_url: String,

    /// Bearer token for the API (`Authorization: Bearer`), when it requires
    /// one (cm-api --auth-token).
    #[arg(long, env = "CM_API_TOKEN", hide_env_values = true, global = true)]
    pub api_token: Option<Secret<String>>,

    /// File holding the API's bearer token (first line).
    #[arg(long, env = "CM_API_TOKEN_FILE", global = true)]
    pub api_token_file: Option<PathBuf>,

    /// CA certificate (PEM) to trust for an `https://` API besides the
    /// system's, e.g. a private CA.
    #[arg(long, env = "CM_API_CA", global = true)]
    pub api_ca: Option<PathBuf>,

    /// Client certificate chain (PEM) for an API requiring mutual TLS
    /// (cm-api --tls-client-ca), with --api-key.
    #[arg(long, env = "CM_API_CERT", global = true)]
    pub api_cert: Option<PathBuf>,

    /// Private key (PEM) of --api-cert.
    #[arg(long, env = "CM_API_KEY", global = true)]
    pub api_key: Option<PathBuf>,

    /// NATS authentication and TLS, the same flags and variables as the
    /// other binaries (give them before the subcommand, or as variables).
    #[command(flatten)]
    pub nats: NatsArgs,

    /// NATS server URL(s), comma-separated (queue, dlq).
    #[arg(
        long,
        env = "CM_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,

    /// Output format: aligned tables, or one JSON document.
    #[arg(
        long,
        short = 'o',
        env = "CMCTL_OUTPUT",
        value_enum,
        default_value_t = Format::Table,
        global = true
    )]
    pub output: Format,

    /// Give up after this long (a write waits for the worker's result, a
    /// deploy can take minutes). Give it before the subcommand
    /// (`cmctl --timeout 10m instance create ...`): after `challenge create`
    /// or `update`, `--timeout` is the challenge's instance lifetime.
    #[arg(
        long,
        env = "CMCTL_TIMEOUT",
        default_value = "6m",
        value_parser = humantime::parse_duration
    )]
    pub timeout: Duration,

    /// Print instance flags (left out of every output by default).
    #[arg(long, env = "CMCTL_SHOW_FLAGS", global = true)]
    pub show_flags: bool,
}

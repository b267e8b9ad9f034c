//! `cmctl`, the operators' command line: challenges, instances and
//! operations through cm-api's REST API; the command queue and its dead
//! letters through NATS JetStream directly.
//!
//! # Layout
//! - [`cli`]: the parser: global flags and the subcommand tree together.
//! - [`global`]: the flags every subcommand takes.
//! - [`commands`]: one module per subcommand group (`challenge`, `instance`,
//!   `operation`, `queue`, `dlq`).
//! - [`api`]: the REST client and its error mapping.
//! - [`nats`]: the JetStream connection and streams.
//! - [`output`]: tables and JSON on stdout.
//! - [`progress`]: the spinner on stderr (terminals only).
//! - [`args`]: flag value parsers (`k=v`, durations, dates).
//! - [`error`]: [`CliError`] and the exit codes.

pub mod api;
pub mod args;
pub mod cli;
pub mod commands;
pub mod error;
pub mod global;
pub mod nats;
pub mod output;
pub mod progress;

pub use cli::Cli;
pub use error::CliError;

/// Runs the command line, giving up after `--timeout`.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let timeout = cli.global.timeout;
    let ctx = commands::Ctx::new(cli.global);
    match tokio::time::timeout(timeout, commands::run(cli.command, &ctx)).await {
        Ok(result) => result,
        Err(_) => Err(CliError::TimedOut(format!(
            "gave up after {} (--timeout)",
            humantime::format_duration(timeout)
        ))),
    }
}

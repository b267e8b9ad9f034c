//! The command line's parser: the global flags ([`Global`]) and the
//! subcommand tree ([`crate::commands`]), put together.
//!
//! Owns: the top of the parse. Must not know: what a subcommand does; the
//! subcommands must not know this module (they take [`Global`] from
//! [`crate::global`]).

use clap::Parser;

pub use crate::global::Global;
use crate::{commands::Command, error::EXIT_CODES_HELP};

/// Operate a ctf-instancer deployment: challenges and instances through the
/// REST API, the command queue and its dead letters through NATS JetStream.
/// Every flag can also be set through the environment variable shown in
/// brackets.
#[derive(Debug, Parser)]
#[command(name = "cmctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

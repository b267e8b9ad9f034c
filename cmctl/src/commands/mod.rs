//! The subcommands, one module per group, each with its clap arguments and
//! its `run`:
//! - [`challenge`], [`instance`], [`operation`]: the REST API;
//! - [`queue`], [`dlq`]: JetStream, directly;
//! - [`scenario`]: OCI registries, or the API's upload.
//!
//! Adding a group is one new file here plus its variant in [`Command`] and
//! its arm in [`run`]; it gets the API client, the JetStream connection and
//! the printer from [`Ctx`].

mod challenge;
mod dlq;
mod instance;
mod operation;
mod queue;
mod scenario;

use async_nats::jetstream;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::{
    api::{Api, Written},
    error::CliError,
    global::Global,
    nats,
    output::{Printer, View},
};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register, show, update and delete challenges (REST API).
    #[command(subcommand)]
    Challenge(challenge::Cmd),
    /// Deploy, show, renew and destroy instances (REST API).
    #[command(subcommand)]
    Instance(instance::Cmd),
    /// Follow a command accepted with --async (REST API).
    #[command(subcommand)]
    Operation(operation::Cmd),
    /// The command queue's state (NATS JetStream).
    #[command(subcommand)]
    Queue(queue::Cmd),
    /// Dead-lettered commands: list, inspect, replay (NATS JetStream).
    #[command(subcommand)]
    Dlq(dlq::Cmd),
    /// Publish scenarios: to an OCI registry (chall-manager's layout) or
    /// through the API into the object store.
    #[command(subcommand)]
    Scenario(scenario::Cmd),
}

/// What every subcommand gets.
#[derive(Debug)]
pub struct Ctx {
    pub global: Global,
    pub printer: Printer,
}

impl Ctx {
    pub fn new(global: Global) -> Self {
        let printer = Printer {
            format: global.output,
            show_flags: global.show_flags,
        };
        Self { global, printer }
    }

    /// The REST client.
    pub fn api(&self) -> Result<Api, CliError> {
        Api::new(
            &self.global.api_url,
            self.global.timeout,
            &crate::api::ApiAccess::from_flags(&self.global)?,
        )
    }

    /// A JetStream connection.
    pub async fn jetstream(&self) -> Result<jetstream::Context, CliError> {
        let options = self
            .global
            .nats
            .options()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        nats::connect(&self.global.nats_url, &options, self.global.timeout).await
    }

    /// Prints a write's answer: `done` renders the worker's result; an
    /// accepted command prints the operation to poll.
    pub fn print_written(&self, written: Written, done: impl FnOnce(Value) -> (Value, View)) {
        match written {
            Written::Done(value) => {
                let (json, view) = done(value);
                self.printer.emit(json, || view);
            }
            Written::Accepted { operation_id } => self.printer.emit(
                json!({"operationId": operation_id, "state": "PENDING"}),
                || {
                    View::Text(format!(
                        "accepted: operation {operation_id}\nfollow it with: cmctl operation get {operation_id}"
                    ))
                },
            ),
        }
    }
}

/// `--async` on every write.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct WriteArgs {
    /// Do not wait for the worker: print the operation id to poll with
    /// `cmctl operation get` (the API answers 202 at once).
    #[arg(long = "async")]
    pub no_wait: bool,
}

/// Runs one subcommand.
pub async fn run(command: Command, ctx: &Ctx) -> Result<(), CliError> {
    match command {
        Command::Challenge(cmd) => challenge::run(cmd, ctx).await,
        Command::Instance(cmd) => instance::run(cmd, ctx).await,
        Command::Operation(cmd) => operation::run(cmd, ctx).await,
        Command::Queue(cmd) => queue::run(cmd, ctx).await,
        Command::Dlq(cmd) => dlq::run(cmd, ctx).await,
        Command::Scenario(cmd) => scenario::run(cmd, ctx).await,
    }
}

//! `cmctl operation get <id>`: `/api/v1/operation/{id}`, the state of a
//! command accepted with `--async` (or that outlived the API's wait).

use clap::Subcommand;
use serde_json::Value;

use super::Ctx;
use crate::{
    error::CliError,
    output::{View, cell},
};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show an operation: PENDING, SUCCEEDED or FAILED, with its result.
    Get {
        /// The operation id (the command id printed by --async).
        id: String,
    },
}

pub async fn run(cmd: Cmd, ctx: &Ctx) -> Result<(), CliError> {
    let Cmd::Get { id } = cmd;
    let mut op = ctx.api()?.get(&["api", "v1", "operation", &id]).await?;
    // Canonical JSON leaves out default values: PENDING (0) is never written.
    if let Some(obj) = op.as_object_mut() {
        obj.entry("state").or_insert_with(|| "PENDING".into());
    }
    let v = view(&op);
    ctx.printer.emit(op, || v);
    Ok(())
}

fn view(op: &Value) -> View {
    let result = op.get("result").cloned().unwrap_or(Value::Null);
    let outcome = if let Some(f) = result.get("failure") {
        format!("failed: {} ({})", cell(f, "message"), cell(f, "code"))
    } else if result.get("instance").is_some() {
        "instance".into()
    } else if result.get("challenge").is_some() {
        "challenge".into()
    } else if result.get("deleted").is_some() {
        "deleted".into()
    } else {
        "-".into()
    };
    View::Fields(vec![
        ("id".into(), cell(op, "id")),
        ("kind".into(), cell(op, "kind")),
        ("state".into(), cell(op, "state")),
        ("created".into(), cell(op, "createdAt")),
        ("finished".into(), cell(&result, "finishedAt")),
        ("outcome".into(), outcome),
    ])
}

//! `cmctl instance create|get|list|renew|delete`: `/api/v1/instance`.
//!
//! An instance is named by its challenge and its source (a player or team).
//! Flags are secrets: tables and JSON leave them out unless `--show-flags`.

use clap::Subcommand;
use cm_schemas::v1::CreateInstanceRequest;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Ctx, WriteArgs};
use crate::{
    args,
    error::CliError,
    output::{View, cell, pairs},
    progress,
};

/// Which instance.
#[derive(Debug, Clone, clap::Args)]
pub struct Key {
    /// The challenge id.
    #[arg(long)]
    challenge_id: String,
    /// The source id (a player or a team).
    #[arg(long)]
    source_id: String,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Deploy an instance for a source (claims a pooled one when there is one).
    Create {
        #[command(flatten)]
        key: Key,
        /// key=value for this instance's scenario, over the challenge's (repeat for several).
        #[arg(long = "additional", value_name = "KEY=VALUE", value_parser = args::pair)]
        additional: Vec<(String, String)>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Show one instance.
    Get {
        #[command(flatten)]
        key: Key,
    },
    /// List a source's instances.
    List {
        /// The source id (a player or a team).
        #[arg(long)]
        source_id: String,
    },
    /// Push an instance's expiry to now + the challenge's timeout.
    Renew {
        #[command(flatten)]
        key: Key,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Destroy an instance.
    Delete {
        #[command(flatten)]
        key: Key,
        #[command(flatten)]
        write: WriteArgs,
        /// Forget the instance even if its stack cannot be destroyed (an
        /// instance stuck in a failed state); the worker logs what is left.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(cmd: Cmd, ctx: &Ctx) -> Result<(), CliError> {
    let api = ctx.api()?;
    let show_flags = ctx.printer.show_flags;
    match cmd {
        Cmd::Create {
            key,
            additional,
            write,
        } => {
            let req = CreateInstanceRequest {
                challenge_id: key.challenge_id.clone(),
                source_id: key.source_id.clone(),
                additional: args::pairs_to_map(&additional).map_err(CliError::Usage)?,
            };
            let body = serde_json::to_value(&req)
                .map_err(|e| CliError::Usage(format!("cannot encode the request: {e}")))?;
            let label = format!(
                "deploying an instance of {} for {}",
                key.challenge_id, key.source_id
            );
            let written = progress::spin(
                &label,
                api.write(
                    Method::POST,
                    &["api", "v1", "instance"],
                    Some(&body),
                    write.no_wait,
                ),
            )
            .await?;
            ctx.print_written(written, |i| (i.clone(), view(&i, show_flags)));
        }
        Cmd::Get { key } => {
            let i = api
                .get(&["api", "v1", "instance", &key.challenge_id, &key.source_id])
                .await?;
            let v = view(&i, show_flags);
            ctx.printer.emit(i, || v);
        }
        Cmd::List { source_id } => {
            let items = api
                .list(&["api", "v1", "instance"], &[("sourceId", &source_id)])
                .await?;
            let v = table(&items, show_flags);
            ctx.printer.emit(Value::Array(items), || v);
        }
        Cmd::Renew { key, write } => {
            let label = format!(
                "renewing the instance of {} for {}",
                key.challenge_id, key.source_id
            );
            let written = progress::spin(
                &label,
                api.write(
                    Method::PATCH,
                    &["api", "v1", "instance", &key.challenge_id, &key.source_id],
                    None,
                    write.no_wait,
                ),
            )
            .await?;
            ctx.print_written(written, |i| (i.clone(), view(&i, show_flags)));
        }
        Cmd::Delete { key, write, force } => {
            let label = format!(
                "destroying the instance of {} for {}",
                key.challenge_id, key.source_id
            );
            let written = progress::spin(
                &label,
                api.write_query(
                    Method::DELETE,
                    &["api", "v1", "instance", &key.challenge_id, &key.source_id],
                    if force { &[("force", "true")] } else { &[] },
                    None,
                    write.no_wait,
                ),
            )
            .await?;
            ctx.print_written(written, |_| {
                (
                    json!({
                        "challengeId": key.challenge_id,
                        "sourceId": key.source_id,
                        "deleted": true,
                    }),
                    View::Text(format!(
                        "instance of {} for {} deleted",
                        key.challenge_id, key.source_id
                    )),
                )
            });
        }
    }
    Ok(())
}

fn flags(i: &Value) -> String {
    match i.get("flags").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        _ => cell(i, "flag"),
    }
}

/// One instance as `key  value` lines.
fn view(i: &Value, show_flags: bool) -> View {
    let mut fields = vec![
        ("challenge".into(), cell(i, "challengeId")),
        ("source".into(), cell(i, "sourceId")),
        ("since".into(), cell(i, "since")),
        ("last renew".into(), cell(i, "lastRenew")),
        ("until".into(), cell(i, "until")),
        ("connection".into(), cell(i, "connectionInfo")),
        ("additional".into(), pairs(i, "additional")),
    ];
    if show_flags {
        fields.push(("flags".into(), flags(i)));
    }
    View::Fields(fields)
}

/// Instances as a table.
pub fn table(items: &[Value], show_flags: bool) -> View {
    let mut headers = vec!["CHALLENGE", "SOURCE", "SINCE", "UNTIL", "CONNECTION"];
    if show_flags {
        headers.push("FLAGS");
    }
    let rows = items
        .iter()
        .map(|i| {
            let mut row = vec![
                cell(i, "challengeId"),
                cell(i, "sourceId"),
                cell(i, "since"),
                cell(i, "until"),
                cell(i, "connectionInfo"),
            ];
            if show_flags {
                row.push(flags(i));
            }
            row
        })
        .collect();
    View::Table { headers, rows }
}

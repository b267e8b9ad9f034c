//! `cmctl challenge create|get|list|update|delete`: `/api/v1/challenge`.
//!
//! Requests are built from the wire types of `schemas/` (the API's
//! `CreateChallengeRequest` / `UpdateChallengeRequest`) and sent as their
//! protobuf canonical JSON; an update sends an explicit `updateMask` naming
//! exactly the fields given on the command line.

use clap::Subcommand;
use cm_schemas::v1::{CreateChallengeRequest, UpdateChallengeRequest, UpdateStrategy};
use cm_schemas::wkt::{FieldMask, Timestamp};
use pbjson_types::Duration;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Ctx, WriteArgs, instance};
use crate::{
    args,
    error::CliError,
    output::{View, cell, count, pairs},
    progress,
};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Register a challenge (its pool, if any, is deployed before this returns).
    Create(CreateArgs),
    /// Show a challenge and its claimed instances.
    Get {
        /// The challenge id.
        id: String,
    },
    /// List every challenge.
    List,
    /// Change a challenge; running instances follow (--strategy).
    Update(UpdateArgs),
    /// Destroy every instance of a challenge, then the challenge.
    Delete {
        /// The challenge id.
        id: String,
        #[command(flatten)]
        write: WriteArgs,
    },
}

/// Fields of a new challenge.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The challenge id.
    #[arg(long)]
    id: String,
    /// The scenario: a directory under the workers' --scenarios-dir, or an OCI reference.
    #[arg(long)]
    scenario: String,
    /// How long an instance lives after its creation or renewal (10m, 600s); none: no renewal.
    #[arg(long, value_parser = args::duration)]
    timeout: Option<Duration>,
    /// When every instance expires: RFC 3339 date, or +2h from now.
    #[arg(long, value_parser = args::until)]
    until: Option<Timestamp>,
    /// key=value passed to every instance's scenario (repeat for several).
    #[arg(long = "additional", value_name = "KEY=VALUE", value_parser = args::pair)]
    additional: Vec<(String, String)>,
    /// Pool: instances deployed ahead and waiting to be claimed.
    #[arg(long, default_value_t = 0)]
    min: i64,
    /// Pool: most instances at once, claimed or not (0: no cap).
    #[arg(long, default_value_t = 0)]
    max: i64,
    /// Most instances one source may hold at once (0 or unset: the workers' default).
    #[arg(long)]
    max_per_source: Option<i64>,
    /// How the pool is sized: `static` keeps `--min` ready instances;
    /// `adaptive` follows the claims seen, within `--min` and `--max`.
    #[arg(long, value_enum)]
    pool: Option<Pool>,
    #[command(flatten)]
    write: WriteArgs,
}

/// `--pool`, named as the API names them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Pool {
    /// `--min` ready instances.
    Static,
    /// Sized from the claims seen, within `--min` and `--max`.
    Adaptive,
}

impl Pool {
    fn name(self) -> String {
        match self {
            Self::Static => "static",
            Self::Adaptive => "adaptive",
        }
        .to_owned()
    }
}

/// `--strategy`, named as the API names them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Strategy {
    /// Update each instance's stack where it stands.
    #[value(name = "update_in_place")]
    UpdateInPlace,
    /// Bring a new identity up, switch, then take the old one down.
    #[value(name = "blue_green")]
    BlueGreen,
    /// Take the stack down, then up again (same identity).
    #[value(name = "recreate")]
    Recreate,
}

impl From<Strategy> for UpdateStrategy {
    fn from(s: Strategy) -> Self {
        match s {
            Strategy::UpdateInPlace => Self::UpdateInPlace,
            Strategy::BlueGreen => Self::BlueGreen,
            Strategy::Recreate => Self::Recreate,
        }
    }
}

/// Fields to change; only those given are sent.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The challenge id.
    #[arg(long)]
    id: String,
    /// New scenario (running instances are updated with --strategy).
    #[arg(long)]
    scenario: Option<String>,
    /// New instance lifetime (10m, 600s).
    #[arg(long, value_parser = args::duration, conflicts_with = "no_timeout")]
    timeout: Option<Duration>,
    /// Remove the timeout (instances can no longer be renewed).
    #[arg(long)]
    no_timeout: bool,
    /// New expiry date for every instance (RFC 3339, or +2h).
    #[arg(long, value_parser = args::until, conflicts_with = "no_until")]
    until: Option<Timestamp>,
    /// Remove the expiry date.
    #[arg(long)]
    no_until: bool,
    /// key=value replacing the whole additional map (repeat for several).
    #[arg(long = "additional", value_name = "KEY=VALUE", value_parser = args::pair, conflicts_with = "clear_additional")]
    additional: Vec<(String, String)>,
    /// Empty the additional map.
    #[arg(long)]
    clear_additional: bool,
    /// Pool minimum.
    #[arg(long)]
    min: Option<i64>,
    /// Pool maximum (0: no cap).
    #[arg(long)]
    max: Option<i64>,
    /// Most instances one source may hold at once.
    #[arg(long)]
    max_per_source: Option<i64>,
    /// How the pool is sized (`static` or `adaptive`).
    #[arg(long, value_enum)]
    pool: Option<Pool>,
    /// How running instances take a new scenario or additional map.
    #[arg(long, value_enum)]
    strategy: Option<Strategy>,
    #[command(flatten)]
    write: WriteArgs,
}

pub async fn run(cmd: Cmd, ctx: &Ctx) -> Result<(), CliError> {
    let api = ctx.api()?;
    match cmd {
        Cmd::Create(a) => {
            let req = CreateChallengeRequest {
                id: a.id.clone(),
                scenario: a.scenario,
                timeout: a.timeout,
                until: a.until,
                additional: args::pairs_to_map(&a.additional).map_err(CliError::Usage)?,
                min: a.min,
                max: a.max,
                update_strategy: None,
                max_per_source: a.max_per_source,
                pool: a.pool.map(Pool::name),
            };
            let body = to_json(&req)?;
            let label = format!("registering challenge {}", a.id);
            let written = progress::spin(
                &label,
                api.write(
                    Method::POST,
                    &["api", "v1", "challenge"],
                    Some(&body),
                    a.write.no_wait,
                ),
            )
            .await?;
            ctx.print_written(written, |c| (c.clone(), view(&c, ctx.printer.show_flags)));
        }
        Cmd::Get { id } => {
            let c = api.get(&["api", "v1", "challenge", &id]).await?;
            let v = view(&c, ctx.printer.show_flags);
            ctx.printer.emit(c, || v);
        }
        Cmd::List => {
            let items = api.list(&["api", "v1", "challenge"], &[]).await?;
            let rows = items.iter().map(row).collect();
            ctx.printer.emit(Value::Array(items), || View::Table {
                headers: vec![
                    "ID",
                    "SCENARIO",
                    "TIMEOUT",
                    "UNTIL",
                    "MIN",
                    "MAX",
                    "INSTANCES",
                ],
                rows,
            });
        }
        Cmd::Update(a) => {
            let id = a.id.clone();
            let no_wait = a.write.no_wait;
            let body = to_json(&update_request(a)?)?;
            let label = format!("updating challenge {id}");
            let written = progress::spin(
                &label,
                api.write(
                    Method::PATCH,
                    &["api", "v1", "challenge", &id],
                    Some(&body),
                    no_wait,
                ),
            )
            .await?;
            ctx.print_written(written, |c| (c.clone(), view(&c, ctx.printer.show_flags)));
        }
        Cmd::Delete { id, write } => {
            let label = format!("deleting challenge {id} and its instances");
            let written = progress::spin(
                &label,
                api.write(
                    Method::DELETE,
                    &["api", "v1", "challenge", &id],
                    None,
                    write.no_wait,
                ),
            )
            .await?;
            ctx.print_written(written, |_| {
                (
                    json!({"id": id, "deleted": true}),
                    View::Text(format!("challenge {id} deleted")),
                )
            });
        }
    }
    Ok(())
}

/// The update request and its mask, from the flags given.
fn update_request(a: UpdateArgs) -> Result<UpdateChallengeRequest, CliError> {
    let mut paths = Vec::new();
    let mut mark = |given: bool, path: &str| {
        if given {
            paths.push(path.to_owned());
        }
    };
    mark(a.scenario.is_some(), "scenario");
    mark(a.timeout.is_some() || a.no_timeout, "timeout");
    mark(a.until.is_some() || a.no_until, "until");
    mark(!a.additional.is_empty() || a.clear_additional, "additional");
    mark(a.min.is_some(), "min");
    mark(a.max.is_some(), "max");
    mark(a.max_per_source.is_some(), "max_per_source");
    mark(a.pool.is_some(), "pool");
    if paths.is_empty() {
        return Err(CliError::Usage(
            "nothing to update: give at least one of --scenario, --timeout, --no-timeout, \
             --until, --no-until, --additional, --clear-additional, --min, --max, --max-per-source, --pool"
                .into(),
        ));
    }
    Ok(UpdateChallengeRequest {
        id: a.id,
        scenario: a.scenario,
        timeout: a.timeout,
        until: a.until,
        update_mask: Some(FieldMask { paths }),
        update_strategy: a.strategy.map(|s| UpdateStrategy::from(s) as i32),
        additional: args::pairs_to_map(&a.additional).map_err(CliError::Usage)?,
        min: a.min,
        max: a.max,
        max_per_source: a.max_per_source,
        pool: a.pool.map(Pool::name),
    })
}

fn to_json<T: serde::Serialize>(req: &T) -> Result<Value, CliError> {
    serde_json::to_value(req)
        .map_err(|e| CliError::Usage(format!("cannot encode the request: {e}")))
}

fn row(c: &Value) -> Vec<String> {
    let instances = c
        .get("instances")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    vec![
        cell(c, "id"),
        cell(c, "scenario"),
        cell(c, "timeout"),
        cell(c, "until"),
        count(c, "min"),
        count(c, "max"),
        instances.to_string(),
    ]
}

/// One challenge: its fields, then its instances.
fn view(c: &Value, show_flags: bool) -> View {
    let fields = View::Fields(vec![
        ("id".into(), cell(c, "id")),
        ("scenario".into(), cell(c, "scenario")),
        ("timeout".into(), cell(c, "timeout")),
        ("until".into(), cell(c, "until")),
        ("additional".into(), pairs(c, "additional")),
        ("min".into(), count(c, "min")),
        ("max".into(), count(c, "max")),
        ("max per source".into(), cell(c, "maxPerSource")),
        (
            "pool".into(),
            c.get("pool")
                .and_then(Value::as_str)
                .unwrap_or("static")
                .to_owned(),
        ),
    ]);
    let instances: Vec<Value> = c
        .get("instances")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if instances.is_empty() {
        return fields;
    }
    View::Sections(vec![fields, instance::table(&instances, show_flags)])
}

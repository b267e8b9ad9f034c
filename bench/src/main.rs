//! `cm-bench`: starts the real local stack (nats-server, etcd, and the
//! `cm-api`, `cm-worker`, `cm-janitor` binaries as processes), runs the
//! chosen scenarios and prints one table — name, n, p50, p99, unit, target,
//! verdict, ratio — then writes it as JSON with the machine it ran on and
//! the command that reproduces it.
//!
//! # Layout
//! - [`scenario`]: one file per scenario, and their shared context.
//! - [`stack`]: the stack as processes; [`bins`]: finding the binaries.
//! - [`sampler`], [`procfs`]: CPU and memory from `/proc`; [`scrape`]: the
//!   services' `/metrics`.
//! - [`report`], [`stats`]: rows, targets, verdicts, percentiles.
//! - [`machine`]: what the run ran on.

mod bins;
mod machine;
mod procfs;
mod report;
mod sampler;
mod scenario;
mod scrape;
mod stack;
mod stats;

use std::{path::PathBuf, time::Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::{
    bins::Bins,
    machine::Machine,
    report::Row,
    scenario::{Ctx, Params},
    stack::Env,
};

/// Benchmarks of the CTF instance manager on the real local stack: raw
/// floors (pulumi up, etcd, JetStream), fresh creates, pool claims, API
/// overhead, throughput with 1 and 2 workers, janitor ticks, memory. Prints
/// one table and writes it as JSON. Every flag can also be set through the
/// environment variable shown in brackets.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    which: Which,

    #[command(flatten)]
    opts: Opts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand, ValueEnum)]
enum Which {
    /// Every scenario below, in this order.
    All,
    /// Raw floors: `pulumi up` of the prebuilt example, etcd and JetStream round trips.
    Floor,
    /// A fresh instance end to end (1 client), against the raw `pulumi up`.
    Create,
    /// The Pulumi driver alone: first deploy, new stack, update, destroy.
    Driver,
    /// API overhead without Pulumi: read, renew through the full pipeline, async accept.
    Write,
    /// Pool claims end to end, with and without refills running.
    Claim,
    /// A CTF-start burst (`--burst-claims` creates from `--clients` clients over
    /// `--burst-secs`) on a static pool, then an adaptive one (not part of `all`).
    Burst,
    /// Instances per minute with `--clients` clients and 1, then 2 workers; CPU and memory.
    Throughput,
    /// Janitor tick at each of `--janitor-sizes` stored instances.
    Janitor,
    /// Resident memory of api, worker and janitor, idle.
    Rss,
    /// Renew latency and worker throughput with span export off, then on.
    Telemetry,
    /// Pulumi state at scale: `steps` creates of `--state-sizes` resources; bytes to
    /// the object store and etcd, etcd's growth and peak memory.
    State,
}

impl Which {
    fn scenarios(self) -> Vec<Which> {
        use Which::*;
        match self {
            All => vec![
                Floor, Create, Driver, Write, Claim, Throughput, Janitor, Rss, Telemetry, State,
            ],
            one => vec![one],
        }
    }

    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

#[derive(Debug, Args)]
struct Opts {
    /// Smoke run: a few samples of everything (numbers not worth quoting).
    #[arg(long, global = true, env = "CM_BENCH_QUICK")]
    quick: bool,

    /// Samples of each Pulumi-bound measurement [default: 10; quick: 3].
    #[arg(long, global = true, env = "CM_BENCH_ITERATIONS")]
    iterations: Option<usize>,

    /// Samples of each millisecond-scale measurement [default: 500; quick: 30].
    #[arg(long, global = true, env = "CM_BENCH_FAST_ITERATIONS")]
    fast_iterations: Option<usize>,

    /// Instances in each pool of the claim scenario [default: 30; quick: 5].
    #[arg(long, global = true, env = "CM_BENCH_POOL")]
    pool: Option<usize>,

    /// Concurrent clients of the throughput scenario.
    #[arg(long, global = true, env = "CM_BENCH_CLIENTS", default_value_t = 50)]
    clients: usize,

    /// Instances created in each throughput phase [default: 200; quick: 20].
    #[arg(long, global = true, env = "CM_BENCH_INSTANCES")]
    instances: Option<usize>,

    /// Stored instances at which the janitor tick is timed
    /// [default: 1000,10000,100000; quick: 1000,10000].
    #[arg(
        long,
        global = true,
        env = "CM_BENCH_JANITOR_SIZES",
        value_delimiter = ','
    )]
    janitor_sizes: Option<Vec<usize>>,

    /// Resources of the `steps` stacks of the state scenario
    /// [default: 10,1000,9000; quick: 10,200].
    #[arg(
        long,
        global = true,
        env = "CM_BENCH_STATE_SIZES",
        value_delimiter = ','
    )]
    state_sizes: Option<Vec<usize>>,

    /// Janitor ticks timed at each size [default: 20; quick: 5].
    #[arg(long, global = true, env = "CM_BENCH_TICKS")]
    ticks: Option<usize>,

    /// Creates of the burst scenario [default: 200; quick: 40].
    #[arg(long, global = true, env = "CM_BENCH_BURST_CLAIMS")]
    burst_claims: Option<usize>,

    /// Seconds the burst's creates are spread over [default: 60; quick: 15].
    #[arg(long, global = true, env = "CM_BENCH_BURST_SECS")]
    burst_secs: Option<u64>,

    /// Seconds a burst player keeps its instance before deleting it
    /// [default: 10; quick: 3].
    #[arg(long, global = true, env = "CM_BENCH_BURST_HOLD")]
    burst_hold: Option<u64>,

    /// Longest wait for a pool to drain back to min after the burst
    /// [default: 900; quick: 120].
    #[arg(long, global = true, env = "CM_BENCH_BURST_DRAIN_LIMIT")]
    burst_drain_limit: Option<u64>,

    /// Seconds a fresh stack idles before its memory is read [default: 10; quick: 2].
    #[arg(long, global = true, env = "CM_BENCH_IDLE_SETTLE")]
    idle_settle: Option<u64>,

    /// Commands each worker runs at once (the worker's own default).
    #[arg(
        long,
        global = true,
        env = "CM_WORKER_CONCURRENCY",
        default_value_t = 4
    )]
    worker_concurrency: usize,

    /// Where the JSON goes [default: target/cm-bench.json in the workspace].
    #[arg(long, global = true, env = "CM_BENCH_JSON")]
    json: Option<PathBuf>,

    /// Directory holding cm-api, cm-worker and cm-janitor (default: built
    /// by cargo with this binary's profile, else next to this binary).
    #[arg(long, global = true, env = "CM_BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    /// Where compiled scenarios, scratch workspaces and service logs go
    /// (default: a temporary directory removed afterwards).
    #[arg(long, global = true, env = "CM_BENCH_WORK_DIR")]
    work_dir: Option<PathBuf>,
}

impl Opts {
    fn params(&self) -> Params {
        let q = |quick: usize, full: usize| if self.quick { quick } else { full };
        Params {
            iterations: self.iterations.unwrap_or(q(3, 10)).max(1),
            fast_iterations: self.fast_iterations.unwrap_or(q(30, 500)).max(1),
            pool: self.pool.unwrap_or(q(5, 30)).max(1),
            clients: self.clients.max(1),
            instances: self.instances.unwrap_or(q(20, 200)).max(1),
            janitor_sizes: self.janitor_sizes.clone().unwrap_or_else(|| {
                if self.quick {
                    vec![1_000, 10_000]
                } else {
                    vec![1_000, 10_000, 100_000]
                }
            }),
            ticks: self.ticks.unwrap_or(q(5, 20)).max(1),
            state_sizes: self.state_sizes.clone().unwrap_or_else(|| {
                if self.quick {
                    vec![10, 200]
                } else {
                    vec![10, 1_000, 9_000]
                }
            }),
            idle_settle_secs: self.idle_settle.unwrap_or(q(2, 10) as u64),
            burst_claims: self.burst_claims.unwrap_or(q(40, 200)).max(1),
            burst_secs: self.burst_secs.unwrap_or(q(15, 60) as u64).max(1),
            burst_hold_secs: self.burst_hold.unwrap_or(q(3, 10) as u64),
            burst_drain_limit_secs: self.burst_drain_limit.unwrap_or(q(120, 900) as u64),
            worker_concurrency: self.worker_concurrency.max(1),
            quick: self.quick,
        }
    }
}

/// The JSON document.
#[derive(Debug, Serialize)]
struct Output<'a> {
    tool: &'static str,
    version: &'static str,
    scenario: String,
    started_at: String,
    duration_secs: f64,
    reproduce: String,
    params: &'a Params,
    machine: &'a Machine,
    binaries: Binaries,
    rows: &'a [Row],
    notes: &'a [String],
    failures: &'a [String],
}

#[derive(Debug, Serialize)]
struct Binaries {
    api: PathBuf,
    worker: PathBuf,
    janitor: PathBuf,
    origin: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,cm_bench=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let clock = Instant::now();
    let params = cli.opts.params();
    let workspace = cm_testkit::workspace_root();
    let pulumi = cm_core::tools::find_pulumi(None)?;
    let go = cm_core::tools::find_go(None)?;
    let machine = Machine::probe(&workspace, &pulumi);
    let bins = Bins::locate(cli.opts.bin_dir.as_deref(), &workspace)?;

    let temp;
    let work = match &cli.opts.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("cm-bench-")
                .tempdir()
                .context("creating a work directory")?;
            temp.path().to_owned()
        }
    };
    let env = Env {
        bins: bins.clone(),
        pulumi,
        go,
        cache_dir: work.join("cache"),
        scenarios_dir: workspace.join("examples"),
        logs_dir: work.join("logs"),
    };
    std::fs::create_dir_all(&env.logs_dir).context("creating the log directory")?;
    let mut ctx = Ctx::new(env, params.clone());
    let mut failures = Vec::new();
    for which in cli.which.scenarios() {
        let name = which.name();
        tracing::info!(scenario = %name, "running");
        let started = Instant::now();
        if let Err(e) = run(&mut ctx, which).await {
            tracing::error!(scenario = %name, error = format!("{e:#}"), "scenario failed");
            failures.push(format!("{name}: {e:#}"));
        }
        tracing::info!(scenario = %name, seconds = started.elapsed().as_secs_f64(), "done");
    }
    if params.quick {
        ctx.report
            .note("--quick smoke run: too few samples to quote these numbers");
    }

    let reproduce = reproduce();
    println!();
    println!("cm-bench {} on {}", cli.which.name(), machine.summary());
    println!();
    print!("{}", ctx.report.render());
    for f in &failures {
        println!("FAILED {f}");
    }
    println!();
    println!("reproduce: {reproduce}");

    let json = cli
        .opts
        .json
        .clone()
        .unwrap_or_else(|| workspace.join("target").join("cm-bench.json"));
    let out = Output {
        tool: "cm-bench",
        version: env!("CARGO_PKG_VERSION"),
        scenario: cli.which.name(),
        started_at,
        duration_secs: clock.elapsed().as_secs_f64(),
        reproduce,
        params: &params,
        machine: &machine,
        binaries: Binaries {
            api: bins.api,
            worker: bins.worker,
            janitor: bins.janitor,
            origin: bins.origin,
        },
        rows: &ctx.report.rows,
        notes: &ctx.report.notes,
        failures: &failures,
    };
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&json, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("json: {}", json.display());
    if !failures.is_empty() {
        anyhow::bail!("{} scenario(s) failed", failures.len());
    }
    Ok(())
}

async fn run(ctx: &mut Ctx, which: Which) -> anyhow::Result<()> {
    use scenario::*;
    match which {
        Which::All => Ok(()),
        Which::Floor => floor::run(ctx).await,
        Which::Create => create::run(ctx).await,
        Which::Driver => driver::run(ctx).await,
        Which::Write => write::run(ctx).await,
        Which::Claim => claim::run(ctx).await,
        Which::Burst => burst::run(ctx).await,
        Which::Throughput => throughput::run(ctx).await,
        Which::Janitor => janitor::run(ctx).await,
        Which::Rss => rss::run(ctx).await,
        Which::Telemetry => telemetry::run(ctx).await,
        Which::State => state::run(ctx).await,
    }
}

/// The command line that reproduces this run.
fn reproduce() -> String {
    let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    format!("cargo run --release -p cm-bench -- {}", args.join(" "))
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_shrinks_every_size() {
        let cli = Cli::parse_from(["cm-bench", "all", "--quick"]);
        let q = cli.opts.params();
        let full = Cli::parse_from(["cm-bench", "all"]).opts.params();
        assert!(q.quick && !full.quick);
        assert!(q.iterations < full.iterations);
        assert!(q.fast_iterations < full.fast_iterations);
        assert!(q.pool < full.pool);
        assert!(q.instances < full.instances);
        assert_eq!(full.janitor_sizes, vec![1_000, 10_000, 100_000]);
        assert_eq!(full.clients, 50);
    }

    #[test]
    fn flags_override_and_all_runs_every_scenario() {
        let cli = Cli::parse_from([
            "cm-bench",
            "--iterations",
            "7",
            "janitor",
            "--janitor-sizes",
            "10,20",
        ]);
        assert_eq!(cli.which, Which::Janitor);
        let p = cli.opts.params();
        assert_eq!(p.iterations, 7);
        assert_eq!(p.janitor_sizes, vec![10, 20]);
        assert_eq!(Which::All.scenarios().len(), 10);
        assert_eq!(Which::Throughput.name(), "throughput");
    }

    #[test]
    fn reproduce_quotes_what_the_shell_would_split() {
        assert_eq!(shell_quote("--quick"), "--quick");
        assert_eq!(shell_quote("/tmp/a b.json"), "'/tmp/a b.json'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}

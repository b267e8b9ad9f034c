//! The worker's command line: its flags (every one also an environment
//! variable) and what each mode runs: the service ([`crate::run`]), the
//! queue exporter ([`crate::run_exporter`]) or one scenario run
//! ([`crate::scenario`]). `main` only parses, sets up telemetry and calls
//! [`run`], so these rules are library code that tests can call.
//!
//! Owns: flags, turning them into configurations. Must not know: how the
//! modes work inside.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use cm_core::{
    Identity, Secret,
    config::{ConnectArgs, MetricsListen},
    protocol::QueueConfig,
    tools,
};

use crate::{
    WorkerConfig, WorkerError,
    passphrase::PassphraseSources,
    pulumi::{Driver, DriverConfig, DriverError},
    scenario::{self, ScenarioError},
};

/// Why a mode could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Passphrase(#[from] crate::passphrase::PassphraseError),
    #[error(transparent)]
    Tool(#[from] tools::ToolNotFound),
    #[error(transparent)]
    Config(#[from] cm_core::config::ConfigError),
    #[error("reading the OCI registry credentials: {0}")]
    Oci(#[from] cm_core::oci::auth::DockerConfigError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
}

/// Worker of the CTF instance manager: runs Pulumi scenarios for challenge
/// instances. Every flag can also be set through the environment variable
/// shown in brackets.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    #[command(flatten)]
    pulumi: PulumiArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
pub struct PulumiArgs {
    /// Path of the `pulumi` CLI (with `pulumi-language-go` beside it).
    /// Default: found on PATH, then in the cache filled by `scripts/dev.sh install`.
    #[arg(long, env = "CM_PULUMI", global = true)]
    pulumi_bin: Option<PathBuf>,

    /// Path of the Go toolchain used to compile scenarios. Default: `go` on PATH.
    #[arg(long, env = "CM_GO", global = true)]
    go_bin: Option<PathBuf>,

    /// Directory for compiled scenarios, Pulumi plugins and scratch workspaces.
    /// Default: `<cache>/worker` (cache: $CM_CACHE_DIR or ~/.cache/ctf-instancer).
    #[arg(long, env = "CM_WORKER_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,

    /// Passphrase of Pulumi's passphrase secrets provider, encrypting every
    /// stack's secrets. Required (this, --pulumi-passphrase-file, or Pulumi's
    /// own PULUMI_CONFIG_PASSPHRASE / PULUMI_CONFIG_PASSPHRASE_FILE), unless
    /// `--dev` is given. Scenarios never see it.
    #[arg(
        long,
        env = "CM_PULUMI_PASSPHRASE",
        hide_env_values = true,
        global = true
    )]
    pulumi_passphrase: Option<Secret<String>>,

    /// File holding the Pulumi passphrase (first line).
    #[arg(long, env = "CM_PULUMI_PASSPHRASE_FILE", global = true)]
    pulumi_passphrase_file: Option<PathBuf>,

    /// Development mode: allows running without a configured passphrase
    /// (a fixed, public one is used).
    #[arg(long, env = "CM_DEV", global = true)]
    dev: bool,

    /// Niceness of Pulumi runs (the CLI, the language host, the scenario
    /// program and its providers), -20 to 19. Deploys are batch work: at 10
    /// they yield the CPU to claims, renewals, etcd and NATS on a busy
    /// machine. 0 runs them at the worker's own priority (a negative value
    /// needs the privilege to raise a priority).
    #[arg(long, env = "CM_PULUMI_NICENESS", global = true,
          default_value_t = crate::pulumi::DEFAULT_NICENESS,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pulumi_niceness: i32,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume commands from JetStream until SIGINT/SIGTERM (the service).
    Run(Box<RunArgs>),
    /// Export only the queue-lag and inventory gauges on /metrics (no
    /// consuming), for a deployment that scrapes them apart from the workers.
    QueueExporter(Box<ExporterArgs>),
    /// Run a scenario directly through the Pulumi driver, without the queue.
    #[command(subcommand)]
    Scenario(ScenarioCommand),
}

#[derive(Debug, Args)]
pub struct ExporterArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "CM_METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    metrics_listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Commands this worker processes at once.
    #[arg(long, env = "CM_WORKER_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,

    /// Pulumi operations this worker runs at once (0: as many as
    /// --concurrency). Set it below --concurrency (say 4 and 32) so that
    /// commands without Pulumi (pool claims, renewals) never queue behind
    /// deploys; the refills of an adaptive pool, which deploy several at
    /// once, take turns within it too.
    #[arg(long, env = "CM_PULUMI_CONCURRENCY", default_value_t = 0)]
    pulumi_concurrency: usize,

    /// Directory that directory scenario references (a challenge's
    /// `scenario` naming neither a registry nor an upload) resolve in.
    #[arg(long, env = "CM_SCENARIOS_DIR", default_value = "examples")]
    scenarios_dir: PathBuf,

    #[command(flatten)]
    oci: cm_core::oci::config::OciArgs,

    /// Longest wait for a lock before the command is retried later.
    #[arg(long, env = "CM_LOCK_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    lock_timeout: Duration,

    /// TTL of the etcd lease binding this worker's locks, in seconds: a dead
    /// worker's locks are freed this long after it died.
    #[arg(long, env = "CM_LEASE_TTL", default_value_t = 10)]
    lease_ttl: i64,

    /// Shortest time between two checkpoints of a running Pulumi operation
    /// stored as the stack's state (each is the whole state, written to the
    /// object store). A worker killed mid-run loses at most this much
    /// progress: resources created since the last stored checkpoint are
    /// created again by the next run. `0s` stores every checkpoint.
    #[arg(long, env = "CM_CHECKPOINT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    checkpoint_interval: Duration,

    /// How long a command may go without an ack or progress before JetStream
    /// redelivers it (progress is sent every third of it while Pulumi runs).
    #[arg(long, env = "CM_ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    ack_wait: Duration,

    /// Deliveries of a failing command before it is dead-lettered.
    #[arg(long, env = "CM_MAX_DELIVER", default_value_t = 5)]
    max_deliver: i64,

    /// Commands in flight across all workers (the consumer's max_ack_pending).
    #[arg(long, env = "CM_MAX_ACK_PENDING", default_value_t = 256)]
    max_ack_pending: i64,

    /// Most instances one source (player or team) may hold at once, across
    /// challenges; 0 means no cap. A challenge's `maxPerSource` overrides it.
    #[arg(long, env = "CM_MAX_INSTANCES_PER_SOURCE", default_value_t = 0)]
    max_instances_per_source: i64,

    /// At the cap, destroy the source's oldest instance to make room instead
    /// of refusing the new one.
    #[arg(long, env = "CM_EVICT_OLDEST")]
    evict_oldest: bool,

    /// Address of the Prometheus `/metrics` endpoint (`off` to disable).
    #[arg(long, env = "CM_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: MetricsListen,

    /// After SIGINT/SIGTERM, how long in-flight commands may finish.
    #[arg(long, env = "CM_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,

    #[command(flatten)]
    pools: PoolArgs,
}

/// How pools are refilled, and how adaptive pools (`pool: adaptive`) follow
/// demand: they keep `headroom x claim rate x deploy time` instances, within
/// the challenge's `min` and `max`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Pool deploys the whole cluster runs at once (give every worker the
    /// same value): refills never take more of the cluster's Pulumi runs
    /// than this away from players' own creates.
    #[arg(long, env = "CM_REFILL_SLOTS", default_value_t = 4)]
    refill_slots: usize,

    /// Most deploys one refill of an adaptive pool starts at once (within
    /// the free refill slots). Static pools deploy one at a time.
    #[arg(long, env = "CM_REFILL_BATCH", default_value_t = 4)]
    refill_batch: usize,

    /// Time constant of the onset claim-rate average: how quickly an
    /// adaptive pool sees a burst's first claims (kept between 100 ms and
    /// the fast one's).
    #[arg(long, env = "CM_POOL_RATE_ONSET", default_value = "3s", value_parser = humantime::parse_duration)]
    pool_rate_onset: Duration,

    /// Time constant of the fast claim-rate average: how quickly an
    /// adaptive pool sees a sustained rate.
    #[arg(long, env = "CM_POOL_RATE_FAST", default_value = "15s", value_parser = humantime::parse_duration)]
    pool_rate_fast: Duration,

    /// Time constant of the slow claim-rate average: how long an adaptive
    /// pool stays large after claims stop (it follows the larger of the two).
    #[arg(long, env = "CM_POOL_RATE_SLOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pool_rate_slow: Duration,

    /// Pooled instances per claim expected during one deploy.
    #[arg(long, env = "CM_POOL_HEADROOM", default_value_t = 2.0)]
    pool_headroom: f64,

    /// Deploy time assumed for a scenario before one is measured.
    #[arg(long, env = "CM_POOL_FIRST_DEPLOY", default_value = "5s", value_parser = humantime::parse_duration)]
    pool_first_deploy: Duration,
}

impl PoolArgs {
    fn settings(&self) -> crate::context::PoolSettings {
        crate::context::PoolSettings {
            tuning: cm_core::pool_demand::Tuning {
                onset: self.pool_rate_onset.clamp(
                    Duration::from_millis(100),
                    self.pool_rate_fast.max(Duration::from_millis(100)),
                ),
                fast: self.pool_rate_fast.max(Duration::from_millis(100)),
                slow: self.pool_rate_slow.max(self.pool_rate_fast),
                headroom: if self.pool_headroom.is_finite() {
                    self.pool_headroom.clamp(0.0, 100.0)
                } else {
                    2.0
                },
                first_deploy: self.pool_first_deploy,
            },
            refill_slots: self.refill_slots.max(1),
            refill_batch: self.refill_batch.max(1),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ScenarioCommand {
    /// Deploy (or update in place) one stack of a scenario and print its outputs.
    Up {
        /// The scenario directory (holding Pulumi.yaml).
        dir: PathBuf,
        /// Identity of the stack (16 hex characters). Default: a new random one,
        /// or the one recorded in --state-file when it exists.
        #[arg(long)]
        identity: Option<Identity>,
        /// Additional configuration, `key=value`, repeatable.
        #[arg(long = "additional", value_parser = scenario::parse_key_value)]
        additional: Vec<(String, String)>,
        /// Where the stack state is kept between runs (read if it exists, then written).
        #[arg(long)]
        state_file: PathBuf,
        /// Also print the flags (they are secrets: hidden by default).
        #[arg(long)]
        show_flags: bool,
    },
    /// Destroy the stack recorded in --state-file.
    Destroy {
        /// The scenario directory (holding Pulumi.yaml).
        dir: PathBuf,
        /// The state file written by `scenario up`.
        #[arg(long)]
        state_file: PathBuf,
    },
}

impl PulumiArgs {
    fn driver(&self) -> Result<Driver, CliError> {
        Ok(Driver::new(self.driver_config()?)?)
    }

    /// The passphrase, by the rule of [`crate::passphrase`].
    fn passphrase(&self) -> Result<Secret<String>, CliError> {
        Ok(PassphraseSources::with_pulumi_env(
            self.pulumi_passphrase.clone(),
            self.pulumi_passphrase_file.clone(),
            self.dev,
        )
        .resolve()?)
    }

    fn driver_config(&self) -> Result<DriverConfig, CliError> {
        let passphrase = self.passphrase()?;
        let config = DriverConfig {
            pulumi: tools::find_pulumi(self.pulumi_bin.as_deref())?,
            go: tools::find_go(self.go_bin.as_deref())?,
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(|| tools::cache_root().join("worker")),
            passphrase,
            niceness: self.pulumi_niceness,
        };
        Ok(config)
    }
}

/// Runs the mode `cli` asks for until it ends (the service: until SIGINT/SIGTERM).
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run(args) => run_worker(&cli.pulumi, *args).await,
        Command::QueueExporter(args) => {
            crate::run_exporter(
                &args.connect.connection()?,
                args.metrics_listen,
                cm_core::shutdown::signal(),
            )
            .await?;
            Ok(())
        }
        Command::Scenario(cmd) => run_scenario(&cli.pulumi, cmd).await,
    }
}

async fn run_worker(pulumi: &PulumiArgs, args: RunArgs) -> Result<(), CliError> {
    // The passphrase first: without one, nothing else is worth checking.
    let driver = pulumi.driver_config()?;
    let mut connection = args.connect.connection()?;
    connection.queue = QueueConfig {
        ack_wait: args.ack_wait,
        max_deliver: args.max_deliver,
        max_ack_pending: args.max_ack_pending,
        ..connection.queue
    };
    let config = WorkerConfig {
        connection,
        concurrency: args.concurrency.max(1),
        pulumi_runs: args.pulumi_concurrency,
        scenarios_dir: args.scenarios_dir,
        oci: args.oci.client_config()?,
        driver,
        lock_timeout: args.lock_timeout,
        quota: crate::context::Quota {
            max_per_source: args.max_instances_per_source.max(0),
            evict_oldest: args.evict_oldest,
        },
        lease_ttl: args.lease_ttl.max(2),
        checkpoint_interval: args.checkpoint_interval,
        shutdown_grace: args.shutdown_grace,
        metrics_listen: args.metrics_listen.0,
        pools: args.pools.settings(),
    };
    crate::run(config, cm_core::shutdown::signal()).await?;
    Ok(())
}

async fn run_scenario(args: &PulumiArgs, cmd: ScenarioCommand) -> Result<(), CliError> {
    let driver = args.driver()?;
    match cmd {
        ScenarioCommand::Up {
            dir,
            identity,
            additional,
            state_file,
            show_flags,
        } => {
            let additional = additional.into_iter().collect();
            let report = scenario::up(&driver, &dir, identity, additional, &state_file).await?;
            println!("{}", report.render(show_flags));
        }
        ScenarioCommand::Destroy { dir, state_file } => {
            let stack = scenario::destroy(&driver, &dir, &state_file).await?;
            println!("destroyed {stack}");
        }
    }
    Ok(())
}

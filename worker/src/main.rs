//! `cm-worker`: parses flags, sets up telemetry and runs the requested mode.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use cm_core::{Identity, Secret, tools};
use cm_core::{
    config::{ConnectArgs, MetricsListen},
    queue::QueueConfig,
};
use cm_worker::{
    WorkerConfig,
    passphrase::PassphraseSources,
    pulumi::{Driver, DriverConfig, StackState},
};

/// Worker of the CTF instance manager: runs Pulumi scenarios for challenge
/// instances. Every flag can also be set through the environment variable
/// shown in brackets.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pulumi: PulumiArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct PulumiArgs {
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
}

#[derive(Debug, Subcommand)]
enum Command {
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
struct ExporterArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "CM_METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    metrics_listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Commands this worker processes at once.
    #[arg(long, env = "CM_WORKER_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,

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
}

#[derive(Debug, Subcommand)]
enum ScenarioCommand {
    /// Deploy (or update in place) one stack of a scenario and print its outputs.
    Up {
        /// The scenario directory (holding Pulumi.yaml).
        dir: PathBuf,
        /// Identity of the stack (16 hex characters). Default: a new random one,
        /// or the one recorded in --state-file when it exists.
        #[arg(long)]
        identity: Option<Identity>,
        /// Additional configuration, `key=value`, repeatable.
        #[arg(long = "additional", value_parser = parse_key_value)]
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

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

impl PulumiArgs {
    fn driver(&self) -> anyhow::Result<Driver> {
        Ok(Driver::new(self.driver_config()?)?)
    }

    /// The passphrase, by the rule of [`cm_worker::passphrase`].
    fn passphrase(&self) -> anyhow::Result<Secret<String>> {
        Ok(PassphraseSources::with_pulumi_env(
            self.pulumi_passphrase.clone(),
            self.pulumi_passphrase_file.clone(),
            self.dev,
        )
        .resolve()?)
    }

    fn driver_config(&self) -> anyhow::Result<DriverConfig> {
        let passphrase = self.passphrase()?;
        let config = DriverConfig {
            pulumi: tools::find_pulumi(self.pulumi_bin.as_deref())?,
            go: tools::find_go(self.go_bin.as_deref())?,
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(|| tools::cache_root().join("worker")),
            passphrase,
        };
        Ok(config)
    }
}

/// Stack of each runtime thread. A handler's future nests the lock, store
/// and Pulumi driver futures several levels deep (a create that evicts
/// another instance destroys it from inside its own run), and unoptimised
/// builds poll them with large frames: 2 MiB (the default) overflowed there.
/// Only touched pages cost memory.
const THREAD_STACK: usize = 8 << 20;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK)
        .build()?
        .block_on(run_main())
}

async fn run_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = cm_core::telemetry::init("cm-worker")?;
    match cli.command {
        Command::Run(args) => run(&cli.pulumi, *args).await,
        Command::QueueExporter(args) => {
            cm_worker::run_exporter(
                &args.connect,
                &args.connect.queue_config(),
                args.metrics_listen,
                cm_core::shutdown::signal(),
            )
            .await?;
            Ok(())
        }
        Command::Scenario(cmd) => scenario(&cli.pulumi, cmd).await,
    }
}

async fn run(pulumi: &PulumiArgs, args: RunArgs) -> anyhow::Result<()> {
    let queue = QueueConfig {
        ack_wait: args.ack_wait,
        max_deliver: args.max_deliver,
        max_ack_pending: args.max_ack_pending,
        ..args.connect.queue_config()
    };
    // The passphrase first: without one, nothing else is worth checking.
    let driver = pulumi.driver_config()?;
    let config = WorkerConfig {
        nats: args.connect.nats_options()?,
        store: args.connect.store_options()?,
        nats_url: args.connect.nats_url,
        etcd_endpoints: args.connect.etcd_endpoints,
        etcd_root: args.connect.etcd_root,
        queue,
        concurrency: args.concurrency.max(1),
        scenarios_dir: args.scenarios_dir,
        oci: args
            .oci
            .client_config()
            .context("reading the OCI registry credentials")?,
        driver,
        lock_timeout: args.lock_timeout,
        quota: cm_worker::context::Quota {
            max_per_source: args.max_instances_per_source.max(0),
            evict_oldest: args.evict_oldest,
        },
        lease_ttl: args.lease_ttl.max(2),
        shutdown_grace: args.shutdown_grace,
        metrics_listen: args.metrics_listen.0,
    };
    cm_worker::run(config, cm_core::shutdown::signal()).await?;
    Ok(())
}

async fn scenario(args: &PulumiArgs, cmd: ScenarioCommand) -> anyhow::Result<()> {
    let driver = args.driver()?;
    match cmd {
        ScenarioCommand::Up {
            dir,
            identity,
            additional,
            state_file,
            show_flags,
        } => {
            let previous = read_state(&state_file).await?;
            let identity = match (identity, &previous) {
                (Some(id), _) => id,
                (None, Some(p)) => p
                    .stack
                    .parse()
                    .context("state file holds an invalid identity")?,
                (None, None) => Identity::random(),
            };
            let scenario = driver.prepare(&dir).await?;
            let additional: BTreeMap<_, _> = additional.into_iter().collect();
            let deployment = driver
                .up(&scenario, &identity, &additional, previous.as_ref())
                .await?;
            let json = serde_json::to_vec_pretty(&deployment.state)?;
            tokio::fs::write(&state_file, json)
                .await
                .with_context(|| format!("writing {}", state_file.display()))?;
            println!("identity:        {identity}");
            println!("connection_info: {}", deployment.outputs.connection_info);
            if show_flags {
                println!("flags:           {}", deployment.outputs.flags.join(", "));
            } else {
                println!(
                    "flags:           {} (hidden; --show-flags)",
                    deployment.outputs.flags.len()
                );
            }
            Ok(())
        }
        ScenarioCommand::Destroy { dir, state_file } => {
            let Some(state) = read_state(&state_file).await? else {
                bail!(
                    "{} does not exist: nothing to destroy",
                    state_file.display()
                );
            };
            let scenario = driver.prepare(&dir).await?;
            driver.destroy(&scenario, &state).await?;
            tokio::fs::remove_file(&state_file).await.ok();
            println!("destroyed {}", state.stack);
            Ok(())
        }
    }
}

async fn read_state(path: &std::path::Path) -> anyhow::Result<Option<StackState>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a state file", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

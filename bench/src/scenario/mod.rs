//! The scenarios, one file each, and what they share: the run's parameters,
//! the stack environment, the compiled example scenario and the raw
//! `pulumi up` floor other rows are compared with.

pub mod burst;
pub mod claim;
pub mod create;
pub mod driver;
pub mod floor;
pub mod janitor;
pub mod rss;
pub mod state;
pub mod telemetry;
pub mod throughput;
pub mod write;

use std::path::PathBuf;

use anyhow::Context;
use cm_core::Secret;
use cm_worker::pulumi::{Driver, DriverConfig, PreparedScenario};
use serde::Serialize;

use crate::{
    report::Report,
    stack::{Env, PASSPHRASE},
};

/// Sizes of a run (the `--quick` smoke run shrinks every one).
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Samples of each Pulumi-bound measurement (raw up, driver, create).
    pub iterations: usize,
    /// Samples of each millisecond-scale measurement (etcd, JetStream, API writes).
    pub fast_iterations: usize,
    /// Instances pre-deployed in each pool, then claimed one by one.
    pub pool: usize,
    /// Concurrent clients of the throughput scenario.
    pub clients: usize,
    /// Instances created per throughput phase.
    pub instances: usize,
    /// Stored instances at which the janitor tick is timed.
    pub janitor_sizes: Vec<usize>,
    /// Ticks timed at each size.
    pub ticks: usize,
    /// Resources of each `steps` stack of the state scenario.
    pub state_sizes: Vec<usize>,
    /// Seconds a freshly started stack is left alone before idle memory is read.
    pub idle_settle_secs: u64,
    /// Creates of the burst scenario.
    pub burst_claims: usize,
    /// Seconds the burst's creates are spread over.
    pub burst_secs: u64,
    /// Seconds a burst player keeps an instance before deleting it.
    pub burst_hold_secs: u64,
    /// Longest wait for a pool to drain back to min after the burst.
    pub burst_drain_limit_secs: u64,
    /// Commands each worker runs at once (`cm-worker run --concurrency`).
    pub worker_concurrency: usize,
    pub quick: bool,
}

/// The example scenario every measurement deploys: it creates no resource,
/// so what is timed is Pulumi and this system, not a cloud.
pub const EXAMPLE: &str = "identity";

/// What the scenarios share during a run.
#[derive(Debug)]
pub struct Ctx {
    pub env: Env,
    pub params: Params,
    pub report: Report,
    compiled: Option<PreparedScenario>,
}

impl Ctx {
    pub fn new(env: Env, params: Params) -> Self {
        Self {
            env,
            params,
            report: Report::default(),
            compiled: None,
        }
    }

    /// A Pulumi driver (the worker's own) over `cache_dir`.
    pub fn driver(&self, cache_dir: PathBuf) -> anyhow::Result<Driver> {
        Driver::new(DriverConfig {
            pulumi: self.env.pulumi.clone(),
            go: self.env.go.clone(),
            cache_dir,
            passphrase: Secret::new(PASSPHRASE.to_owned()),
            niceness: cm_worker::pulumi::DEFAULT_NICENESS,
        })
        .context("setting up the Pulumi driver")
    }

    /// The example compiled into the run's shared cache (once), where the
    /// workers find it too.
    pub async fn compiled(&mut self) -> anyhow::Result<PreparedScenario> {
        if let Some(s) = &self.compiled {
            return Ok(s.clone());
        }
        let driver = self.driver(self.env.cache_dir.clone())?;
        let scenario = driver
            .prepare(&self.env.scenarios_dir.join(EXAMPLE))
            .await
            .context("compiling the example scenario")?;
        self.compiled = Some(scenario.clone());
        Ok(scenario)
    }

    /// Median of the raw `pulumi up` floor, measured now if no scenario has.
    pub async fn raw_floor_ms(&mut self) -> anyhow::Result<f64> {
        if self.report.find(floor::PULUMI_UP).is_none() {
            floor::pulumi_up(self).await?;
        }
        self.report
            .find(floor::PULUMI_UP)
            .map(|r| r.p50)
            .context("no raw pulumi up floor")
    }
}

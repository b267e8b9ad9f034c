//! The janitor's flags and environment, and the [`JanitorConfig`] they make.
//!
//! Owns: every flag of `cm-janitor` and its rules (defaults, `off`, the
//! smallest batch). Must not know: how a tick or a sweep runs.

use std::time::Duration;

use cm_core::config::{ConfigError, ConnectArgs, MetricsListen};

use crate::JanitorConfig;

/// Janitor of the CTF instance manager: on a timer, finds the instances past
/// their `until` and publishes their expiry commands (the workers destroy
/// them), and sweeps the Pulumi state bucket. Safe to run several at once.
/// Every flag can also be set through the environment variable shown in
/// brackets.
#[derive(Debug, clap::Parser)]
#[command(name = "cm-janitor", version)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Time between two ticks (e.g. `30s`, `1m`).
    #[arg(long, env = "CM_JANITOR_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Run one tick and exit (for cron).
    #[arg(long, env = "CM_JANITOR_ONCE")]
    pub once: bool,

    /// Address of the Prometheus `/metrics` endpoint (`off` to disable).
    #[arg(long, env = "CM_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: MetricsListen,

    /// Most expiry commands published per tick; the rest wait for the next tick.
    #[arg(long, env = "CM_JANITOR_BATCH", default_value_t = 1000)]
    pub batch: i64,

    /// Time between two sweeps of the Pulumi state bucket, which remove
    /// state objects no stack points to (left by a worker that died while
    /// storing one) once they are an hour old; `off` never sweeps.
    #[arg(long, env = "CM_STATE_SWEEP_INTERVAL", default_value = "10m")]
    pub state_sweep_interval: SweepInterval,

    /// Time between two looks for orphaned stacks: stack states no instance
    /// record names and no lock holds (a reset or blue/green update that
    /// died around its switch, or failed to destroy the stack it replaced).
    /// Each is handed to a worker (`stack.reclaim`), which destroys it;
    /// `off` never looks.
    #[arg(long, env = "CM_ORPHAN_SWEEP_INTERVAL", default_value = "1m")]
    pub orphan_sweep_interval: SweepInterval,

    /// Time between two refill requests of each adaptive pool (`pool:
    /// adaptive`), so that a pool grown for a burst shrinks back once claims
    /// stop; `off` never asks (such pools then only move on claims).
    #[arg(long, env = "CM_POOL_REVIEW_INTERVAL", default_value = "15s")]
    pub pool_review_interval: SweepInterval,
}

/// `--state-sweep-interval`: a duration, or `off` (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepInterval(pub Option<Duration>);

impl std::str::FromStr for SweepInterval {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.trim().eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        humantime::parse_duration(value.trim())
            .map(|d| Self(Some(d)))
            .map_err(|e| format!("{value:?} is not a duration (e.g. 10m) or `off`: {e}"))
    }
}

impl Cli {
    /// The configuration these flags describe (secret files read, TLS and
    /// credentials checked).
    pub fn config(&self) -> Result<JanitorConfig, ConfigError> {
        Ok(JanitorConfig {
            connection: self.connect.connection()?,
            interval: self.interval,
            once: self.once,
            batch: self.batch.max(1),
            metrics_listen: self.metrics_listen.0,
            state_sweep: self.state_sweep_interval.0,
            orphan_sweep: self.orphan_sweep_interval.0,
            pool_review: self.pool_review_interval.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_make_the_configuration() {
        let cli = Cli::try_parse_from([
            "cm-janitor",
            "--state-sweep-interval",
            "off",
            "--batch",
            "0",
            "--etcd-root",
            "/ctf",
        ])
        .expect("flags");
        let config = cli.config().expect("config");
        assert_eq!(config.state_sweep, None);
        assert_eq!(config.batch, 1, "a batch is at least one command");
        assert_eq!(config.connection.etcd_root, "/ctf");
        let cli = Cli::try_parse_from(["cm-janitor"]).expect("defaults");
        let defaults = cli.config().expect("config");
        assert_eq!(defaults.state_sweep, Some(Duration::from_secs(600)));
        assert_eq!(defaults.orphan_sweep, Some(Duration::from_secs(60)));
        assert_eq!(defaults.pool_review, Some(Duration::from_secs(15)));
        assert_eq!(
            Cli::try_parse_from(["cm-janitor", "--orphan-sweep-interval", "OFF"])
                .expect("flags")
                .config()
                .expect("config")
                .orphan_sweep,
            None
        );
        assert!(Cli::try_parse_from(["cm-janitor", "--state-sweep-interval", "soon"]).is_err());
    }
}

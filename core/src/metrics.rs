//! Metrics, under the names operators chart and alert on (see
//! `deploy/monitoring/rules`), served in the Prometheus text format on
//! `/metrics` by every binary.
//!
//! One registry per process ([`metrics`]); the names are the constants below,
//! the only place they are spelt.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub const CHALLENGES: &str = "challenges";
pub const INSTANCES: &str = "instances";
pub const COMMANDS: &str = "cm_commands";
pub const COMMAND_DURATION: &str = "cm_command_duration_seconds";
pub const COMMAND_LATENCY: &str = "cm_command_latency_seconds";
pub const QUEUE_PENDING: &str = "cm_queue_pending";
pub const QUEUE_ACK_PENDING: &str = "cm_queue_ack_pending";
pub const QUEUE_REDELIVERED: &str = "cm_queue_redelivered";
pub const QUEUE_WAITING: &str = "cm_queue_waiting";
pub const QUEUE_OLDEST_AGE: &str = "cm_queue_oldest_pending_age_seconds";
pub const DEAD_LETTERS: &str = "cm_dead_letters";
pub const LOCK_WAIT: &str = "cm_lock_wait_seconds";
pub const PULUMI_DURATION: &str = "cm_pulumi_duration_seconds";
pub const POOL_SIZE: &str = "cm_pool_size";
pub const POOL_CLAIMS: &str = "cm_pool_claims";
pub const POOL_TARGET: &str = "cm_pool_target";
pub const POOL_READY: &str = "cm_pool_ready";
pub const POOL_DEPLOYING: &str = "cm_pool_deploying";
pub const POOL_CLAIM_RATE: &str = "cm_pool_claim_rate";
pub const POOL_DEPLOY_SECONDS: &str = "cm_pool_deploy_seconds";
pub const JANITOR_TICKS: &str = "cm_janitor_ticks";
pub const JANITOR_EXPIRED: &str = "cm_janitor_expired_found";
pub const JANITOR_LAST_TICK: &str = "cm_janitor_last_tick_timestamp_seconds";
pub const STATE_BYTES: &str = "cm_state_bytes_written";
pub const ETCD_DB_SIZE: &str = "cm_etcd_db_size_bytes";
pub const ETCD_DB_QUOTA: &str = "cm_etcd_db_quota_bytes";
pub const ETCD_ALARM: &str = "cm_etcd_alarm";

/// Label sets are plain `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// Builds a label set.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn seconds_histogram() -> Histogram {
    // 5 ms .. ~20 min, with 30 s (the latency SLO) as a boundary.
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        600.0, 1200.0,
    ])
}

/// Every metric of this system.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub challenges: Gauge,
    pub instances: Family<Labels, Gauge>,
    pub commands: Family<Labels, Counter>,
    pub command_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub command_latency: Family<Labels, Histogram, fn() -> Histogram>,
    pub queue_pending: Family<Labels, Gauge>,
    pub queue_ack_pending: Family<Labels, Gauge>,
    pub queue_redelivered: Family<Labels, Gauge>,
    pub queue_waiting: Family<Labels, Gauge>,
    pub queue_oldest_age: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub dead_letters: Gauge,
    pub lock_wait: Family<Labels, Histogram, fn() -> Histogram>,
    pub pulumi_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub pool_size: Family<Labels, Gauge>,
    pub pool_claims: Family<Labels, Counter>,
    pub pool_target: Family<Labels, Gauge>,
    pub pool_ready: Family<Labels, Gauge>,
    pub pool_deploying: Family<Labels, Gauge>,
    pub pool_claim_rate: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub pool_deploy_seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub janitor_ticks: Family<Labels, Counter>,
    pub janitor_expired: Counter,
    pub janitor_last_tick: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub state_bytes: Family<Labels, Counter>,
    pub etcd_db_size: Gauge,
    pub etcd_db_quota: Gauge,
    pub etcd_alarm: Family<Labels, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            challenges: Gauge::default(),
            instances: Family::default(),
            commands: Family::default(),
            command_duration: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            command_latency: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            queue_pending: Family::default(),
            queue_ack_pending: Family::default(),
            queue_redelivered: Family::default(),
            queue_waiting: Family::default(),
            queue_oldest_age: Family::default(),
            dead_letters: Gauge::default(),
            lock_wait: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            pulumi_duration: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            pool_size: Family::default(),
            pool_claims: Family::default(),
            pool_target: Family::default(),
            pool_ready: Family::default(),
            pool_deploying: Family::default(),
            pool_claim_rate: Family::default(),
            pool_deploy_seconds: Family::default(),
            janitor_ticks: Family::default(),
            janitor_expired: Counter::default(),
            janitor_last_tick: Gauge::default(),
            state_bytes: Family::default(),
            etcd_db_size: Gauge::default(),
            etcd_db_quota: Gauge::default(),
            etcd_alarm: Family::default(),
            registry: Registry::default(),
        };
        registry.register(CHALLENGES, "Challenges registered", m.challenges.clone());
        registry.register(
            INSTANCES,
            "Instances, by state (claimed, pooled)",
            m.instances.clone(),
        );
        registry.register(
            COMMANDS,
            "Commands processed, by kind and outcome",
            m.commands.clone(),
        );
        registry.register(
            COMMAND_DURATION,
            "Handler time of a command in a worker",
            m.command_duration.clone(),
        );
        registry.register(
            COMMAND_LATENCY,
            "Time from a command's publish to its ack",
            m.command_latency.clone(),
        );
        registry.register(
            QUEUE_PENDING,
            "Commands not yet delivered to a worker",
            m.queue_pending.clone(),
        );
        registry.register(
            QUEUE_ACK_PENDING,
            "Commands delivered and not yet acknowledged",
            m.queue_ack_pending.clone(),
        );
        registry.register(
            QUEUE_REDELIVERED,
            "Commands delivered more than once and not yet acknowledged",
            m.queue_redelivered.clone(),
        );
        registry.register(
            QUEUE_WAITING,
            "Pull requests waiting (workers idle and consuming)",
            m.queue_waiting.clone(),
        );
        registry.register(
            QUEUE_OLDEST_AGE,
            "Age of the oldest unprocessed command",
            m.queue_oldest_age.clone(),
        );
        registry.register(
            DEAD_LETTERS,
            "Commands set aside in the dead-letter stream",
            m.dead_letters.clone(),
        );
        registry.register(
            LOCK_WAIT,
            "Time waiting for etcd locks",
            m.lock_wait.clone(),
        );
        registry.register(
            PULUMI_DURATION,
            "Pulumi runs, by phase and outcome",
            m.pulumi_duration.clone(),
        );
        registry.register(
            POOL_SIZE,
            "Pooled (unclaimed) instances per challenge",
            m.pool_size.clone(),
        );
        registry.register(
            POOL_CLAIMS,
            "Instance creates by challenge and how they were served (pool: a ready pooled instance; deploy: Pulumi ran while the player waited)",
            m.pool_claims.clone(),
        );
        registry.register(
            POOL_TARGET,
            "Pooled instances a challenge's pool aims at (min for a static pool; from the demand for an adaptive one)",
            m.pool_target.clone(),
        );
        registry.register(
            POOL_READY,
            "Pooled instances ready to be claimed",
            m.pool_ready.clone(),
        );
        registry.register(
            POOL_DEPLOYING,
            "Pooled instances being deployed",
            m.pool_deploying.clone(),
        );
        registry.register(
            POOL_CLAIM_RATE,
            "Claim rate an adaptive pool follows (claims per second)",
            m.pool_claim_rate.clone(),
        );
        registry.register(
            POOL_DEPLOY_SECONDS,
            "Deploy time an adaptive pool assumes for its scenario (seconds)",
            m.pool_deploy_seconds.clone(),
        );
        registry.register(
            JANITOR_TICKS,
            "Janitor ticks, by outcome",
            m.janitor_ticks.clone(),
        );
        registry.register(
            JANITOR_EXPIRED,
            "Expired instances the janitor found",
            m.janitor_expired.clone(),
        );
        registry.register(
            JANITOR_LAST_TICK,
            "Unix time of the janitor's last successful tick",
            m.janitor_last_tick.clone(),
        );
        registry.register(
            STATE_BYTES,
            "Bytes of Pulumi stack state written, by store (object: the JetStream object store, etcd: the pointers)",
            m.state_bytes.clone(),
        );
        registry.register(
            ETCD_DB_SIZE,
            "Size of etcd's database (the member this process asks)",
            m.etcd_db_size.clone(),
        );
        registry.register(
            ETCD_DB_QUOTA,
            "etcd's space quota as configured here (--etcd-quota-bytes)",
            m.etcd_db_quota.clone(),
        );
        registry.register(
            ETCD_ALARM,
            "Raised etcd alarms, by kind (NOSPACE: etcd refuses every write)",
            m.etcd_alarm.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One pool's state, as the gauges show it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolState {
    pub target: i64,
    pub ready: i64,
    pub deploying: i64,
    /// Claims per second the pool follows (0 for a static pool).
    pub claim_rate: f64,
    /// Deploy time assumed (0 for a static pool).
    pub deploy_seconds: f64,
}

/// A consumer's lag, as JetStream reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueLag {
    pub pending: i64,
    pub ack_pending: i64,
    pub redelivered: i64,
    pub waiting: i64,
    /// Seconds since the oldest unprocessed command was published.
    pub oldest_age: f64,
}

/// The same metrics as OpenTelemetry instruments, pushed over OTLP when an
/// exporter is configured (see `telemetry`). Recorded through the methods of
/// [`Metrics`], so every measurement reaches both the scrape endpoint and OTLP.
struct Otel {
    commands: opentelemetry::metrics::Counter<u64>,
    command_duration: opentelemetry::metrics::Histogram<f64>,
    command_latency: opentelemetry::metrics::Histogram<f64>,
    lock_wait: opentelemetry::metrics::Histogram<f64>,
    pulumi_duration: opentelemetry::metrics::Histogram<f64>,
    janitor_ticks: opentelemetry::metrics::Counter<u64>,
    pool_claims: opentelemetry::metrics::Counter<u64>,
    janitor_expired: opentelemetry::metrics::Counter<u64>,
    state_bytes: opentelemetry::metrics::Counter<u64>,
    gauge: opentelemetry::metrics::Gauge<f64>,
    gauges: std::collections::HashMap<&'static str, opentelemetry::metrics::Gauge<f64>>,
}

static OTEL: OnceLock<Otel> = OnceLock::new();

const SECONDS_BUCKETS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0,
];

/// Creates the OTLP instruments on `meter` (once per process).
pub fn install_otel(meter: &opentelemetry::metrics::Meter) {
    let histogram = |name: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build()
    };
    let gauges = [
        CHALLENGES,
        INSTANCES,
        QUEUE_PENDING,
        QUEUE_ACK_PENDING,
        QUEUE_REDELIVERED,
        QUEUE_WAITING,
        QUEUE_OLDEST_AGE,
        DEAD_LETTERS,
        POOL_SIZE,
        POOL_TARGET,
        POOL_READY,
        POOL_DEPLOYING,
        POOL_CLAIM_RATE,
        POOL_DEPLOY_SECONDS,
        JANITOR_LAST_TICK,
        ETCD_DB_SIZE,
        ETCD_DB_QUOTA,
        ETCD_ALARM,
    ]
    .into_iter()
    .map(|name| (name, meter.f64_gauge(name).build()))
    .collect();
    let _ = OTEL.set(Otel {
        commands: meter.u64_counter(COMMANDS).build(),
        command_duration: histogram(COMMAND_DURATION),
        command_latency: histogram(COMMAND_LATENCY),
        lock_wait: histogram(LOCK_WAIT),
        pulumi_duration: histogram(PULUMI_DURATION),
        janitor_ticks: meter.u64_counter(JANITOR_TICKS).build(),
        pool_claims: meter.u64_counter(POOL_CLAIMS).build(),
        janitor_expired: meter.u64_counter(JANITOR_EXPIRED).build(),
        state_bytes: meter.u64_counter(STATE_BYTES).with_unit("By").build(),
        gauge: meter.f64_gauge("cm_unused").build(),
        gauges,
    });
}

fn otel_attrs(pairs: &[(&str, &str)]) -> Vec<opentelemetry::KeyValue> {
    pairs
        .iter()
        .map(|(k, v)| opentelemetry::KeyValue::new((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    fn set_gauge(&self, name: &'static str, pairs: &[(&str, &str)], value: f64) {
        if let Some(o) = OTEL.get() {
            o.gauges
                .get(name)
                .unwrap_or(&o.gauge)
                .record(value, &otel_attrs(pairs));
        }
    }

    /// A command settled with `outcome`, its handler having taken `seconds`.
    pub fn command(&self, kind: &str, outcome: &str, seconds: Option<f64>) {
        let pairs = [("kind", kind), ("outcome", outcome)];
        self.commands.get_or_create(&labels(&pairs)).inc();
        if let Some(s) = seconds {
            self.command_duration
                .get_or_create(&labels(&pairs))
                .observe(s);
        }
        if let Some(o) = OTEL.get() {
            o.commands.add(1, &otel_attrs(&pairs));
            if let Some(s) = seconds {
                o.command_duration.record(s, &otel_attrs(&pairs));
            }
        }
    }

    /// `bytes` of stack state written to `store` (`object` or `etcd`).
    pub fn state_written(&self, store: &str, bytes: u64) {
        let pairs = [("store", store)];
        self.state_bytes
            .get_or_create(&labels(&pairs))
            .inc_by(bytes);
        if let Some(o) = OTEL.get() {
            o.state_bytes.add(bytes, &otel_attrs(&pairs));
        }
    }

    /// etcd's database size, the quota it is held against, and its alarms.
    pub fn etcd_space(&self, db_size: i64, quota: i64, alarms: &[&str]) {
        self.etcd_db_size.set(db_size);
        self.etcd_db_quota.set(quota);
        self.set_gauge(ETCD_DB_SIZE, &[], db_size as f64);
        self.set_gauge(ETCD_DB_QUOTA, &[], quota as f64);
        for kind in ["NOSPACE", "CORRUPT"] {
            let raised = i64::from(alarms.contains(&kind));
            self.etcd_alarm
                .get_or_create(&labels(&[("alarm", kind)]))
                .set(raised);
            self.set_gauge(ETCD_ALARM, &[("alarm", kind)], raised as f64);
        }
    }

    /// Publish-to-ack time of a command.
    pub fn latency(&self, kind: &str, seconds: f64) {
        let pairs = [("kind", kind)];
        self.command_latency
            .get_or_create(&labels(&pairs))
            .observe(seconds);
        if let Some(o) = OTEL.get() {
            o.command_latency.record(seconds, &otel_attrs(&pairs));
        }
    }

    /// Time spent waiting for a lock.
    pub fn lock_waited(&self, lock: &str, seconds: f64) {
        let pairs = [("lock", lock)];
        self.lock_wait
            .get_or_create(&labels(&pairs))
            .observe(seconds);
        if let Some(o) = OTEL.get() {
            o.lock_wait.record(seconds, &otel_attrs(&pairs));
        }
    }

    /// A Pulumi phase's duration.
    pub fn pulumi(&self, phase: &str, outcome: &str, seconds: f64) {
        let pairs = [("phase", phase), ("outcome", outcome)];
        self.pulumi_duration
            .get_or_create(&labels(&pairs))
            .observe(seconds);
        if let Some(o) = OTEL.get() {
            o.pulumi_duration.record(seconds, &otel_attrs(&pairs));
        }
    }

    /// The workers' consumer lag and the dead letters.
    pub fn queue(&self, at: &[(&str, &str)], lag: &QueueLag, dead_letters: i64) {
        let l = labels(at);
        self.queue_pending.get_or_create(&l).set(lag.pending);
        self.queue_ack_pending
            .get_or_create(&l)
            .set(lag.ack_pending);
        self.queue_redelivered
            .get_or_create(&l)
            .set(lag.redelivered);
        self.queue_waiting.get_or_create(&l).set(lag.waiting);
        self.queue_oldest_age.get_or_create(&l).set(lag.oldest_age);
        self.dead_letters.set(dead_letters);
        self.set_gauge(QUEUE_PENDING, at, lag.pending as f64);
        self.set_gauge(QUEUE_ACK_PENDING, at, lag.ack_pending as f64);
        self.set_gauge(QUEUE_REDELIVERED, at, lag.redelivered as f64);
        self.set_gauge(QUEUE_WAITING, at, lag.waiting as f64);
        self.set_gauge(QUEUE_OLDEST_AGE, at, lag.oldest_age);
        self.set_gauge(DEAD_LETTERS, &[], dead_letters as f64);
    }

    /// Challenges, instances by state, and pool sizes.
    pub fn inventory(&self, challenges: i64, claimed: i64, pooled: i64, pools: &[(String, i64)]) {
        self.challenges.set(challenges);
        self.instances
            .get_or_create(&labels(&[("state", "claimed")]))
            .set(claimed);
        self.instances
            .get_or_create(&labels(&[("state", "pooled")]))
            .set(pooled);
        self.set_gauge(CHALLENGES, &[], challenges as f64);
        self.set_gauge(INSTANCES, &[("state", "claimed")], claimed as f64);
        self.set_gauge(INSTANCES, &[("state", "pooled")], pooled as f64);
        for (cid, size) in pools {
            self.pool_size
                .get_or_create(&labels(&[("challenge", cid)]))
                .set(*size);
            self.set_gauge(POOL_SIZE, &[("challenge", cid)], *size as f64);
        }
    }

    /// A create on `challenge`, served from the pool (`pool`) or deployed
    /// on demand (`deploy`).
    pub fn pool_claim(&self, challenge: &str, served: &str) {
        let pairs = [("challenge", challenge), ("served", served)];
        self.pool_claims.get_or_create(&labels(&pairs)).inc();
        if let Some(o) = OTEL.get() {
            o.pool_claims.add(1, &otel_attrs(&pairs));
        }
    }

    /// One pool's state: what it aims at, what it holds, and (adaptive) the
    /// estimator's inputs.
    pub fn pool_state(&self, challenge: &str, state: &PoolState) {
        let pairs = [("challenge", challenge)];
        let l = labels(&pairs);
        self.pool_target.get_or_create(&l).set(state.target);
        self.pool_ready.get_or_create(&l).set(state.ready);
        self.pool_deploying.get_or_create(&l).set(state.deploying);
        self.pool_claim_rate.get_or_create(&l).set(state.claim_rate);
        self.pool_deploy_seconds
            .get_or_create(&l)
            .set(state.deploy_seconds);
        self.set_gauge(POOL_TARGET, &pairs, state.target as f64);
        self.set_gauge(POOL_READY, &pairs, state.ready as f64);
        self.set_gauge(POOL_DEPLOYING, &pairs, state.deploying as f64);
        self.set_gauge(POOL_CLAIM_RATE, &pairs, state.claim_rate);
        self.set_gauge(POOL_DEPLOY_SECONDS, &pairs, state.deploy_seconds);
    }

    /// A janitor tick's outcome and what it found.
    pub fn janitor_tick(&self, ok: bool, expired: u64) {
        let pairs = [("outcome", if ok { "ok" } else { "error" })];
        self.janitor_ticks.get_or_create(&labels(&pairs)).inc();
        if let Some(o) = OTEL.get() {
            o.janitor_ticks.add(1, &otel_attrs(&pairs));
        }
        if ok {
            self.janitor_expired.inc_by(expired);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.janitor_last_tick.set(now);
            if let Some(o) = OTEL.get() {
                o.janitor_expired.add(expired, &[]);
            }
            self.set_gauge(JANITOR_LAST_TICK, &[], now);
        }
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// An axum router serving `/metrics`.
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics().render(),
            )
        }),
    )
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on /metrics");
    axum::serve(listener, router::<()>()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names() {
        let m = metrics();
        m.commands
            .get_or_create(&labels(&[
                ("kind", "instance.create"),
                ("outcome", "success"),
            ]))
            .inc();
        m.command_latency
            .get_or_create(&labels(&[("kind", "instance.create")]))
            .observe(0.2);
        m.janitor_ticks
            .get_or_create(&labels(&[("outcome", "ok")]))
            .inc();
        m.queue_oldest_age
            .get_or_create(&labels(&[
                ("stream", "CM_COMMANDS"),
                ("consumer", "cm-workers"),
            ]))
            .set(12.5);
        let text = m.render();
        for name in [
            "cm_commands_total{kind=\"instance.create\",outcome=\"success\"} 1",
            "cm_command_latency_seconds_bucket{le=\"30.0\",kind=\"instance.create\"} 1",
            "cm_janitor_ticks_total{outcome=\"ok\"} 1",
            "# TYPE challenges gauge",
            "cm_queue_oldest_pending_age_seconds{stream=\"CM_COMMANDS\",consumer=\"cm-workers\"} 12.5",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}

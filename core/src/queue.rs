//! The queue contract shared by every process: JetStream streams and the
//! workers' consumer, subjects, headers, and W3C trace context carried in NATS
//! message headers.
//!
//! # Streams
//! - `CM_COMMANDS` (`cm.cmd.>`): work-queue retention, file storage, a
//!   duplicate window (the command id is the `Nats-Msg-Id`).
//! - `CM_EVENTS` (`cm.evt.>`): results and lifecycle events, limits retention
//!   (kept for replay).
//! - `CM_DEAD_LETTERS` (`cm.dlq.>`): commands that could not be processed,
//!   with the reason in a header; never dropped. A dead letter keeps the
//!   command's payload and headers and records where it came from (original
//!   subject, `Nats-Msg-Id` and sequence), so an operator can replay it onto
//!   the command stream as it was (`cmctl dlq replay`).
//!
//! Subjects are `cm.<cmd|evt|dlq>.<kind>.<encoded challenge id>`, where a kind
//! has two tokens (`instance.create`).

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
        stream::{DiscardPolicy, RetentionPolicy, StorageType},
    },
};
use cm_schemas::v1::command::Request;
use opentelemetry::propagation::{Extractor, Injector};

use crate::ids;

pub const COMMANDS_STREAM: &str = "CM_COMMANDS";
pub const EVENTS_STREAM: &str = "CM_EVENTS";
pub const DEAD_LETTERS_STREAM: &str = "CM_DEAD_LETTERS";
pub const WORKERS_CONSUMER: &str = "cm-workers";

/// Where the API waits for a command's result (a core NATS inbox).
pub const HDR_REPLY: &str = "cm-reply";
/// The command id on result events and dead letters.
pub const HDR_COMMAND_ID: &str = "cm-command-id";
/// Why a command was dead-lettered.
pub const HDR_FAILURE_REASON: &str = "cm-failure-reason";
/// How many times it was delivered before being dead-lettered.
pub const HDR_DELIVERIES: &str = "cm-deliveries";
/// A dead letter's subject on the command stream, where a replay publishes it.
pub const HDR_ORIGINAL_SUBJECT: &str = "cm-original-subject";
/// A dead letter's `Nats-Msg-Id` on the command stream, which a replay restores.
pub const HDR_ORIGINAL_MSG_ID: &str = "cm-original-msg-id";
/// A dead letter's sequence in the command stream.
pub const HDR_ORIGINAL_SEQUENCE: &str = "cm-original-sequence";
/// JetStream de-duplication header.
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";

/// Command kinds, as they appear in subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    ChallengeCreate,
    ChallengeUpdate,
    ChallengeDelete,
    InstanceCreate,
    InstanceRenew,
    InstanceDelete,
    InstanceExpire,
    InstanceReset,
    InstanceUpdate,
    PoolRefill,
}

impl CommandKind {
    /// Every kind.
    pub const ALL: [CommandKind; 10] = [
        Self::ChallengeCreate,
        Self::ChallengeUpdate,
        Self::ChallengeDelete,
        Self::InstanceCreate,
        Self::InstanceRenew,
        Self::InstanceDelete,
        Self::InstanceExpire,
        Self::InstanceReset,
        Self::InstanceUpdate,
        Self::PoolRefill,
    ];

    /// The kind as a subject fragment (`instance.create`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChallengeCreate => "challenge.create",
            Self::ChallengeUpdate => "challenge.update",
            Self::ChallengeDelete => "challenge.delete",
            Self::InstanceCreate => "instance.create",
            Self::InstanceRenew => "instance.renew",
            Self::InstanceDelete => "instance.delete",
            Self::InstanceExpire => "instance.expire",
            Self::InstanceReset => "instance.reset",
            Self::InstanceUpdate => "instance.update",
            Self::PoolRefill => "pool.refill",
        }
    }

    /// The kind of a command's request, with the challenge it is about.
    pub fn of(request: &Request) -> (Self, &str) {
        match request {
            Request::ChallengeCreate(r) => (Self::ChallengeCreate, &r.id),
            Request::ChallengeUpdate(r) => (Self::ChallengeUpdate, &r.id),
            Request::ChallengeDelete(r) => (Self::ChallengeDelete, &r.id),
            Request::InstanceCreate(r) => (Self::InstanceCreate, &r.challenge_id),
            Request::InstanceRenew(r) => (Self::InstanceRenew, &r.challenge_id),
            Request::InstanceDelete(r) => (Self::InstanceDelete, &r.challenge_id),
            Request::InstanceExpire(r) => (Self::InstanceExpire, &r.challenge_id),
            Request::InstanceReset(r) => (Self::InstanceReset, &r.challenge_id),
            Request::InstanceUpdate(r) => (Self::InstanceUpdate, &r.challenge_id),
            Request::PoolRefill(r) => (Self::PoolRefill, &r.challenge_id),
        }
    }
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `cm.cmd.<kind>.<challenge>`.
pub fn command_subject(kind: CommandKind, challenge_id: &str) -> String {
    format!("cm.cmd.{}.{}", kind.as_str(), ids::encode(challenge_id))
}

/// `cm.evt.<event>.<challenge>`; `event` is two tokens (`instance.created`).
pub fn event_subject(event: &str, challenge_id: &str) -> String {
    format!("cm.evt.{event}.{}", ids::encode(challenge_id))
}

/// `cm.dlq.<kind>.<challenge>`; `kind` is `unknown.unknown` for undecodable commands.
pub fn dead_letter_subject(kind: &str, challenge_id: &str) -> String {
    format!("cm.dlq.{kind}.{}", ids::encode(challenge_id))
}

/// Tunables of the streams and the consumer.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// JetStream de-duplication window for command ids.
    pub duplicate_window: Duration,
    /// How long a worker may hold a command without an ack or progress.
    pub ack_wait: Duration,
    /// Deliveries before a command is dead-lettered.
    pub max_deliver: i64,
    /// Redelivery delays (the last one repeats).
    pub backoff: Vec<Duration>,
    /// Commands in flight across all workers (cluster-wide concurrency cap).
    pub max_ack_pending: i64,
    /// How long events are kept.
    pub events_max_age: Duration,
    /// Stream replicas (1 on a single server).
    pub replicas: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(15),
                Duration::from_secs(30),
            ],
            max_ack_pending: 256,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

/// Creates the streams when missing (idempotent; every process may call it).
pub async fn ensure_streams(
    js: &jetstream::Context,
    cfg: &QueueConfig,
) -> Result<(), async_nats::Error> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: COMMANDS_STREAM.into(),
        subjects: vec!["cm.cmd.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: cfg.duplicate_window,
        num_replicas: cfg.replicas,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    js.get_or_create_stream(jetstream::stream::Config {
        name: EVENTS_STREAM.into(),
        subjects: vec!["cm.evt.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: cfg.events_max_age,
        num_replicas: cfg.replicas,
        ..Default::default()
    })
    .await?;
    js.get_or_create_stream(jetstream::stream::Config {
        name: DEAD_LETTERS_STREAM.into(),
        subjects: vec!["cm.dlq.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        ..Default::default()
    })
    .await?;
    crate::scenario_store::ensure_bucket(js, cfg.replicas).await?;
    Ok(())
}

/// The configuration of the workers' consumer for `cfg`.
///
/// `max_deliver` is not JetStream's bound: a command whose last delivery is
/// lost (worker killed, ack wait expired) would stay in the stream for ever,
/// unanswered. JetStream redelivers without bound and the worker stops at
/// `cfg.max_deliver` itself, dead-lettering the command with its reason.
pub fn workers_consumer_config(cfg: &QueueConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(WORKERS_CONSUMER.into()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: cfg.ack_wait,
        max_deliver: -1,
        max_ack_pending: cfg.max_ack_pending,
        filter_subject: "cm.cmd.>".into(),
        ..Default::default()
    }
}

/// The durable pull consumer every worker shares (created when missing).
pub async fn workers_consumer(
    js: &jetstream::Context,
    cfg: &QueueConfig,
) -> Result<PullConsumer, async_nats::Error> {
    let stream = js.get_stream(COMMANDS_STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(WORKERS_CONSUMER, workers_consumer_config(cfg))
        .await?;
    Ok(consumer)
}

/// The same, its configuration brought to `cfg` when it differs (a worker
/// started with new flags: ack wait, concurrency cap, delivery bound). The
/// workers call this at start; readers (exporter, cmctl) do not.
pub async fn reconcile_workers_consumer(
    js: &jetstream::Context,
    cfg: &QueueConfig,
) -> Result<PullConsumer, async_nats::Error> {
    let stream = js.get_stream(COMMANDS_STREAM).await?;
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(WORKERS_CONSUMER, workers_consumer_config(cfg))
        .await?;
    let want = workers_consumer_config(cfg);
    let have = &consumer.cached_info().config;
    if have.ack_wait != want.ack_wait
        || have.max_deliver != want.max_deliver
        || have.max_ack_pending != want.max_ack_pending
        || have.filter_subject != want.filter_subject
    {
        tracing::info!(
            ack_wait = ?want.ack_wait,
            max_ack_pending = want.max_ack_pending,
            "updating the workers' consumer to this worker's configuration"
        );
        // Create-or-update: the server changes an existing durable in place.
        // A server that refuses leaves the consumer as it was: consume with it.
        match stream.create_consumer(want).await {
            Ok(updated) => consumer = updated,
            Err(e) => tracing::warn!(
                error = %e,
                "the workers' consumer could not be updated; consuming with its current configuration"
            ),
        }
    }
    Ok(consumer)
}

/// The redelivery delay after `delivered` deliveries.
pub fn backoff_delay(cfg: &QueueConfig, delivered: i64) -> Duration {
    let i = usize::try_from(delivered.saturating_sub(1)).unwrap_or(0);
    cfg.backoff
        .get(i)
        .or(cfg.backoff.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

// ---- trace context in headers -----------------------------------------------

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's W3C trace context (`traceparent`, `tracestate`)
/// into `headers`.
pub fn inject_trace_context(headers: &mut HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Reads a W3C trace context from `headers` (empty context when absent).
pub fn extract_trace_context(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) => {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)))
        }
        None => opentelemetry::Context::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_encoded_ids() {
        assert_eq!(
            command_subject(CommandKind::InstanceCreate, "web.1 *"),
            "cm.cmd.instance.create.web~2E1~20~2A"
        );
        assert_eq!(
            event_subject("instance.created", "a"),
            "cm.evt.instance.created.a"
        );
    }

    #[test]
    fn backoff_repeats_its_last_delay() {
        let cfg = QueueConfig::default();
        assert_eq!(backoff_delay(&cfg, 1), Duration::from_secs(1));
        assert_eq!(backoff_delay(&cfg, 4), Duration::from_secs(30));
        assert_eq!(backoff_delay(&cfg, 40), Duration::from_secs(30));
    }
}

//! Stream and consumer definitions: `CM_COMMANDS`, `CM_EVENTS`,
//! `CM_DEAD_LETTERS`, the workers' durable pull consumer and its redelivery
//! backoff.
//!
//! # Streams
//! - `CM_COMMANDS` (`cm.cmd.>`): work-queue retention, file storage, a
//!   duplicate window (the command id is the `Nats-Msg-Id`).
//! - `CM_EVENTS` (`cm.evt.>`): results and lifecycle events, limits retention
//!   (kept for replay).
//! - `CM_DEAD_LETTERS` (`cm.dlq.>`): commands that could not be processed,
//!   with the reason in a header; never dropped (see [`super::dead_letter`]).
//!
//! Owns: stream names, their subjects filters, retention and the consumer's
//! configuration. Must not know: what a command, an event or a dead letter
//! holds (the sibling modules own those).

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    stream::{DiscardPolicy, RetentionPolicy, StorageType},
};

pub const COMMANDS_STREAM: &str = "CM_COMMANDS";
pub const EVENTS_STREAM: &str = "CM_EVENTS";
pub const DEAD_LETTERS_STREAM: &str = "CM_DEAD_LETTERS";
pub const WORKERS_CONSUMER: &str = "cm-workers";

/// Every command subject (`cm.cmd.<kind>.<challenge>`).
pub const COMMANDS_SUBJECTS: &str = "cm.cmd.>";
/// Every event subject.
pub const EVENTS_SUBJECTS: &str = "cm.evt.>";
/// Every dead-letter subject.
pub const DEAD_LETTERS_SUBJECTS: &str = "cm.dlq.>";

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

/// The three streams' configurations for `cfg`: commands (work queue,
/// de-duplicated, new messages refused when full), events (kept
/// `events_max_age`), dead letters (kept).
pub fn stream_configs(cfg: &QueueConfig) -> [jetstream::stream::Config; 3] {
    let stream = |name: &str, subjects: &str, retention| jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        retention,
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        ..Default::default()
    };
    [
        jetstream::stream::Config {
            duplicate_window: cfg.duplicate_window,
            discard: DiscardPolicy::New,
            ..stream(
                COMMANDS_STREAM,
                COMMANDS_SUBJECTS,
                RetentionPolicy::WorkQueue,
            )
        },
        jetstream::stream::Config {
            max_age: cfg.events_max_age,
            ..stream(EVENTS_STREAM, EVENTS_SUBJECTS, RetentionPolicy::Limits)
        },
        stream(
            DEAD_LETTERS_STREAM,
            DEAD_LETTERS_SUBJECTS,
            RetentionPolicy::Limits,
        ),
    ]
}

/// Creates the streams when missing (idempotent; every process may call it).
///
/// A JetStream request can time out while a cluster elects its leaders
/// (a fresh or restarting cluster) or a server is loaded: each failure is
/// asked again after 2, 4, 8, 16 and 32 s before it is returned.
pub async fn ensure_streams(
    js: &jetstream::Context,
    cfg: &QueueConfig,
) -> Result<(), async_nats::Error> {
    let mut attempt = 0;
    loop {
        match ensure_streams_once(js, cfg).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "JetStream not ready; asking again");
                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn ensure_streams_once(
    js: &jetstream::Context,
    cfg: &QueueConfig,
) -> Result<(), async_nats::Error> {
    for config in stream_configs(cfg) {
        js.get_or_create_stream(config).await?;
    }
    crate::scenario_store::ensure_bucket(js, cfg.replicas).await?;
    crate::stack_store::ensure_bucket(js, cfg.replicas).await?;
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
        filter_subject: COMMANDS_SUBJECTS.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_repeats_its_last_delay() {
        let cfg = QueueConfig::default();
        assert_eq!(backoff_delay(&cfg, 1), Duration::from_secs(1));
        assert_eq!(backoff_delay(&cfg, 4), Duration::from_secs(30));
        assert_eq!(backoff_delay(&cfg, 40), Duration::from_secs(30));
    }

    #[test]
    fn each_stream_keeps_what_it_must() {
        let cfg = QueueConfig::default();
        let [commands, events, dead] = stream_configs(&cfg);
        assert_eq!(
            (commands.name.as_str(), commands.subjects.clone()),
            ("CM_COMMANDS", vec!["cm.cmd.>".to_owned()])
        );
        assert_eq!(commands.retention, RetentionPolicy::WorkQueue);
        assert_eq!(commands.discard, DiscardPolicy::New);
        assert_eq!(commands.duplicate_window, cfg.duplicate_window);
        assert_eq!(events.subjects, vec!["cm.evt.>".to_owned()]);
        assert_eq!(events.max_age, cfg.events_max_age);
        assert_eq!(dead.name, "CM_DEAD_LETTERS");
        assert_eq!(dead.retention, RetentionPolicy::Limits);
        assert_eq!(
            dead.max_age,
            Duration::ZERO,
            "dead letters are never dropped"
        );
        for s in [&commands, &events, &dead] {
            assert_eq!(s.storage, StorageType::File);
        }
    }

    #[test]
    fn the_consumer_redelivers_without_bound_on_every_command() {
        let c = workers_consumer_config(&QueueConfig::default());
        assert_eq!(c.durable_name.as_deref(), Some("cm-workers"));
        assert_eq!(c.filter_subject, "cm.cmd.>");
        assert_eq!(c.max_deliver, -1);
    }
}

//! The queue-lag and inventory gauges, read every few seconds from
//! JetStream's consumer and stream state and from etcd (count-only reads):
//! pending, ack-pending, redelivered, waiting pull requests, the age of the
//! oldest unprocessed command, dead letters; challenges, instances (claimed,
//! pooled) and pool sizes; etcd's database size against its quota and its
//! alarms (NOSPACE stops every write). Every worker exports them; so does
//! `cm-worker queue-exporter` for deployments that want them apart.

use std::time::Duration;

use async_nats::jetstream;
use cm_core::{
    metrics::{QueueLag, metrics},
    protocol::{COMMANDS_STREAM, DEAD_LETTERS_STREAM, WORKERS_CONSUMER},
    store::Store,
};
use tokio_util::sync::CancellationToken;

/// Refreshes the gauges every `every` until `stop`.
pub async fn run(
    js: jetstream::Context,
    store: Store,
    tuning: cm_core::pool_demand::Tuning,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = observe_queue(&js).await {
            tracing::debug!(error = %e, "queue state not read");
        }
        if let Err(e) = observe_inventory(&store).await {
            tracing::debug!(error = %e, "inventory not read");
        }
        if let Err(e) = observe_pools(&store, &tuning).await {
            tracing::debug!(error = %e, "pools not read");
        }
    }
}

/// Reads the consumer and streams once.
pub async fn observe_queue(js: &jetstream::Context) -> Result<(), async_nats::Error> {
    let mut stream = js.get_stream(COMMANDS_STREAM).await?;
    let state = stream.info().await?.state.clone();
    let oldest = if state.messages > 0 {
        (time::OffsetDateTime::now_utc() - state.first_timestamp)
            .as_seconds_f64()
            .max(0.0)
    } else {
        0.0
    };
    let mut consumer = stream
        .get_consumer::<jetstream::consumer::pull::Config>(WORKERS_CONSUMER)
        .await?;
    let info = consumer.info().await?.clone();
    let mut dlq = js.get_stream(DEAD_LETTERS_STREAM).await?;
    let dead_letters = dlq.info().await?.state.messages as i64;
    let lag = QueueLag {
        pending: info.num_pending as i64,
        ack_pending: info.num_ack_pending as i64,
        redelivered: info.num_redelivered as i64,
        waiting: info.num_waiting as i64,
        oldest_age: oldest,
    };
    metrics().queue(
        &[("stream", COMMANDS_STREAM), ("consumer", WORKERS_CONSUMER)],
        &lag,
        dead_letters,
    );
    Ok(())
}

async fn observe_inventory(store: &Store) -> Result<(), cm_core::store::StoreError> {
    let (challenges, claimed, pooled, pools) = store.inventory().await?;
    metrics().inventory(challenges, claimed, pooled, &pools);
    let space = store.space().await?;
    metrics().etcd_space(space.db_size, space.quota, &space.alarms);
    Ok(())
}

/// Each pool's target, ready and deploying instances, and an adaptive
/// pool's estimator inputs.
async fn observe_pools(
    store: &Store,
    tuning: &cm_core::pool_demand::Tuning,
) -> Result<(), cm_core::store::StoreError> {
    use cm_core::{
        model::InstanceStatus,
        pool_demand::{Plan, PoolMode, Want, unix_now},
    };
    for c in store.list_challenges().await? {
        if c.min == 0 && c.max == 0 && c.pool == PoolMode::Static {
            continue;
        }
        // The pool's records (few) and a count of the claimed ones.
        let pooled = store.list_pooled(&c.id).await?;
        let ready = pooled
            .iter()
            .filter(|r| r.value.status == InstanceStatus::Ready)
            .count() as i64;
        let claimed = store.count_claimed(&c.id).await?;
        let (want, claim_rate, deploy_seconds) = match c.pool {
            PoolMode::Static => (Want::NONE, 0.0, 0.0),
            PoolMode::Adaptive => {
                let demand = store.get_demand(&c.id).await?;
                let now = unix_now();
                (
                    demand.want(now, tuning),
                    demand.rate_at(now, tuning),
                    demand.deploy_time(tuning),
                )
            }
        };
        let plan = Plan::of(c.pool, c.min, c.max, claimed, want);
        metrics().pool_state(
            &c.id,
            &cm_core::metrics::PoolState {
                target: plan.target,
                ready,
                deploying: pooled.len() as i64 - ready,
                claim_rate,
                deploy_seconds,
            },
        );
    }
    Ok(())
}

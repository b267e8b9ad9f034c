//! The janitor's tick as the store grows: `Janitor::tick` (read the expiry
//! index, publish one `instance.expire` per expired instance and wait for
//! the acks) with 10 expired instances among 1k, 10k and 100k stored ones.
//! Flat means the tick reads only what has expired: each size's p50 stays
//! within 2x of the smallest size's.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use cm_core::{
    Identity,
    model::{InstanceRecord, InstanceStatus, to_timestamp},
    queue::QueueConfig,
    store::{Expect, Store, StoreOptions},
};
use futures::{StreamExt, TryStreamExt};

use super::Ctx;
use crate::{
    report::{Row, Stat},
    stats::ms,
};

pub const MAX_TICK_MS: f64 = 50.0;
/// "Flat": p50 at a size at most this many times the smallest size's.
pub const MAX_GROWTH: f64 = 2.0;
const EXPIRED: usize = 10;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let nats = cm_testkit::server::nats();
    let etcd = cm_testkit::server::etcd();
    let store = Store::connect(
        std::slice::from_ref(&etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .context("connecting to etcd")?;
    let client = async_nats::connect(nats.url.as_str())
        .await
        .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    cm_core::queue::ensure_streams(&js, &QueueConfig::default())
        .await
        .map_err(|e| anyhow::anyhow!("creating the streams: {e}"))?;
    let janitor = cm_janitor::Janitor::new(store.clone(), js, 1000);

    let mut sizes = ctx.params.janitor_sizes.clone();
    sizes.sort_unstable();
    let mut seeded = 0;
    let mut smallest: Option<f64> = None;
    for total in sizes {
        let started = Instant::now();
        seed(&store, seeded, total).await?;
        tracing::info!(total, seconds = started.elapsed().as_secs_f64(), "seeded");
        seeded = seeded.max(total);
        let mut samples = Vec::new();
        for _ in 0..ctx.params.ticks.max(1) {
            let started = Instant::now();
            let report = janitor.tick().await.context("janitor tick")?;
            samples.push(ms(started.elapsed()));
            if report.expired != EXPIRED {
                bail!(
                    "the tick found {} expired instances, expected {EXPIRED}",
                    report.expired
                );
            }
        }
        let row = Row::latency(
            &format!("janitor.tick.{total}"),
            &format!("janitor tick, {total} stored ({EXPIRED} expired)"),
            &samples,
        )
        .at_most(Stat::P99, MAX_TICK_MS);
        let base = *smallest.get_or_insert(row.p50);
        let ratio = row.p50 / base;
        ctx.report.push(
            row.ratio(ratio, "smallest store p50")
                .at_most(Stat::Ratio, MAX_GROWTH),
        );
    }
    Ok(())
}

/// Stores instances `from..to`, the first [`EXPIRED`] of all already expired.
async fn seed(store: &Store, from: usize, to: usize) -> anyhow::Result<()> {
    let now = SystemTime::now();
    futures::stream::iter(from..to)
        .map(|n| {
            let until = if n < EXPIRED {
                now - Duration::from_secs(60)
            } else {
                now + Duration::from_secs(86_400)
            };
            let rec = InstanceRecord {
                challenge_id: format!("bench-{}", n % 100),
                identity: Identity::random(),
                source_id: Some(format!("team-{n}")),
                status: InstanceStatus::Ready,
                since: to_timestamp(now),
                last_renew: to_timestamp(now),
                until: Some(to_timestamp(until)),
                connection_info: "nc host 1".into(),
                flags: vec![],
                additional: Default::default(),
                command_id: "seed".into(),
                deployed_from: None,
            };
            async move { store.put_instance(&rec, None, Expect::Any, None).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .context("seeding instances")?;
    Ok(())
}

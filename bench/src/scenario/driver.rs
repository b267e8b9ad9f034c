//! The worker's Pulumi driver alone (in this process, no queue): first
//! deploy of a scenario (compile + up, fresh cache), a new stack, an update
//! in place and a destroy, each compared with the raw `pulumi up` floor.

use std::{collections::BTreeMap, time::Instant};

use anyhow::Context;
use cm_core::Identity;

use super::Ctx;
use crate::{report::Row, stats::ms};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let raw = ctx.raw_floor_ms().await?;
    let example = ctx.env.scenarios_dir.join(super::EXAMPLE);
    let none = BTreeMap::new();

    // First deploy: a fresh scenario cache each time (Go's build cache warm).
    let mut first = Vec::new();
    let compiles = if ctx.params.quick {
        1
    } else {
        ctx.params.iterations.clamp(1, 3)
    };
    for _ in 0..compiles {
        let cache = tempfile::tempdir().context("creating a cache")?;
        let driver = ctx.driver(cache.path().to_owned())?;
        let started = Instant::now();
        let scenario = driver.prepare(&example).await?;
        driver
            .up(&scenario, &Identity::random(), &none, None)
            .await?;
        first.push(ms(started.elapsed()));
    }

    let scenario = ctx.compiled().await?;
    let driver = ctx.driver(ctx.env.cache_dir.clone())?;
    driver
        .up(&scenario, &Identity::random(), &none, None)
        .await
        .context("warm-up")?;
    let changed = BTreeMap::from([("connection_prefix".to_owned(), "ssh://".to_owned())]);
    let (mut create, mut update, mut destroy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ctx.params.iterations {
        let identity = Identity::random();
        let started = Instant::now();
        let deployed = driver.up(&scenario, &identity, &none, None).await?;
        create.push(ms(started.elapsed()));

        let started = Instant::now();
        let updated = driver
            .up(&scenario, &identity, &changed, Some(&deployed.state))
            .await?;
        update.push(ms(started.elapsed()));

        let started = Instant::now();
        driver.destroy(&scenario, &updated.state).await?;
        destroy.push(ms(started.elapsed()));
    }
    for (id, name, samples) in [
        (
            "driver.first_deploy",
            "driver: first deploy (compile + up)",
            first,
        ),
        ("driver.up_new", "driver: new stack (up)", create),
        ("driver.up_update", "driver: update in place (up)", update),
        ("driver.destroy", "driver: destroy", destroy),
    ] {
        let row = Row::latency(id, name, &samples);
        let ratio = row.p50 / raw;
        ctx.report.push(row.ratio(ratio, "raw pulumi up p50"));
    }
    Ok(())
}

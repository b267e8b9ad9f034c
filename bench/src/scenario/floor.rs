//! Raw floors on this machine, what nothing of ours can beat: a `pulumi up`
//! of the prebuilt example alone (Pulumi's default settings, a stack laid
//! out beforehand, only `up` timed), one etcd round trip (linearizable get,
//! put) and one JetStream publish round trip (publish + ack, file storage).

use std::{path::Path, time::Instant};

use anyhow::{Context, bail};
use cm_core::Identity;

use super::Ctx;
use crate::{report::Row, stack::PASSPHRASE, stats::ms};

pub const PULUMI_UP: &str = "floor.pulumi_up";

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    pulumi_up(ctx).await?;
    etcd_and_jetstream(ctx).await
}

/// `pulumi up` of a fresh stack of the prebuilt example, `iterations` times
/// after one untimed warm-up.
pub async fn pulumi_up(ctx: &mut Ctx) -> anyhow::Result<()> {
    let scenario = ctx.compiled().await?;
    let home = ctx.env.cache_dir.join("raw-pulumi-home");
    raw_up(&ctx.env.pulumi, &scenario.binary, &home, "identity", None).await?;
    let mut samples = Vec::new();
    for _ in 0..ctx.params.iterations {
        samples.push(raw_up(&ctx.env.pulumi, &scenario.binary, &home, "identity", None).await?);
    }
    ctx.report.push(Row::latency(
        PULUMI_UP,
        "floor: raw `pulumi up` (prebuilt, new stack)",
        &samples,
    ));
    Ok(())
}

/// One raw `pulumi up` of a new stack of `project`: the workspace laid out
/// the way `pulumi stack init` + `config set` leave it (untimed; `additional`
/// is the JSON of the scenario's `additional` object), then `up` (timed).
pub async fn raw_up(
    pulumi: &Path,
    binary: &Path,
    home: &Path,
    project: &str,
    additional: Option<&str>,
) -> anyhow::Result<f64> {
    let ws = tempfile::tempdir().context("creating a workspace")?;
    let root = ws.path();
    std::fs::write(
        root.join("Pulumi.yaml"),
        format!("name: {project}\nruntime:\n  name: go\n  options:\n    binary: ./main\n"),
    )
    .context("writing Pulumi.yaml")?;
    std::os::unix::fs::symlink(binary, root.join("main")).context("linking the program")?;
    let identity = Identity::random();
    let path = std::env::join_paths(pulumi.parent().map(Path::to_path_buf).into_iter().chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .context("building PATH")?;
    let pulumi_cmd = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(pulumi);
        cmd.args(args)
            .args(["--non-interactive", "--stack", identity.as_str()])
            .current_dir(root)
            .env("PATH", &path)
            .env("PULUMI_BACKEND_URL", format!("file://{}", root.display()))
            .env("PULUMI_CONFIG_PASSPHRASE", PASSPHRASE)
            .env("PULUMI_SKIP_UPDATE_CHECK", "true")
            .env("PULUMI_HOME", home)
            .env("CM_PULUMI_GO_BINARY", "./main")
            .kill_on_drop(true);
        cmd
    };
    let init = pulumi_cmd(&["stack", "init"]).output().await;
    check("pulumi stack init", init)?;
    let set = pulumi_cmd(&["config", "set", "identity", identity.as_str()])
        .output()
        .await;
    check("pulumi config set", set)?;
    if let Some(additional) = additional {
        let set = pulumi_cmd(&["config", "set", "additional", additional])
            .output()
            .await;
        check("pulumi config set additional", set)?;
    }
    let started = Instant::now();
    let up = pulumi_cmd(&["up", "--yes", "--skip-preview"])
        .output()
        .await;
    let elapsed = started.elapsed();
    check("pulumi up", up)?;
    Ok(ms(elapsed))
}

fn check(what: &str, out: std::io::Result<std::process::Output>) -> anyhow::Result<()> {
    let out = out.with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn etcd_and_jetstream(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n = ctx.params.fast_iterations;
    let etcd = cm_testkit::server::etcd();
    let nats = cm_testkit::server::nats();

    let mut kv = etcd_client::Client::connect([etcd.url.as_str()], None)
        .await
        .context("connecting to etcd")?;
    let value = vec![b'x'; 256];
    kv.put("/bench/key", value.clone(), None)
        .await
        .context("etcd put")?;
    let (mut gets, mut puts) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let started = Instant::now();
        kv.get("/bench/key", None).await.context("etcd get")?;
        gets.push(ms(started.elapsed()));
        let started = Instant::now();
        kv.put("/bench/key", value.clone(), None)
            .await
            .context("etcd put")?;
        puts.push(ms(started.elapsed()));
    }
    ctx.report.push(Row::latency(
        "floor.etcd_get",
        "floor: etcd round trip (linearizable get)",
        &gets,
    ));
    ctx.report.push(Row::latency(
        "floor.etcd_put",
        "floor: etcd round trip (put, 256 B)",
        &puts,
    ));

    let client = async_nats::connect(nats.url.as_str())
        .await
        .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "CM_BENCH".into(),
        subjects: vec!["cmbench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the bench stream")?;
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let mut publishes = Vec::with_capacity(n);
    for _ in 0..=n {
        let started = Instant::now();
        js.publish("cmbench.rtt", payload.clone())
            .await
            .context("JetStream publish")?
            .await
            .context("JetStream ack")?;
        publishes.push(ms(started.elapsed()));
    }
    // The first publish also warmed the connection up.
    publishes.remove(0);
    ctx.report.push(Row::latency(
        "floor.jetstream_publish",
        "floor: JetStream publish + ack (file, 256 B)",
        &publishes,
    ));
    Ok(())
}

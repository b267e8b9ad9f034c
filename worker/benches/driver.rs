//! Bench of the Pulumi driver against a raw `pulumi up` of the same program.
//!
//! `cargo bench -p cm-worker --bench driver` (iterations: `CM_BENCH_ITERS`,
//! default 7). Prints one table: first deploy including compilation (fresh
//! scenario cache, Go's own build cache warm), later deploys of new stacks
//! with the prebuilt binary, in-place updates, destroys, and the raw floor:
//! `pulumi up --yes --skip-preview` of the same prebuilt program in a stack
//! prepared by hand, with Pulumi's default settings.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use cm_core::{Identity, Secret};
use cm_worker::pulumi::{Driver, DriverConfig};

const PASSPHRASE: &str = "bench-passphrase";

fn driver(cache: &Path) -> Driver {
    Driver::new(DriverConfig {
        pulumi: cm_testkit::pulumi(),
        go: cm_testkit::go(),
        cache_dir: cache.to_owned(),
        passphrase: Secret::new(PASSPHRASE.to_owned()),
    })
    .expect("driver")
}

struct Row {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Row {
    fn median(&self) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        s[s.len() / 2]
    }
    fn min(&self) -> Duration {
        self.samples.iter().min().copied().unwrap_or_default()
    }
    fn max(&self) -> Duration {
        self.samples.iter().max().copied().unwrap_or_default()
    }
}

/// One raw `pulumi up` of a fresh stack: workspace laid out by hand (what
/// `pulumi stack init` + `config set` leave), then only `up` is timed.
fn raw_pulumi_up(pulumi: &Path, binary: &Path, identity: &Identity) -> Duration {
    let ws = tempfile::tempdir().expect("tempdir");
    let root = ws.path();
    std::fs::write(
        root.join("Pulumi.yaml"),
        "name: identity\nruntime:\n  name: go\n  options:\n    binary: ./main\n",
    )
    .expect("project");
    std::os::unix::fs::symlink(binary, root.join("main")).expect("link");
    let env = |cmd: &mut Command| {
        cmd.current_dir(root)
            .env("PULUMI_BACKEND_URL", format!("file://{}", root.display()))
            .env("PULUMI_CONFIG_PASSPHRASE", PASSPHRASE)
            .env("PULUMI_SKIP_UPDATE_CHECK", "true")
            .env("PULUMI_HOME", root.join(".pulumi-home"))
            .env("CM_PULUMI_GO_BINARY", "./main");
    };
    for args in [
        vec!["stack", "init", identity.as_str(), "--non-interactive"],
        vec![
            "config",
            "set",
            "identity",
            identity.as_str(),
            "--stack",
            identity.as_str(),
        ],
    ] {
        let mut cmd = Command::new(pulumi);
        cmd.args(&args);
        env(&mut cmd);
        let out = cmd.output().expect("pulumi");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut cmd = Command::new(pulumi);
    cmd.args([
        "up",
        "--yes",
        "--skip-preview",
        "--non-interactive",
        "--stack",
        identity.as_str(),
    ]);
    env(&mut cmd);
    let started = Instant::now();
    let out = cmd.output().expect("pulumi up");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    elapsed
}

#[tokio::main]
async fn main() {
    let iters: usize = std::env::var("CM_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let example = cm_testkit::example("identity");
    let none = BTreeMap::new();
    let mut rows = Vec::new();

    // First deploy: a fresh scenario cache every time (compile + up).
    let mut first = Row {
        name: "first deploy (compile + up)",
        samples: vec![],
    };
    for _ in 0..iters.min(3) {
        let cache = tempfile::tempdir().expect("tempdir");
        let d = driver(cache.path());
        let started = Instant::now();
        let scenario = d.prepare(&example).await.expect("prepare");
        d.up(&scenario, &Identity::random(), &none, None)
            .await
            .expect("up");
        first.samples.push(started.elapsed());
    }

    let cache = tempfile::tempdir().expect("tempdir");
    let d = driver(cache.path());
    let scenario = d.prepare(&example).await.expect("prepare");
    // Warm the passphrase key cache and the OS page cache once.
    d.up(&scenario, &Identity::random(), &none, None)
        .await
        .expect("warm-up");

    let (mut create, mut update, mut destroy, mut raw) = (
        Row {
            name: "driver: new stack (up)",
            samples: vec![],
        },
        Row {
            name: "driver: update in place (up)",
            samples: vec![],
        },
        Row {
            name: "driver: destroy",
            samples: vec![],
        },
        Row {
            name: "raw `pulumi up` (new stack)",
            samples: vec![],
        },
    );
    let changed = BTreeMap::from([("connection_prefix".to_owned(), "ssh://".to_owned())]);
    let pulumi = cm_testkit::pulumi();
    for _ in 0..iters {
        let identity = Identity::random();
        let started = Instant::now();
        let deployed = d.up(&scenario, &identity, &none, None).await.expect("up");
        create.samples.push(started.elapsed());

        let started = Instant::now();
        let updated = d
            .up(&scenario, &identity, &changed, Some(&deployed.state))
            .await
            .expect("update");
        update.samples.push(started.elapsed());

        let started = Instant::now();
        d.destroy(&scenario, &updated.state).await.expect("destroy");
        destroy.samples.push(started.elapsed());

        raw.samples.push(raw_pulumi_up(
            &pulumi,
            &scenario.binary,
            &Identity::random(),
        ));
    }
    let floor = raw.median();
    rows.extend([first, create, update, destroy, raw]);

    println!();
    println!(
        "Pulumi driver bench: {iters} iterations, identity example, {}",
        pulumi.display()
    );
    println!(
        "{:<32} {:>4} {:>10} {:>10} {:>10} {:>12}",
        "operation", "n", "median", "min", "max", "vs raw up"
    );
    for row in &rows {
        println!(
            "{:<32} {:>4} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>11.2}x",
            row.name,
            row.samples.len(),
            row.median().as_secs_f64() * 1e3,
            row.min().as_secs_f64() * 1e3,
            row.max().as_secs_f64() * 1e3,
            row.median().as_secs_f64() / floor.as_secs_f64(),
        );
    }
    println!("reproduce: cargo bench -p cm-worker --bench driver (CM_BENCH_ITERS={iters})");
}

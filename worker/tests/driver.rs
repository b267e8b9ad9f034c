//! The Pulumi driver against the real `pulumi` CLI and Go language host, with
//! the example scenarios: up, outputs, in-place update, destroy, failures.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    sync::{Arc, OnceLock},
};

use cm_core::{Identity, Secret};
use cm_worker::pulumi::{Driver, DriverConfig, DriverError};
use sha2::{Digest, Sha256};

/// One cache for the whole test binary, so each example compiles once.
fn cache_dir() -> PathBuf {
    static CACHE: OnceLock<(Option<tempfile::TempDir>, PathBuf)> = OnceLock::new();
    CACHE.get_or_init(cm_testkit::worker_cache).1.clone()
}

fn driver() -> Arc<Driver> {
    static DRIVER: OnceLock<Arc<Driver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let config = DriverConfig {
                pulumi: cm_testkit::pulumi(),
                go: cm_testkit::go(),
                cache_dir: cache_dir(),
                passphrase: Secret::new("driver-test-passphrase".to_owned()),
                niceness: cm_worker::pulumi::DEFAULT_NICENESS,
            };
            Arc::new(Driver::new(config).expect("driver"))
        })
        .clone()
}

/// The flag the identity example derives, computed independently here.
fn expected_flag(identity: &Identity) -> String {
    let digest = Sha256::digest(format!("identity-flag:{identity}"));
    format!("CTF{{{}}}", &hex::encode(digest)[..16])
}

fn urns(state: &cm_worker::pulumi::StackState) -> Vec<String> {
    state
        .checkpoint
        .pointer("/checkpoint/latest/resources")
        .and_then(|r| r.as_array())
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r.get("urn").and_then(|u| u.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn identity_scenario_up_update_in_place_and_destroy() {
    let driver = driver();
    let scenario = driver
        .prepare(&cm_testkit::example("identity"))
        .await
        .expect("prepare");
    assert_eq!(scenario.project, "identity");
    let identity = Identity::random();

    let first = driver
        .up(&scenario, &identity, &BTreeMap::new(), None)
        .await
        .expect("first up");
    assert_eq!(
        first.outputs.connection_info,
        format!("nc {identity}.ctf.local 1337")
    );
    assert_eq!(first.outputs.flags, vec![expected_flag(&identity)]);
    assert_eq!(first.state.stack, identity.as_str());
    assert!(first.state.resource_count() >= 1);
    let serialized = serde_json::to_string(&first.state).expect("state json");
    assert!(
        !serialized.contains(&expected_flag(&identity)),
        "the flag is a secret: it must be encrypted in the stored state"
    );

    let additional = BTreeMap::from([("connection_prefix".to_owned(), "ssh://".to_owned())]);
    let second = driver
        .up(&scenario, &identity, &additional, Some(&first.state))
        .await
        .expect("update");
    assert_eq!(
        second.outputs.connection_info,
        format!("ssh://nc {identity}.ctf.local 1337")
    );
    assert_eq!(
        second.outputs.flags, first.outputs.flags,
        "same identity, same flag"
    );
    assert_eq!(urns(&second.state), urns(&first.state), "updated in place");

    let after = driver
        .destroy(&scenario, &second.state)
        .await
        .expect("destroy");
    assert_eq!(after.resource_count(), 0, "destroy leaves no resource");
}

#[tokio::test]
async fn additional_configuration_reaches_the_program() {
    let driver = driver();
    let scenario = driver
        .prepare(&cm_testkit::example("echo-additional"))
        .await
        .expect("prepare");
    let identity = Identity::random();
    let additional = BTreeMap::from([
        ("b".to_owned(), "two words".to_owned()),
        ("a".to_owned(), "quote\" and: colon".to_owned()),
    ]);
    let deployment = driver
        .up(&scenario, &identity, &additional, None)
        .await
        .expect("up");
    let echoed: BTreeMap<String, String> =
        serde_json::from_str(&deployment.outputs.connection_info).expect("echo is JSON");
    assert_eq!(echoed, additional);
    assert_eq!(
        deployment.outputs.flags,
        vec![format!("CTF{{echo-{identity}}}")]
    );
    assert!(deployment.outputs.extra.contains_key("additional"));
    driver
        .destroy(&scenario, &deployment.state)
        .await
        .expect("destroy");
}

#[tokio::test]
async fn a_failing_program_surfaces_pulumis_message() {
    let driver = driver();
    let scenario = driver
        .prepare(&cm_testkit::example("fail"))
        .await
        .expect("prepare");
    let identity = Identity::random();
    let err = driver
        .up(&scenario, &identity, &BTreeMap::new(), None)
        .await
        .expect_err("the fail scenario fails");
    match err {
        DriverError::ProgramFailed { message, state } => {
            assert!(
                message.contains(&format!(
                    "this scenario fails on purpose (identity {identity})"
                )),
                "{message}"
            );
            assert!(
                state.is_some(),
                "the failed stack's state comes back for cleanup"
            );
        }
        other => panic!("expected ProgramFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_scenarios_are_refused_with_a_reason() {
    let driver = driver();
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("no Pulumi.yaml", &[("main.go", "package main\n")]),
        (
            "not supported",
            &[("Pulumi.yaml", "name: x\nruntime: nodejs\n")],
        ),
        (
            "does not compile",
            &[
                ("Pulumi.yaml", "name: broken\nruntime: go\n"),
                ("go.mod", "module broken\n\ngo 1.22\n"),
                ("main.go", "package main\n\nfunc main() { undefined() }\n"),
            ],
        ),
        (
            "does not contain",
            &[(
                "Pulumi.yaml",
                "name: x\nruntime:\n  name: go\n  options:\n    binary: ./main\n",
            )],
        ),
    ];
    for (expected, files) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write");
        }
        match driver.prepare(dir.path()).await {
            Err(DriverError::ScenarioInvalid { reason }) => {
                assert!(reason.contains(expected), "{expected}: got {reason}")
            }
            other => panic!("{expected}: expected ScenarioInvalid, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_scenario_is_compiled_once_per_digest() {
    let driver = driver();
    let example = cm_testkit::example("identity");
    let first = driver.prepare(&example).await.expect("prepare");
    let built = std::fs::metadata(&first.binary)
        .and_then(|m| m.modified())
        .expect("binary");
    let second = driver.prepare(&example).await.expect("prepare again");
    assert_eq!(first.digest, second.digest);
    assert_eq!(first.binary, second.binary);
    let again = std::fs::metadata(&second.binary)
        .and_then(|m| m.modified())
        .expect("binary");
    assert_eq!(built, again, "not rebuilt");
}

/// Needs the real CLI; the next test runs it with Pulumi hidden.
#[test]
fn finds_the_real_pulumi() {
    let pulumi = cm_testkit::pulumi();
    let out = Command::new(&pulumi)
        .arg("version")
        .output()
        .expect("run pulumi");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("v3."));
}

#[test]
fn without_pulumi_a_test_fails_and_names_the_setup_command() {
    let exe = std::env::current_exe().expect("test binary");
    let empty_cache = tempfile::tempdir().expect("tempdir");
    let out = Command::new(exe)
        .args(["--exact", "finds_the_real_pulumi", "--test-threads=1"])
        .env("PATH", "/usr/bin:/bin")
        .env("CM_CACHE_DIR", empty_cache.path())
        .output()
        .expect("run the test binary");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "must fail, not skip:\n{all}");
    assert!(all.contains("1 failed"), "{all}");
    assert!(all.contains("scripts/dev.sh install"), "{all}");
}

#[tokio::test]
async fn a_run_interrupted_with_pending_operations_is_recovered() {
    let driver = driver();
    let scenario = driver
        .prepare(&cm_testkit::example("steps"))
        .await
        .expect("prepare");
    let identity = Identity::random();
    let two = BTreeMap::from([("steps".to_owned(), "2".to_owned())]);
    let first = driver
        .up(&scenario, &identity, &two, None)
        .await
        .expect("first up");

    // What a run killed in the middle of creating a third step leaves: a
    // checkpoint with a pending `creating` operation.
    let mut interrupted = first.state.clone();
    let latest = interrupted
        .checkpoint
        .pointer_mut("/checkpoint/latest")
        .expect("latest");
    let mut half_made = latest["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["type"] == "cm:example:Step"))
        .cloned()
        .expect("a step");
    let urn = half_made["urn"]
        .as_str()
        .expect("urn")
        .replace("step-0", "step-2");
    half_made["urn"] = serde_json::Value::String(urn);
    latest["pending_operations"] = serde_json::json!([{"type": "creating", "resource": half_made}]);

    let three = BTreeMap::from([("steps".to_owned(), "3".to_owned())]);
    let resumed = driver
        .up(&scenario, &identity, &three, Some(&interrupted))
        .await
        .expect("the interrupted stack is resumed");
    let pending = resumed
        .state
        .checkpoint
        .pointer("/checkpoint/latest/pending_operations")
        .and_then(|p| p.as_array())
        .map_or(0, Vec::len);
    assert_eq!(pending, 0, "pending operations cleared");
    let steps: Vec<String> = urns(&resumed.state)
        .into_iter()
        .filter(|u| u.contains("cm:example:Step"))
        .collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(
        urns(&resumed.state)
            .iter()
            .filter(|u| u.ends_with("::step-0"))
            .count(),
        1,
        "step-0 kept, not duplicated"
    );
}

/// A `steps` run of `steps` steps of 1.5 s on a new stack, in the
/// background: its identity and its task.
async fn spawn_slow_run(
    steps: usize,
) -> (
    Identity,
    tokio::task::JoinHandle<Result<cm_worker::pulumi::Deployment, DriverError>>,
) {
    let driver = driver();
    let scenario = driver
        .prepare(&cm_testkit::example("steps"))
        .await
        .expect("prepare");
    let identity = Identity::random();
    let slow = BTreeMap::from([
        ("steps".to_owned(), steps.to_string()),
        ("step_ms".to_owned(), "1500".to_owned()),
    ]);
    let stack = identity.clone();
    let run = tokio::spawn(async move { driver.up(&scenario, &stack, &slow, None).await });
    (identity, run)
}

/// The pids of this test process's children running on the stack
/// `identity` (its name is on their command line; other tests' runs are
/// left alone).
fn runs_on(identity: &Identity) -> Vec<String> {
    pgrep(&[
        "-P",
        &std::process::id().to_string(),
        "-f",
        identity.as_str(),
    ])
}

/// The pids `pgrep <args>` prints.
fn pgrep(args: &[&str]) -> Vec<String> {
    let out = Command::new("pgrep").args(args).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The niceness of process `pid` (field 19 of `/proc/<pid>/stat`).
fn niceness(pid: &str) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(16)?.parse().ok()
}

/// The children of process `pid`.
fn children(pid: &str) -> Vec<String> {
    pgrep(&["-P", pid])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulumi_runs_at_the_configured_niceness_with_its_program() {
    let (identity, run) = spawn_slow_run(2).await;
    // The `pulumi up` of this stack, and its descendants once the language
    // host has started the program.
    let me = std::process::id().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (cli, tree) = loop {
        if let Some(cli) = runs_on(&identity).pop() {
            let mut tree = children(&cli);
            let mut i = 0;
            while i < tree.len() {
                let below = children(&tree[i]);
                tree.extend(below);
                i += 1;
            }
            // The host, and the program it runs.
            if tree.len() >= 2 {
                break (cli, tree);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pulumi run with its program seen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(niceness(&me), Some(0), "the test itself runs at 0");
    for pid in std::iter::once(&cli).chain(&tree) {
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if let Some(n) = niceness(pid) {
            assert_eq!(
                n,
                cm_worker::pulumi::DEFAULT_NICENESS,
                "process {pid} ({}) runs niced",
                cmd.replace('\0', " ")
            );
        }
    }
    run.await.expect("task").expect("the niced run succeeds");
}

#[tokio::test]
async fn a_pulumi_run_killed_by_a_signal_is_retryable() {
    // Four steps of 1.5 s: long enough to be killed in the middle.
    let (identity, run) = spawn_slow_run(4).await;
    // Kill the `pulumi up` of this stack once it runs, as the OOM killer or
    // an operator would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let pids = runs_on(&identity);
        if !pids.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            for pid in pids {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            break;
        }
        assert!(std::time::Instant::now() < deadline, "pulumi never started");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let err = run
        .await
        .expect("task")
        .expect_err("a killed run does not succeed");
    assert!(
        matches!(err, DriverError::Interrupted { signal: 9, .. }),
        "killed by SIGKILL: {err:?}"
    );
    assert!(err.is_retryable(), "a killed run is worth retrying");
}

//! Hot update of a challenge's scenario on its running instances (pooled and
//! claimed), with each strategy.

mod support;

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use cm_core::{Identity, model::InstanceRecord};
use reqwest::Method;
use serde_json::json;
use support::Stack;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

/// `v1` is the identity example; `v2` the same with another port in its
/// connection info.
fn scenarios() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = cm_testkit::example("identity");
    copy_dir(&example, &dir.path().join("v1"));
    copy_dir(&example, &dir.path().join("v2"));
    let main = dir.path().join("v2/main.go");
    let code = std::fs::read_to_string(&main).expect("main.go");
    assert!(code.contains("ctf.local 1337"));
    std::fs::write(&main, code.replace("ctf.local 1337", "ctf.local 2448")).expect("write");
    dir
}

async fn instances(stack: &Stack, cid: &str) -> Vec<InstanceRecord> {
    stack.store.list_instances(cid).await.expect("store")
}

async fn run_strategy(strategy: &str) {
    let dir = scenarios();
    let root = dir.path().to_str().expect("utf-8").to_owned();
    let stack = Stack::start_with(2, &[("CM_SCENARIOS_DIR", &root)]).await;
    let cid = format!("hot-{strategy}");
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": cid, "scenario": "v1", "min": 1, "max": 0})),
        )
        .await;
    for source in ["a", "b"] {
        let (status, _) = stack
            .call(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": cid, "sourceId": source})),
            )
            .await;
        assert_eq!(status, 200, "{}", stack.worker_logs());
    }
    // Wait for the pool to hold its one ready instance (3 in all).
    let deadline = Instant::now() + Duration::from_secs(60);
    while instances(&stack, &cid)
        .await
        .iter()
        .filter(|r| r.status == cm_core::model::InstanceStatus::Ready)
        .count()
        != 3
    {
        assert!(
            Instant::now() < deadline,
            "pool not ready\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before: HashMap<Option<String>, Identity> = instances(&stack, &cid)
        .await
        .into_iter()
        .map(|r| (r.source_id, r.identity))
        .collect();

    stack
        .call_ok(
            Method::PATCH,
            &format!("/api/v1/challenge/{cid}"),
            Some(json!({"scenario": "v2", "updateStrategy": strategy})),
        )
        .await;

    let after = instances(&stack, &cid).await;
    assert_eq!(after.len(), 3, "{after:?}");
    for rec in &after {
        assert!(
            rec.connection_info.ends_with("ctf.local 2448"),
            "{strategy}: {rec:?}"
        );
        let old = &before[&rec.source_id];
        match strategy {
            "blue_green" => {
                assert_ne!(&rec.identity, old, "blue_green gives a new identity");
                assert!(
                    stack
                        .store
                        .get_stack(&cid, old)
                        .await
                        .expect("store")
                        .is_none(),
                    "old stack destroyed"
                );
            }
            _ => assert_eq!(&rec.identity, old, "{strategy} keeps the identity"),
        }
        assert!(
            stack
                .store
                .get_stack(&cid, &rec.identity)
                .await
                .expect("store")
                .is_some()
        );
    }
    for source in ["a", "b"] {
        let (status, got) = stack
            .call(
                Method::GET,
                &format!("/api/v1/instance/{cid}/{source}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "the source keeps its claim");
        assert!(
            got["connectionInfo"]
                .as_str()
                .is_some_and(|c| c.ends_with("2448")),
            "{got}"
        );
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_in_place_applies_the_new_scenario_to_every_instance() {
    run_strategy("update_in_place").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_brings_new_identities_up_and_the_old_stacks_down() {
    run_strategy("blue_green").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_keeps_identities() {
    run_strategy("recreate").await;
}

/// A challenge update whose worker dies once the challenge is written and
/// before any instance update is published: the redelivery finds the
/// instances still deployed from the old program in their records and
/// updates them (it used to compare the request with the challenge, found
/// nothing changed, and left them on the old scenario for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_update_that_dies_before_its_fan_out_still_updates_every_instance() {
    let dir = scenarios();
    let root = dir.path().to_str().expect("utf-8").to_owned();
    let mut stack = Stack::start_with(0, &[("CM_SCENARIOS_DIR", &root)]).await;
    stack.spawn_worker_with(&[
        ("CM_LEASE_TTL", "3"),
        ("CM_FAILPOINT", "challenge-update-before-fan-out"),
    ]);
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "fan", "scenario": "v1"})),
        )
        .await;
    for source in ["a", "b"] {
        stack
            .call_ok(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "fan", "sourceId": source})),
            )
            .await;
    }
    let op = stack
        .submit_async(
            Method::PATCH,
            "/api/v1/challenge/fan",
            Some(json!({"scenario": "v2", "updateStrategy": "update_in_place"})),
        )
        .await;
    stack
        .wait_worker_exit(
            0,
            Duration::from_secs(60),
            "the worker never reached the failpoint",
        )
        .await;
    let written = stack
        .store
        .get_challenge("fan")
        .await
        .expect("store")
        .expect("challenge");
    assert_eq!(written.value.scenario, "v2", "the challenge was written");

    stack.spawn_worker();
    let done = stack.wait_operation(&op, Duration::from_secs(120)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    for rec in instances(&stack, "fan").await {
        assert!(
            rec.connection_info.ends_with("ctf.local 2448"),
            "left on the old scenario: {rec:?}"
        );
    }
    drop(dir);
}

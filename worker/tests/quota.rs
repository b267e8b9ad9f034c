//! Per-source caps (refuse or evict) and the reset of an instance.

mod support;

use reqwest::Method;
use serde_json::json;
use support::Stack;

async fn challenge(stack: &Stack, body: serde_json::Value) {
    let (status, resp) = stack
        .call(Method::POST, "/api/v1/challenge", Some(body))
        .await;
    assert_eq!(status, 200, "{resp}\n{}", stack.worker_logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_cap_is_refused_and_nothing_is_deployed() {
    let stack = Stack::start_with(1, &[("CM_MAX_INSTANCES_PER_SOURCE", "1")]).await;
    challenge(&stack, json!({"id": "a", "scenario": "identity"})).await;
    challenge(&stack, json!({"id": "b", "scenario": "identity"})).await;
    challenge(
        &stack,
        json!({"id": "c", "scenario": "identity", "maxPerSource": 2}),
    )
    .await;

    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "a", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, refused) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "b", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["code"], 8, "RESOURCE_EXHAUSTED");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("source s already has 1 instance")),
        "{refused}"
    );
    assert!(
        stack
            .store
            .list_instances("b")
            .await
            .expect("store")
            .is_empty(),
        "nothing deployed"
    );

    // A challenge's own cap overrides the global one.
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "c", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Other sources are not affected.
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "b", "sourceId": "t"})),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_eviction_the_oldest_instance_makes_room() {
    let stack = Stack::start_with(
        1,
        &[
            ("CM_MAX_INSTANCES_PER_SOURCE", "1"),
            ("CM_EVICT_OLDEST", "true"),
        ],
    )
    .await;
    challenge(&stack, json!({"id": "a", "scenario": "identity"})).await;
    challenge(&stack, json!({"id": "b", "scenario": "identity"})).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "a", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 200);
    let old = stack
        .store
        .get_instance("a", "s")
        .await
        .expect("store")
        .expect("record")
        .value
        .identity;

    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "b", "sourceId": "s"})),
        )
        .await;
    assert!(
        stack
            .store
            .get_instance("a", "s")
            .await
            .expect("store")
            .is_none(),
        "oldest evicted"
    );
    assert!(
        stack
            .store
            .get_stack("a", &old)
            .await
            .expect("store")
            .is_none(),
        "its stack destroyed"
    );
    assert!(
        stack
            .store
            .get_instance("b", "s")
            .await
            .expect("store")
            .is_some(),
        "the new one deployed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_redeploys_with_a_new_identity_and_destroys_the_old_stack() {
    let stack = Stack::start(1).await;
    challenge(
        &stack,
        json!({"id": "r", "scenario": "identity", "timeout": "600s"}),
    )
    .await;
    let (status, before) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "r", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 200);
    let old = stack
        .store
        .get_instance("r", "s")
        .await
        .expect("store")
        .expect("record")
        .value;

    let (status, after) = stack
        .call(Method::POST, "/api/v1/instance/r/s/reset", None)
        .await;
    assert_eq!(status, 200, "{after}\n{}", stack.worker_logs());
    let new = stack
        .store
        .get_instance("r", "s")
        .await
        .expect("store")
        .expect("record")
        .value;
    assert_ne!(new.identity, old.identity, "new identity");
    assert_ne!(
        after["connectionInfo"], before["connectionInfo"],
        "new connection info"
    );
    assert_ne!(after["flags"], before["flags"], "new flag");
    assert_eq!(after["since"], before["since"], "same claim");
    assert_eq!(after["until"], before["until"], "same deadline");
    assert!(
        stack
            .store
            .get_stack("r", &old.identity)
            .await
            .expect("store")
            .is_none(),
        "old stack gone"
    );
    assert!(
        stack
            .store
            .get_stack("r", &new.identity)
            .await
            .expect("store")
            .is_some()
    );

    let (status, _) = stack
        .call(Method::POST, "/api/v1/instance/r/nobody/reset", None)
        .await;
    assert_eq!(status, 404);
}

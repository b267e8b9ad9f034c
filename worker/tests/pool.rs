//! The pooler: pre-deployed instances, claims without Pulumi, refills within
//! `max`, resizing with `min`.

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use support::Stack;

async fn counts(stack: &Stack, cid: &str) -> (usize, usize, usize) {
    let all = stack.store.list_instances(cid).await.expect("store");
    let pooled_ready = all
        .iter()
        .filter(|r| r.source_id.is_none() && r.status == cm_core::model::InstanceStatus::Ready)
        .count();
    let pooled = all.iter().filter(|r| r.source_id.is_none()).count();
    (pooled_ready, pooled, all.len())
}

async fn wait_for(
    stack: &Stack,
    cid: &str,
    max_total: usize,
    done: impl Fn((usize, usize, usize)) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = counts(stack, cid).await;
        assert!(c.2 <= max_total, "total {} above max {max_total}", c.2);
        if done(c) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool never reached the state: {c:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_prefills_claims_without_pulumi_refills_within_max_and_drains() {
    let stack = Stack::start(2).await;
    stack.call_ok(Method::POST, "/api/v1/challenge", Some(json!({ "id": "pooled", "scenario": "identity", "timeout": "600s", "min": 2, "max": "3" }))).await;
    wait_for(&stack, "pooled", 3, |(ready, _, _)| ready == 2).await;

    let before = stack.store.list_instances("pooled").await.expect("store");
    let mut stacks = std::collections::HashMap::new();
    for rec in &before {
        let bytes = stack
            .store
            .get_stack("pooled", &rec.identity)
            .await
            .expect("store")
            .expect("stack");
        stacks.insert(rec.identity.clone(), bytes);
    }

    let refilled = "cm.evt.pool.refilled.pooled";
    let quiet = |stack: &Stack| {
        let url = stack.nats.url.clone();
        async move {
            support::wait_drained(&url, Duration::from_millis(100), Duration::from_secs(60)).await
        }
    };
    assert!(quiet(&stack).await, "the prefill settles");
    let refills_before = stack.events(refilled).await;
    let started = Instant::now();
    let (status, claimed) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "pooled", "sourceId": "alice"})),
        )
        .await;
    let claim_time = started.elapsed();
    assert_eq!(status, 200, "{claimed}\n{}", stack.worker_logs());
    let record = stack
        .store
        .get_instance("pooled", "alice")
        .await
        .expect("store")
        .expect("claimed")
        .value;
    let old_stack = stacks
        .get(&record.identity)
        .expect("the claim took a pre-deployed instance");
    let now_stack = stack
        .store
        .get_stack("pooled", &record.identity)
        .await
        .expect("store")
        .expect("stack");
    assert_eq!(
        &now_stack, old_stack,
        "the claim path ran no Pulumi (stack state untouched)"
    );
    assert!(
        claimed["connectionInfo"]
            .as_str()
            .is_some_and(|c| c.contains(record.identity.as_str()))
    );
    assert!(
        claimed["until"].is_string(),
        "a claimed instance gets its until"
    );
    eprintln!("pool claim answered in {claim_time:?}");

    // Refilled to 2 pooled while the total stays <= 3.
    wait_for(&stack, "pooled", 3, |(ready, _, total)| {
        ready == 2 && total == 3
    })
    .await;

    assert!(quiet(&stack).await, "the refill settles");
    let refills_at_max = stack.events(refilled).await;
    assert!(
        refills_at_max > refills_before,
        "a claim below max asks for a refill"
    );

    // A second claim: the pool can only refill up to max (3 in all), so
    // the claim asks for no refill (one would only take the pool's locks).
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "pooled", "sourceId": "bob"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_for(&stack, "pooled", 3, |(ready, _, total)| {
        ready == 1 && total == 3
    })
    .await;
    assert!(quiet(&stack).await, "the claim settles");
    assert_eq!(
        stack.events(refilled).await,
        refills_at_max,
        "a claim at max asks for no refill"
    );

    // min = 0 drains the pool; claimed instances stay.
    stack
        .call_ok(
            Method::PATCH,
            "/api/v1/challenge/pooled",
            Some(json!({"min": 0})),
        )
        .await;
    wait_for(&stack, "pooled", 3, |(_, pooled, total)| {
        pooled == 0 && total == 2
    })
    .await;

    // Deleting the challenge destroys everything.
    let (status, _) = stack
        .call(Method::DELETE, "/api/v1/challenge/pooled", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(counts(&stack, "pooled").await.2, 0);
}

//! Expiry end to end: the expiry index, the janitor (several at once), the
//! worker's expire handler, and renewals racing the janitor.

mod support;

use std::time::{Duration, Instant, SystemTime};

use cm_core::{
    Identity,
    model::{InstanceRecord, InstanceStatus, to_system_time, to_timestamp},
    queue::QueueConfig,
    store::{Expect, StoreOptions},
};
use futures::StreamExt;
use reqwest::Method;
use serde_json::json;
use support::Stack;

async fn janitor(stack: &Stack) -> cm_janitor::Janitor {
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    cm_core::queue::ensure_streams(&js, &QueueConfig::default())
        .await
        .expect("streams");
    let store = cm_core::store::Store::connect(
        std::slice::from_ref(&stack.etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    cm_janitor::Janitor::new(store, js, 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_destroys_an_instance_within_one_interval_of_its_expiry() {
    let stack = Stack::start(1).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "short", "scenario": "identity", "timeout": "3s"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    // The janitor runs before the instance exists (its start-up is not
    // what is measured). When it publishes the expiry: what "within one interval"
    // is about (the destroy after it is a Pulumi run, whose time depends
    // on the machine's load).
    let nats = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let mut expiries = nats
        .subscribe("cm.cmd.instance.expire.short")
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");
    let first_expiry =
        tokio::spawn(async move { expiries.next().await.map(|_| SystemTime::now()) });
    let interval = Duration::from_secs(1);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(cm_janitor::run(
        support::janitor_config(&stack, interval),
        async {
            let _ = stopped.await;
        },
    ));

    let (status, inst) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "short", "sourceId": "p"})),
        )
        .await;
    assert_eq!(status, 200, "{inst}\n{}", stack.worker_logs());
    let record = stack
        .store
        .get_instance("short", "p")
        .await
        .expect("store")
        .expect("record")
        .value;
    let until = to_system_time(&record.until.expect("until"));

    let deadline = Instant::now() + Duration::from_secs(20);
    let gone_at = loop {
        let (status, _) = stack
            .call(Method::GET, "/api/v1/instance/short/p", None)
            .await;
        if status == 404 {
            break SystemTime::now();
        }
        assert!(
            Instant::now() < deadline,
            "never expired\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop.send(());
    let _ = task.await;
    let published = tokio::time::timeout(Duration::from_secs(1), first_expiry)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .expect("the janitor published no expiry command");
    // Published within one interval of `until` (plus the tick's own work);
    // the instance gone after it (the destroy is a Pulumi run, its time the
    // machine's: bounded by the 20 s wait above).
    let late = published.duration_since(until).unwrap_or_default();
    assert!(
        late <= interval + Duration::from_secs(1),
        "the expiry was published {late:?} after the instance expired"
    );
    assert!(gone_at >= published, "gone before its expiry was published");
    assert!(
        stack
            .store
            .get_stack("short", &record.identity)
            .await
            .expect("store")
            .is_none(),
        "stack gone"
    );
    // The event follows the deletion (after the state object is removed
    // and the command settled): waited for, then counted exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.events("cm.evt.instance.expired.short").await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stack.events("cm.evt.instance.expired.short").await,
        1,
        "instance.expired published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_janitors_over_fifty_expiring_instances_delete_each_once() {
    let stack = Stack::start(2).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "many", "scenario": "identity", "timeout": "60s"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    // Fifty claimed instances (records only: the expiry path, not Pulumi, is
    // under test here) expiring two seconds from now.
    let now = SystemTime::now();
    for n in 0..50 {
        let rec = InstanceRecord {
            challenge_id: "many".into(),
            identity: Identity::random(),
            source_id: Some(format!("team-{n}")),
            status: InstanceStatus::Ready,
            since: to_timestamp(now),
            last_renew: to_timestamp(now),
            until: Some(to_timestamp(now + Duration::from_secs(2))),
            connection_info: String::new(),
            flags: vec![],
            additional: Default::default(),
            command_id: "seed".into(),
            deployed_from: None,
        };
        stack
            .store
            .put_instance(&rec, None, Expect::Absent, None)
            .await
            .expect("seed");
    }
    let mut janitors = Vec::new();
    for _ in 0..3 {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cm_janitor::run(
            support::janitor_config(&stack, Duration::from_secs(1)),
            async {
                let _ = stopped.await;
            },
        ));
        janitors.push((stop, task));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stack
        .store
        .list_instances("many")
        .await
        .expect("store")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "not all expired\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let any straggling duplicate be processed, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (stop, task) in janitors {
        let _ = stop.send(());
        let _ = task.await;
    }
    assert_eq!(
        stack.events("cm.evt.instance.expired.many").await,
        50,
        "exactly 50 deletions"
    );
    assert_eq!(
        stack.events("cm.evt.command.failed.many").await,
        0,
        "no error\n{}",
        stack.worker_logs()
    );
    assert!(
        stack
            .store
            .list_expired(
                &to_timestamp(SystemTime::now() + Duration::from_secs(3600)),
                100
            )
            .await
            .expect("index")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_racing_the_janitor_wins() {
    let stack = Stack::start(1).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "race-renew", "scenario": "identity", "timeout": "600s"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "race-renew", "sourceId": "p"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());

    // A janitor whose clock is ahead reads the index: to it, the instance expired...
    let janitor = janitor(&stack).await;
    let later = to_timestamp(SystemTime::now() + Duration::from_secs(601));
    let stale = janitor.collect(&later).await.expect("collect");
    assert_eq!(stale.len(), 1);
    // ...then the player renews before the janitor's command lands.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, renewed) = stack
        .call(Method::PATCH, "/api/v1/instance/race-renew/p", None)
        .await;
    assert_eq!(status, 200, "{renewed}");
    let report = janitor.publish(stale).await.expect("publish");
    assert_eq!(report.published, 1);

    let deadline = Instant::now() + Duration::from_secs(20);
    while stack
        .events("cm.evt.instance.expiry-skipped.race-renew")
        .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "expiry never processed\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, after) = stack
        .call(Method::GET, "/api/v1/instance/race-renew/p", None)
        .await;
    assert_eq!(status, 200, "the renewed instance survives");
    assert_eq!(after["until"], renewed["until"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_challenges_timeout_moves_its_instances_until() {
    let stack = Stack::start(1).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "moving", "scenario": "identity", "timeout": "600s"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    let (status, before) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "moving", "sourceId": "p"})),
        )
        .await;
    assert_eq!(status, 200);
    stack
        .call_ok(
            Method::PATCH,
            "/api/v1/challenge/moving",
            Some(json!({"timeout": "2s"})),
        )
        .await;
    let (_, after) = stack
        .call(Method::GET, "/api/v1/instance/moving/p", None)
        .await;
    assert!(
        after["until"].as_str() < before["until"].as_str(),
        "{before} -> {after}"
    );
    // And the expiry index moved with it: expired within seconds.
    let soon = to_timestamp(SystemTime::now() + Duration::from_secs(5));
    let expired = stack.store.list_expired(&soon, 10).await.expect("index");
    assert_eq!(expired.len(), 1, "{expired:?}");
    let far = to_timestamp(SystemTime::now() + Duration::from_secs(3600));
    assert_eq!(
        stack
            .store
            .list_expired(&far, 10)
            .await
            .expect("index")
            .len(),
        1,
        "old entry removed"
    );
}

//! Workers killed at the worst moments: in the middle of a Pulumi run,
//! between the run and the store write, between the store write and the ack.
//! Each time another worker takes the command over once its ack deadline has
//! passed, the dead worker's locks are gone once its lease has expired, and
//! the end state is exactly one ready instance whose stack state is whole,
//! with nothing deployed twice and nothing left over.

mod support;

use std::time::{Duration, Instant};

use cm_core::{
    Identity,
    model::{InstanceRecord, InstanceStatus},
};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

/// The killed worker's lease: its locks are freed this long after it died.
const SHORT_LEASE: (&str, &str) = ("CM_LEASE_TTL", "3");

async fn create_challenge(stack: &Stack, id: &str, additional: Value) {
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": id, "scenario": "steps", "additional": additional})),
        )
        .await;
}

/// Queues an instance create without waiting; returns its operation id.
async fn queue_instance(stack: &Stack, cid: &str, sid: &str) -> String {
    stack
        .submit_async(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": cid, "sourceId": sid})),
        )
        .await
}

async fn record(stack: &Stack, cid: &str, sid: &str) -> Option<InstanceRecord> {
    stack
        .store
        .get_instance(cid, sid)
        .await
        .expect("store")
        .map(|v| v.value)
}

/// The stored stack state of an instance, as JSON.
async fn stack_state(stack: &Stack, cid: &str, identity: &Identity) -> Option<Value> {
    stack
        .stack_state_bytes(cid, identity)
        .await
        .map(|b| serde_json::from_slice(&b).expect("stack state is JSON"))
}

/// The `steps` scenario's step resources in a stack state: (name, created).
fn steps_of(state: &Value) -> Vec<(String, String)> {
    state
        .pointer("/checkpoint/checkpoint/latest/resources")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter(|r| r["type"] == "cm:example:Step")
                .map(|r| {
                    let urn = r["urn"].as_str().unwrap_or_default();
                    let name = urn.rsplit("::").next().unwrap_or_default().to_owned();
                    let created = r["created"].as_str().unwrap_or_default().to_owned();
                    (name, created)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pending_operations(state: &Value) -> usize {
    state
        .pointer("/checkpoint/checkpoint/latest/pending_operations")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// Keys under `prefix` in etcd.
async fn count_keys(stack: &Stack, prefix: &str) -> usize {
    let resp = stack
        .store
        .client()
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("etcd");
    resp.kvs().len()
}

/// Waits until no lock key is left (the dead worker's lease has expired and
/// the live one released its own).
async fn wait_locks_free(stack: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_keys(stack, "/cm/lock/").await > 0 {
        assert!(
            Instant::now() < deadline,
            "lock keys still held 20 s later\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The end state every test requires: one ready record, one stack state,
/// whole (no pending operation) and holding each step exactly once.
async fn assert_one_whole_instance(stack: &Stack, cid: &str, sid: &str, steps: usize) -> Value {
    let rec = record(stack, cid, sid).await.expect("the instance exists");
    assert_eq!(rec.status, InstanceStatus::Ready);
    assert!(!rec.flags.is_empty(), "the instance has its flag");
    assert_eq!(
        count_keys(stack, &format!("/cm/instance/{cid}/")).await,
        1,
        "exactly one instance record"
    );
    assert_eq!(
        count_keys(stack, &format!("/cm/stack/{cid}/")).await,
        1,
        "exactly one stack state, no orphan"
    );
    let state = stack_state(stack, cid, &rec.identity)
        .await
        .expect("stack state");
    assert_eq!(pending_operations(&state), 0, "no pending operation left");
    let mut names: Vec<String> = steps_of(&state).into_iter().map(|(n, _)| n).collect();
    names.sort();
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..steps).map(|i| format!("step-{i}")).collect();
        w.sort();
        w
    };
    assert_eq!(names, want, "each step deployed exactly once");
    let (status, body) = stack
        .call(Method::GET, &format!("/api/v1/instance/{cid}/{sid}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["connectionInfo"],
        format!("steps {} x{steps}", rec.identity)
    );
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_pulumi_run_is_resumed_by_another() {
    let mut stack = Stack::start(0).await;
    stack.spawn_worker_with(&[SHORT_LEASE]);
    create_challenge(&stack, "slow", json!({"steps": "6", "step_ms": "900"})).await;
    let op = queue_instance(&stack, "slow", "team-a").await;

    // Wait until the run is half way: some steps, not all, are in the stored
    // checkpoint and Pulumi still runs. The stored checkpoint lags the run by
    // up to the checkpoint interval, so the final one can be stored while
    // the record is still deploying: that moment is no kill mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (identity, at_kill) = loop {
        if let Some(rec) = record(&stack, "slow", "team-a").await
            && let Some(state) = stack_state(&stack, "slow", &rec.identity).await
            && (2..6).contains(&steps_of(&state).len())
            && support::pulumi_processes(&rec.identity) > 0
        {
            assert_eq!(rec.status, InstanceStatus::Deploying);
            break (rec.identity, state);
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint with 2 to 5 steps stored while Pulumi ran\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stack.kill_worker(0);
    let steps_at_kill = steps_of(&at_kill);

    // The dead worker's Pulumi run dies with it (no run racing the next one).
    let deadline = Instant::now() + Duration::from_secs(5);
    while support::pulumi_processes(&identity) > 0 {
        assert!(
            Instant::now() < deadline,
            "the killed worker's pulumi kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = stack_state(&stack, "slow", &identity).await.expect("state");
    assert!(
        steps_of(&stored).len() >= steps_at_kill.len(),
        "the stored checkpoint never goes backwards"
    );

    // Another worker takes the command over after the ack deadline.
    stack.spawn_worker();
    let done = stack.wait_operation(&op, Duration::from_secs(90)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    let rec = record(&stack, "slow", "team-a").await.expect("record");
    assert_eq!(
        rec.identity, identity,
        "resumed with the reservation's identity"
    );
    let end = assert_one_whole_instance(&stack, "slow", "team-a", 6).await;

    // Steps deployed before the kill were resumed from the checkpoint, not
    // deployed a second time: their creation times are the dead run's.
    let final_steps = steps_of(&end);
    for (name, created) in steps_of(&stored) {
        assert!(
            !created.is_empty(),
            "Pulumi records when {name} was created"
        );
        let now = final_steps
            .iter()
            .find(|(n, _)| *n == name)
            .expect("step kept");
        assert_eq!(&now.1, &created, "{name} was deployed again");
    }
    wait_locks_free(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_deploy_of_a_large_stack_resumes_from_the_object_store() {
    let mut stack = Stack::start(0).await;
    stack.spawn_worker_with(&[SHORT_LEASE, ("CM_CHECKPOINT_INTERVAL", "1s")]);
    // 10 steps of 300 KiB each: by the kill the checkpoint is over etcd's
    // 1.5 MiB request limit, so it can only have come from the object store.
    create_challenge(
        &stack,
        "large",
        json!({"steps": "10", "step_ms": "700", "payload_kb": "300"}),
    )
    .await;
    let op = queue_instance(&stack, "large", "team-l").await;

    let deadline = Instant::now() + Duration::from_secs(90);
    let identity = loop {
        if let Some(rec) = record(&stack, "large", "team-l").await
            && rec.status == InstanceStatus::Deploying
            && let Some(cm_core::store::StoredStack::Pointer(p)) = stack
                .store
                .get_stack("large", &rec.identity)
                .await
                .expect("store")
            && p.live
            && stack
                .stack_state_bytes("large", &rec.identity)
                .await
                .is_some_and(|b| b.len() > 1_572_864)
        {
            break rec.identity;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint over 1.5 MiB stored while Pulumi ran\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stack.kill_worker(0);
    let stored = stack_state(&stack, "large", &identity)
        .await
        .expect("the checkpoint is readable");
    let at_kill = steps_of(&stored);
    assert!(
        (5..10).contains(&at_kill.len()),
        "killed mid-run with a large checkpoint: {} steps",
        at_kill.len()
    );

    stack.spawn_worker();
    let done = stack.wait_operation(&op, Duration::from_secs(120)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    let end = assert_one_whole_instance(&stack, "large", "team-l", 10).await;
    let final_steps = steps_of(&end);
    for (name, created) in &at_kill {
        let now = final_steps
            .iter()
            .find(|(n, _)| n == name)
            .expect("step kept");
        assert_eq!(&now.1, created, "{name} was deployed again");
    }
    wait_locks_free(&stack).await;
}

/// A stack whose only worker (short lease) has just aborted at `failpoint`
/// while creating an instance of a new `steps` challenge; the create's
/// operation id.
async fn die_at_failpoint(cid: &str, steps: u32, sid: &str, failpoint: &str) -> (Stack, String) {
    let mut stack = Stack::start(1).await;
    create_challenge(&stack, cid, json!({"steps": steps.to_string()})).await;
    stack.kill_worker(0);
    stack.spawn_worker_with(&[SHORT_LEASE, ("CM_FAILPOINT", failpoint)]);
    let op = queue_instance(&stack, cid, sid).await;
    stack
        .wait_worker_exit(
            1,
            Duration::from_secs(60),
            &format!("the failpoint {failpoint} never fired"),
        )
        .await;
    (stack, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_between_pulumi_and_the_store_write() {
    let (mut stack, op) = die_at_failpoint("cut", 2, "team-b", "after-up").await;
    // Pulumi finished: its final state is stored, the record still says deploying.
    let rec = record(&stack, "cut", "team-b").await.expect("reservation");
    assert_eq!(rec.status, InstanceStatus::Deploying);
    let deployed = stack_state(&stack, "cut", &rec.identity)
        .await
        .expect("the finished run's state was stored");
    assert_eq!(steps_of(&deployed).len(), 2);

    stack.spawn_worker();
    let done = stack.wait_operation(&op, Duration::from_secs(90)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    let end = assert_one_whole_instance(&stack, "cut", "team-b", 2).await;
    assert_eq!(
        steps_of(&end),
        steps_of(&deployed),
        "the resumed run changed nothing the dead one had deployed"
    );
    wait_locks_free(&stack).await;
}

/// A refill's worker dies after Pulumi deployed a pooled instance, before
/// the reservation says ready: the redelivered refill resumes that
/// reservation (same identity, what was deployed kept), with no janitor to
/// reclaim it. Before, the reservation counted as pooled, the refill saw the
/// pool full, and it stayed `Deploying` (unclaimable) until a janitor swept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_reservation_left_by_a_dead_refill_is_resumed_by_the_next_refill() {
    let mut stack = Stack::start(1).await;
    stack.kill_worker(0);
    stack.spawn_worker_with(&[SHORT_LEASE, ("CM_FAILPOINT", "after-up")]);
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "refill-cut", "scenario": "steps",
                        "additional": {"steps": "2"}, "min": 1, "max": 1})),
        )
        .await;
    stack
        .wait_worker_exit(
            1,
            Duration::from_secs(60),
            "the refill's worker never reached after-up",
        )
        .await;
    let left = stack
        .store
        .list_instances("refill-cut")
        .await
        .expect("store");
    let [reservation] = &left[..] else {
        panic!("one reservation expected: {left:?}");
    };
    assert_eq!(reservation.status, InstanceStatus::Deploying);
    assert_eq!(reservation.source_id, None);
    let deployed = stack_state(&stack, "refill-cut", &reservation.identity)
        .await
        .expect("the finished run's state was stored");
    assert_eq!(steps_of(&deployed).len(), 2);

    stack.spawn_worker();
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let now = stack
            .store
            .list_instances("refill-cut")
            .await
            .expect("store");
        if let [one] = &now[..]
            && one.status == InstanceStatus::Ready
        {
            break one.clone();
        }
        assert!(
            now.len() <= 1,
            "the pool (max 1) holds {}: {now:?}",
            now.len()
        );
        assert!(
            Instant::now() < deadline,
            "the reservation was never resumed: {now:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ready.identity, reservation.identity, "the same reservation");
    assert_eq!(ready.source_id, None, "still pooled");
    let end = stack_state(&stack, "refill-cut", &ready.identity)
        .await
        .expect("state");
    assert_eq!(pending_operations(&end), 0, "no pending operation left");
    assert_eq!(
        steps_of(&end),
        steps_of(&deployed),
        "the resumed run changed nothing the dead one had deployed"
    );
    wait_locks_free(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_between_the_store_write_and_the_ack() {
    let (mut stack, op) = die_at_failpoint("late", 1, "team-c", "before-ack").await;
    let first = record(&stack, "late", "team-c").await.expect("record");
    assert_eq!(first.status, InstanceStatus::Ready);

    stack.spawn_worker();
    // The redelivery is settled without running anything again.
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(200),
            Duration::from_secs(60)
        )
        .await,
        "the redelivered command was not settled\n{}",
        stack.worker_logs()
    );
    let done = stack.wait_operation(&op, Duration::from_secs(5)).await;
    assert_eq!(done["state"], "SUCCEEDED");
    assert_one_whole_instance(&stack, "late", "team-c", 1).await;
    let after = record(&stack, "late", "team-c").await.expect("record");
    assert_eq!(after.identity, first.identity);
    assert_eq!(after.since, first.since, "the record was not rewritten");

    // One `instance.created` event for the command, not two.
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    let events = js
        .get_stream(cm_core::queue::EVENTS_STREAM)
        .await
        .expect("events stream");
    let consumer = events
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "cm.evt.instance.created.>".into(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    let mut created = 0;
    while let Some(Ok(msg)) = batch.next().await {
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(cm_core::queue::HDR_COMMAND_ID))
            .map(|v| v.as_str().to_owned());
        if id.as_deref() == Some(op.as_str()) {
            created += 1;
        }
    }
    assert_eq!(created, 1, "exactly one instance.created event");
    wait_locks_free(&stack).await;
}

/// A delete whose worker dies right after its transaction (stack destroyed,
/// records gone) and before anything else: the next delivery finds no
/// instance, and must answer what the first would have, "deleted" (it used
/// to answer "not found" and record the command as failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_right_after_a_delete_answers_deleted_on_redelivery() {
    let mut stack = Stack::start(1).await;
    create_challenge(&stack, "gone", json!({"steps": "1"})).await;
    let created = queue_instance(&stack, "gone", "team-d").await;
    let done = stack
        .wait_operation(&created, Duration::from_secs(60))
        .await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    stack.kill_worker(0);
    stack.spawn_worker_with(&[SHORT_LEASE, ("CM_FAILPOINT", "instance-delete-after-write")]);
    let op = stack
        .submit_async(Method::DELETE, "/api/v1/instance/gone/team-d", None)
        .await;
    stack
        .wait_worker_exit(1, Duration::from_secs(60), "the failpoint never fired")
        .await;
    assert!(record(&stack, "gone", "team-d").await.is_none(), "deleted");

    stack.spawn_worker();
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(200),
            Duration::from_secs(60)
        )
        .await,
        "the redelivered delete was not settled\n{}",
        stack.worker_logs()
    );
    let done = stack.wait_operation(&op, Duration::from_secs(5)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    assert_eq!(
        count_keys(&stack, "/cm/stack/gone/").await,
        0,
        "no stack state left"
    );
    wait_locks_free(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_create_leaves_nothing_and_the_next_create_works() {
    let stack = Stack::start(1).await;
    // Fails after deploying two steps.
    create_challenge(&stack, "flaky", json!({"steps": "4", "fail_at": "2"})).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "flaky", "sourceId": "team-d"})),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        stack.worker_logs().contains("step 2 fails on purpose"),
        "the scenario's own error is in the worker's log"
    );
    assert!(
        record(&stack, "flaky", "team-d").await.is_none(),
        "nothing registered"
    );
    assert_eq!(
        count_keys(&stack, "/cm/stack/flaky/").await,
        0,
        "nothing deployed"
    );

    // The same source creates again once the challenge no longer fails.
    let (status, body) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/flaky",
            Some(json!({"additional": {"steps": "4"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "flaky", "sourceId": "team-d"})),
        )
        .await;
    assert_one_whole_instance(&stack, "flaky", "team-d", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_stuck_in_a_failed_state_can_be_force_deleted() {
    let stack = Stack::start_with(1, &[("CM_MAX_DELIVER", "2")]).await;
    create_challenge(&stack, "stuck", json!({"steps": "2"})).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "stuck", "sourceId": "team-e"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Its stack state is lost: no destroy can run any more.
    let rec = record(&stack, "stuck", "team-e").await.expect("record");
    stack
        .store
        .put_stack(
            "stuck",
            &rec.identity,
            cm_core::store::PointerWrite {
                pointer: &cm_core::stack_store::StatePointer {
                    object: "gone".into(),
                    sha256: "00".into(),
                    size: 1,
                    live: false,
                },
                over: stack
                    .store
                    .get_stack_at("stuck", &rec.identity)
                    .await
                    .expect("etcd")
                    .1,
            },
        )
        .await
        .expect("etcd");

    let (status, body) = stack
        .call(Method::DELETE, "/api/v1/instance/stuck/team-e", None)
        .await;
    assert_eq!(status, 500, "a plain delete fails: {body}");
    assert!(
        record(&stack, "stuck", "team-e").await.is_some(),
        "and keeps the records"
    );

    stack
        .call_ok(
            Method::DELETE,
            "/api/v1/instance/stuck/team-e?force=true",
            None,
        )
        .await;
    assert!(record(&stack, "stuck", "team-e").await.is_none());
    assert_eq!(count_keys(&stack, "/cm/stack/stuck/").await, 0);
    assert!(
        stack.worker_logs().contains("forced delete"),
        "the worker says what it left behind"
    );
    // The source can deploy again.
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "stuck", "sourceId": "team-e"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_locks_free(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_published_twice_with_one_id_has_one_effect() {
    use cm_schemas::v1::{Command, CreateInstanceRequest, command::Request};
    use prost::Message as _;

    let stack = Stack::start(1).await;
    create_challenge(&stack, "twice", json!({"steps": "1"})).await;
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    let command = Command {
        command_id: "0192-same-id".into(),
        issued_at: Some(cm_core::model::now()),
        requested_by: None,
        request: Some(Request::InstanceCreate(CreateInstanceRequest {
            challenge_id: "twice".into(),
            source_id: "team-f".into(),
            additional: Default::default(),
        })),
    };
    let subject =
        cm_core::queue::command_subject(cm_core::queue::CommandKind::InstanceCreate, "twice");
    let mut duplicates = Vec::new();
    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(cm_core::queue::HDR_MSG_ID, command.command_id.as_str());
        let ack = js
            .publish_with_headers(subject.clone(), headers, command.encode_to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        duplicates.push(ack.duplicate);
    }
    assert_eq!(duplicates, [false, true], "JetStream drops the second copy");
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(100),
            Duration::from_secs(60)
        )
        .await,
        "{}",
        stack.worker_logs()
    );
    let done = stack
        .wait_operation(&command.command_id, Duration::from_secs(30))
        .await;
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    assert_one_whole_instance(&stack, "twice", "team-f", 1).await;
}

/// A record write whose answer is lost may still be applied afterwards:
/// etcd applies a request its dead leader held once the next leader is
/// elected, possibly after the writer read back and found nothing. The
/// writer must keep the state object such a late write names. Before the
/// fix its read back said "not written" and the object was removed; the
/// late write then left a record whose stack state was missing for good,
/// a stack no delete or reclaim could destroy (the 30-minute soak, seed
/// `1796178929612929049`, left 13 of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_write_applied_after_its_answer_was_lost_keeps_its_state() {
    let stack = Stack::start_with(1, &[("CM_FAILPOINT", "lose-answer:instance-write")]).await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "late", "scenario": "identity"})),
        )
        .await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "late", "sourceId": "team-l"})),
        )
        .await;
    assert!(
        stack
            .worker_logs()
            .contains("a record write's answer was lost and the write applied late"),
        "the failpoint fired\n{}",
        stack.worker_logs()
    );
    assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
    let rec = record(&stack, "late", "team-l")
        .await
        .expect("the instance exists");
    assert_state_reads_back(&stack, "late", &rec.identity).await;
    assert!(
        matches!(
            stack.store.get_stack("late", &rec.identity).await,
            Ok(Some(cm_core::store::StoredStack::Pointer(_)))
        ),
        "a pointer, not an inline state"
    );
    stack
        .call_ok(Method::DELETE, "/api/v1/instance/late/team-l", None)
        .await;
    assert!(record(&stack, "late", "team-l").await.is_none(), "deleted");
}

/// A run's first checkpoint pointer write loses its answer (the run writes
/// it again at its next checkpoint, then its final state replaces it and
/// removes the run's object); etcd applies the lost write after that final
/// write. Guarded by the revision it was sent over, it must fail: applied,
/// it would point the stack back at the run's removed object (a state no
/// delete could read, as the soak found) or at an older state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_pointer_applied_after_the_final_state_is_refused() {
    let stack = Stack::start_with(
        1,
        &[
            ("CM_FAILPOINT", "lose-answer:checkpoint-pointer"),
            ("CM_CHECKPOINT_INTERVAL", "1s"),
        ],
    )
    .await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({
                "id": "latecp", "scenario": "steps",
                "additional": {"steps": "4", "step_ms": "1200"}
            })),
        )
        .await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "latecp", "sourceId": "team-c"})),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = stack.worker_logs();
        if logs.contains("a checkpoint pointer write whose answer was lost applied late") {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "the late checkpoint pointer write never came\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rec = record(&stack, "latecp", "team-c")
        .await
        .expect("the instance exists");
    match stack.store.get_stack("latecp", &rec.identity).await {
        Ok(Some(cm_core::store::StoredStack::Pointer(p))) => {
            assert!(
                !p.live,
                "the pointer names a run's checkpoint, not the final state: {p:?}"
            )
        }
        other => panic!("no pointer for the instance: {other:?}"),
    }
    assert_state_reads_back(&stack, "latecp", &rec.identity).await;
    assert!(
        logs.contains("applied=false"),
        "the late write went through\n{logs}"
    );
    stack
        .call_ok(Method::DELETE, "/api/v1/instance/latecp/team-c", None)
        .await;
    assert!(
        record(&stack, "latecp", "team-c").await.is_none(),
        "deleted"
    );
}

/// The stack state the instance's pointer names reads back whole.
async fn assert_state_reads_back(stack: &Stack, cid: &str, identity: &cm_core::Identity) {
    match stack.read_stack_state(cid, identity).await {
        Some(Ok(_)) => {}
        Some(Err(e)) => panic!(
            "the recorded stack state does not read back: {e}\n{}",
            stack.worker_logs()
        ),
        None => panic!("no stack key for the instance"),
    }
}

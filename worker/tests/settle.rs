//! How commands are settled when deliveries race (issue 15, the queue half):
//! each test holds one delivery at a named pause point of a real worker
//! process (`CM_FAILPOINT=pause:<point>`, see `worker/src/failpoint.rs`) while another worker
//! settles the command, then lets the first go on, and checks that
//!
//! - a busy worker pulls no command it cannot start (no prefetch: a command
//!   buffered behind a long one is not handled twice);
//! - every delivery, the first included, answers what was recorded, and a
//!   result is recorded once (I4: one answer per command);
//! - a command whose last delivery is lost is dead-lettered with its reason,
//!   answered, and the reservation it left undone (I5);
//! - the API's pending record never replaces a recorded result;
//! - a client's retry with the same `Idempotency-Key` has one effect and
//!   the same answer;
//! - the workers' consumer follows the workers' flags;
//! - a challenge update does not hold the permit its instances' updates need.

mod support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cm_core::{
    model::{ChallengeRecord, InstanceStatus},
    queue::{self, CommandKind},
    store::Expect,
};
use cm_schemas::v1::{
    Command, CommandResult, DeleteChallengeRequest, Operation, command::Request,
    command_result::Outcome, operation::State,
};
use futures::StreamExt;
use prost::Message as _;
use reqwest::Method;
use serde_json::json;
use support::Stack;

const REPLIES: &str = "test-replies";

/// A challenge record written straight to the store: deleting it runs no
/// Pulumi (it has no instances), and a second run of that delete answers
/// "not found", so two runs are told apart by their answers.
async fn seed_challenge(stack: &Stack, id: &str) {
    let rec = ChallengeRecord {
        id: id.into(),
        scenario: "identity".into(),
        timeout: None,
        until: None,
        additional: Default::default(),
        min: 0,
        max: 0,
        max_per_source: None,
        pool: Default::default(),
    };
    stack
        .store
        .put_challenge(&rec, Expect::Absent)
        .await
        .expect("seed challenge");
}

async fn jetstream(stack: &Stack) -> (async_nats::Client, async_nats::jetstream::Context) {
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client.clone());
    queue::ensure_streams(&js, &Default::default())
        .await
        .expect("streams");
    (client, js)
}

/// Publishes `challenge.delete <cid>` as command `id`, its result sent to
/// `test-replies.<id>`.
async fn publish_delete(js: &async_nats::jetstream::Context, id: &str, cid: &str) {
    let command = Command {
        command_id: id.into(),
        issued_at: Some(cm_core::model::now()),
        requested_by: None,
        request: Some(Request::ChallengeDelete(DeleteChallengeRequest {
            id: cid.into(),
        })),
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(queue::HDR_MSG_ID, id);
    headers.insert(queue::HDR_REPLY, format!("{REPLIES}.{id}"));
    js.publish_with_headers(
        queue::command_subject(CommandKind::ChallengeDelete, cid),
        headers,
        command.encode_to_vec().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// The pause directory's marker files.
fn reached(dir: &Path, point: &str) -> PathBuf {
    dir.join(format!("{point}.paused"))
}

fn release(dir: &Path, point: &str) {
    std::fs::write(dir.join(format!("{point}.resume")), b"").expect("resume");
}

/// Waits until `n` commands are paused at `point`; their ids.
async fn wait_paused(stack: &Stack, dir: &Path, point: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(detail) = std::fs::read_to_string(reached(dir, point)) {
            let mut ids: Vec<String> = detail.lines().map(str::to_owned).collect();
            if ids.len() >= n {
                ids.sort();
                return ids;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no worker reached {point}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The operation record of command `id`, once it is settled.
async fn wait_settled(stack: &Stack, id: &str, limit: Duration) -> Operation {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(record) = stack.store.get_operation(id).await.expect("etcd")
            && record.is_settled()
        {
            return record.into_operation();
        }
        assert!(
            Instant::now() < deadline,
            "command {id} not settled after {limit:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_deleted(result: &CommandResult) -> bool {
    matches!(result.outcome, Some(Outcome::Deleted(_)))
}

/// Replies received on `sub` until one for `until_id` came (or the limit);
/// each as (command id, result).
async fn replies_until(
    sub: &mut async_nats::Subscriber,
    until_id: &str,
    limit: Duration,
) -> Vec<(String, CommandResult)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let id = msg
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let result = CommandResult::decode(msg.payload).expect("a CommandResult");
        let done = id == until_id;
        out.push((id, result));
        if done {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_worker_pulls_no_command_it_cannot_start() {
    let pauses = tempfile::tempdir().expect("tempdir");
    let dir = pauses.path().to_str().expect("utf-8").to_owned();
    let mut stack = Stack::start(0).await;
    let (client, js) = jetstream(&stack).await;
    let mut replies = client
        .subscribe(format!("{REPLIES}.>"))
        .await
        .expect("subscribe");
    for cid in ["p1a", "p1b", "p2", "p3"] {
        seed_challenge(&stack, cid).await;
    }
    // Worker 0 runs two commands at a time, and both stop in their handler.
    stack.spawn_worker_with(&[
        ("CM_WORKER_CONCURRENCY", "2"),
        ("CM_ACK_WAIT", "2s"),
        ("CM_FAILPOINT", "pause:handler-start"),
        ("CM_FAILPOINT_DIR", &dir),
    ]);
    publish_delete(&js, "cmd-p1a", "p1a").await;
    publish_delete(&js, "cmd-p1b", "p1b").await;
    assert_eq!(
        wait_paused(&stack, pauses.path(), "handler-start", 2).await,
        ["cmd-p1a", "cmd-p1b"]
    );

    // Queued behind them: worker 0 has no permit for it, so it must leave it
    // to worker 1 (at 4cf2e04 it pulled it into a buffer, where its ack
    // wait ran out and worker 1 got a second copy).
    publish_delete(&js, "cmd-p2", "p2").await;
    stack.spawn_worker_with(&[("CM_ACK_WAIT", "2s")]);
    let op = wait_settled(&stack, "cmd-p2", Duration::from_secs(60)).await;
    assert_eq!(op.state, State::Succeeded as i32, "{op:?}");

    // Worker 0 goes on with what it holds (worker 1 keeps running, so it
    // acknowledges what it settled: no legitimate redelivery of p2).
    release(pauses.path(), "handler-start");
    publish_delete(&js, "cmd-p3", "p3").await;
    let mut got = replies_until(&mut replies, "cmd-p3", Duration::from_secs(60)).await;
    assert!(
        got.iter().any(|(id, r)| id == "cmd-p3" && is_deleted(r)),
        "{got:?}\n{}",
        stack.worker_logs()
    );
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(100),
            Duration::from_secs(30)
        )
        .await
    );
    // Stragglers: a copy buffered by worker 0 runs right after its release.
    got.extend(replies_until(&mut replies, "none", Duration::from_secs(2)).await);
    let p2: Vec<_> = got.iter().filter(|(id, _)| id == "cmd-p2").collect();
    assert_eq!(
        p2.len(),
        1,
        "the queued command was handled once, not also from worker 0's buffer: {p2:?}"
    );
    assert!(is_deleted(&p2[0].1), "{p2:?}");
    // Every answer to the held commands is the same.
    for (id, r) in got.iter().filter(|(id, _)| id.starts_with("cmd-p1")) {
        assert!(is_deleted(r), "{id}: {r:?}\n{}", stack.worker_logs());
    }
    let op = wait_settled(&stack, "cmd-p2", Duration::from_secs(5)).await;
    assert_eq!(
        op.state,
        State::Succeeded as i32,
        "never overwritten: {op:?}"
    );
}

/// One delivery of a `challenge.delete` held at `point` past its ack wait;
/// another worker settles the redelivery; the held one then goes on. Every
/// answer must be the recorded one (deleted), the record never overwritten.
async fn held_delivery_answers_the_settled_result(point: &str) {
    let pauses = tempfile::tempdir().expect("tempdir");
    let dir = pauses.path().to_str().expect("utf-8").to_owned();
    let armed = format!("pause:{point}");
    let mut stack = Stack::start(0).await;
    let (client, js) = jetstream(&stack).await;
    let mut replies = client
        .subscribe(format!("{REPLIES}.>"))
        .await
        .expect("subscribe");
    seed_challenge(&stack, "held").await;
    stack.spawn_worker_with(&[
        ("CM_ACK_WAIT", "2s"),
        ("CM_FAILPOINT", &armed),
        ("CM_FAILPOINT_DIR", &dir),
    ]);
    publish_delete(&js, "cmd-held", "held").await;
    assert_eq!(
        wait_paused(&stack, pauses.path(), point, 1).await,
        ["cmd-held"]
    );

    // Its ack wait runs out (no progress acks before the handler starts):
    // worker 1 gets the second delivery and settles it.
    stack.spawn_worker_with(&[("CM_ACK_WAIT", "2s")]);
    let op = wait_settled(&stack, "cmd-held", Duration::from_secs(60)).await;
    assert_eq!(op.state, State::Succeeded as i32, "{op:?}");
    stack.kill_worker(1);

    // The held first delivery goes on.
    release(pauses.path(), point);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the held delivery never answered: {got:?}\n{}",
            stack.worker_logs()
        );
        got.extend(replies_until(&mut replies, "none", Duration::from_millis(500)).await);
    }
    for (id, r) in &got {
        assert!(
            is_deleted(r),
            "every delivery answers what was recorded, {id} got {r:?}\n{}",
            stack.worker_logs()
        );
    }
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(100),
            Duration::from_secs(30)
        )
        .await
    );
    let op = wait_settled(&stack, "cmd-held", Duration::from_secs(5)).await;
    assert_eq!(
        op.state,
        State::Succeeded as i32,
        "a settled record is never overwritten: {op:?}\n{}",
        stack.worker_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_delivery_held_before_the_settled_check_answers_the_recorded_result() {
    held_delivery_answers_the_settled_result("received").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_settling_second_answers_the_first_result_and_keeps_the_record() {
    held_delivery_answers_the_settled_result("handler-start").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_apis_pending_record_never_replaces_a_recorded_result() {
    // No worker: the test plays it, recording the result without replying
    // (a reply lost while the API reconnects), so the API's wait times out
    // on a command that is in fact finished.
    let stack = Stack::start_custom(0, &[], |c| {
        c.result_timeout = Duration::from_millis(800);
    })
    .await;
    seed_challenge(&stack, "gone").await;
    let (client, _js) = jetstream(&stack).await;
    let mut commands = client.subscribe("cm.cmd.>").await.expect("subscribe");
    let store = stack.store.clone();
    let worker = tokio::spawn(async move {
        let msg = commands.next().await.expect("the command");
        let command = Command::decode(msg.payload).expect("command");
        let record = cm_core::protocol::OperationRecord::settled(
            &command,
            CommandResult {
                command_id: command.command_id.clone(),
                finished_at: Some(cm_core::model::now()),
                outcome: Some(Outcome::Deleted(Default::default())),
            },
        );
        assert_eq!(record.operation().kind, "challenge.delete");
        store.put_operation(&record, 0).await.expect("record");
        command.command_id
    });
    let (status, body) = stack
        .call(Method::DELETE, "/api/v1/challenge/gone", None)
        .await;
    let id = worker.await.expect("fake worker");
    let op = wait_settled(&stack, &id, Duration::from_secs(2)).await;
    assert_eq!(
        op.state,
        State::Succeeded as i32,
        "the recorded result survives the API's timeout: {op:?}"
    );
    assert_eq!(
        status, 200,
        "the timed-out wait answers the recorded result: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_whose_last_delivery_is_lost_is_dead_lettered_and_its_reservation_undone() {
    let mut stack = Stack::start_with(0, &[("CM_MAX_DELIVER", "1"), ("CM_ACK_WAIT", "2s")]).await;
    stack.spawn_worker();
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "lost", "scenario": "identity"})),
        )
        .await;
    stack.kill_worker(0);
    // The only delivery allowed dies after Pulumi deployed, before the
    // record says ready: a `deploying` reservation with a stack behind it.
    stack.spawn_worker_with(&[("CM_LEASE_TTL", "3"), ("CM_FAILPOINT", "after-up")]);
    let op_id = stack
        .submit_async(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "lost", "sourceId": "team-l"})),
        )
        .await;
    stack
        .wait_worker_exit(1, Duration::from_secs(120), "after-up never fired")
        .await;
    let reservation = stack
        .store
        .get_instance("lost", "team-l")
        .await
        .expect("etcd")
        .expect("the reservation");
    assert_eq!(reservation.value.status, InstanceStatus::Deploying);

    // A healthy worker: the command is over its bound, so it is set aside
    // with its reason and answered, and the reservation is destroyed.
    stack.spawn_worker();
    let op = wait_settled(&stack, &op_id, Duration::from_secs(60)).await;
    assert_eq!(op.state, State::Failed as i32, "{op:?}");
    let (client, js) = jetstream(&stack).await;
    drop(client);
    let letters = js
        .get_stream(queue::DEAD_LETTERS_STREAM)
        .await
        .expect("dead letters");
    let letter = letters.get_raw_message(1).await.expect("a dead letter");
    let reason = letter
        .headers
        .get(queue::HDR_FAILURE_REASON)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(reason.contains("lost"), "{reason}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while stack
        .store
        .get_instance("lost", "team-l")
        .await
        .expect("etcd")
        .is_some()
        || stack
            .store
            .get_stack("lost", &reservation.value.identity)
            .await
            .expect("etcd")
            .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the reservation was not undone\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(200),
            Duration::from_secs(30)
        )
        .await,
        "nothing left in the command stream"
    );
    // The source can deploy again.
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "lost", "sourceId": "team-l"})),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_brings_the_consumer_to_its_flags() {
    let mut stack = Stack::start(0).await;
    let (_client, js) = jetstream(&stack).await;
    // The consumer as 4cf2e04 made it: JetStream's own delivery bound.
    js.get_stream(queue::COMMANDS_STREAM)
        .await
        .expect("stream")
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(queue::WORKERS_CONSUMER.into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(20),
            max_deliver: 5,
            max_ack_pending: 256,
            filter_subject: "cm.cmd.>".into(),
            ..Default::default()
        })
        .await
        .expect("old consumer");
    stack.spawn_worker_with(&[("CM_ACK_WAIT", "30s")]);
    let ack_wait = |js: async_nats::jetstream::Context| async move {
        let stream = js.get_stream(queue::COMMANDS_STREAM).await.ok()?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(queue::WORKERS_CONSUMER).await.ok()?;
        let config = consumer.info().await.ok()?.config.clone();
        // Unbounded redelivery: the worker dead-letters at its own bound.
        (config.max_deliver == -1).then_some(config.ack_wait)
    };
    let wait_for = |want: Duration| {
        let js = js.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let have = ack_wait(js.clone()).await;
                if have == Some(want) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "ack wait {have:?}, want {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(Duration::from_secs(30)).await;
    stack.kill_worker(0);
    stack.spawn_worker_with(&[("CM_ACK_WAIT", "3s")]);
    wait_for(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_the_same_idempotency_key_has_one_effect_and_the_same_answer() {
    let stack = Stack::start(1).await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "idem", "scenario": "identity"})),
        )
        .await;
    let create = json!({"challengeId": "idem", "sourceId": "team-i"});
    let key = [("Idempotency-Key", "create-team-i-1")];

    // Two copies at once (a client retrying before the first answered).
    let (a, b) = tokio::join!(
        stack.call_with(Method::POST, "/api/v1/instance", Some(create.clone()), &key),
        stack.call_with(Method::POST, "/api/v1/instance", Some(create.clone()), &key),
    );
    assert_eq!(a.0, 200, "{}\n{}", a.1, stack.worker_logs());
    assert_eq!(a, b, "both copies get the same answer");
    // A later retry: the same answer again, not "already exists".
    let c = stack
        .call_with(Method::POST, "/api/v1/instance", Some(create.clone()), &key)
        .await;
    assert_eq!(c, a, "a retry is answered as the first request was");
    assert_eq!(
        stack
            .store
            .list_instances("idem")
            .await
            .expect("etcd")
            .len(),
        1,
        "one effect"
    );
    // Another key is another command.
    let (status, body) = stack
        .call_with(
            Method::POST,
            "/api/v1/instance",
            Some(create.clone()),
            &[("Idempotency-Key", "create-team-i-2")],
        )
        .await;
    assert_eq!(status, 409, "{body}");

    // A delete retried after it succeeded answers success, not 404.
    let key = [("Idempotency-Key", "delete-team-i-1")];
    let first = stack
        .call_with(Method::DELETE, "/api/v1/instance/idem/team-i", None, &key)
        .await;
    assert_eq!(first.0, 200, "{}", first.1);
    let retry = stack
        .call_with(Method::DELETE, "/api/v1/instance/idem/team-i", None, &key)
        .await;
    assert_eq!(retry, first);
    let plain = stack
        .call(Method::DELETE, "/api/v1/instance/idem/team-i", None)
        .await;
    assert_eq!(plain.0, 404, "without the key it is a new command");

    // The NATS front door: the same header, the same promise.
    let (client, _js) = jetstream(&stack).await;
    let ask = || {
        let client = client.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Idempotency-Key", "create-team-n-1");
            let reply = client
                .request_with_headers(
                    "cm.api.instance.create",
                    headers,
                    serde_json::to_vec(&json!({"challengeId": "idem", "sourceId": "team-n"}))
                        .expect("json")
                        .into(),
                )
                .await
                .expect("NATS reply");
            let failed = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .map(|v| v.as_str().to_owned());
            (failed, reply.payload)
        }
    };
    let first = ask().await;
    assert_eq!(first.0, None, "{:?}", first.1);
    let again = ask().await;
    assert_eq!(again, first, "a NATS retry gets the same answer");

    // A malformed key is refused.
    let (status, _) = stack
        .call_with(
            Method::POST,
            "/api/v1/instance",
            Some(create),
            &[("Idempotency-Key", "has spaces")],
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_challenge_update_on_a_single_permit_worker_finishes() {
    let stack = Stack::start_with(1, &[("CM_WORKER_CONCURRENCY", "1")]).await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "solo", "scenario": "echo-additional", "additional": {"v": "1"}})),
        )
        .await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "solo", "sourceId": "team-s"})),
        )
        .await;
    // The update waits for its instance's update, which needs the only
    // permit: the waiting update must not hold it.
    let update = stack.call(
        Method::PATCH,
        "/api/v1/challenge/solo",
        Some(json!({"additional": {"v": "2"}})),
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), update)
        .await
        .unwrap_or_else(|_| panic!("the update deadlocked\n{}", stack.worker_logs()));
    assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_update_redelivered_after_its_switch_answers_the_switched_instance() {
    use cm_core::{
        Identity,
        model::{InstanceRecord, to_timestamp},
    };
    use cm_schemas::v1::{UpdateInstance, UpdateStrategy};

    let stack = Stack::start(1).await;
    seed_challenge(&stack, "bg").await;
    let (client, js) = jetstream(&stack).await;
    let mut replies = client
        .subscribe(format!("{REPLIES}.>"))
        .await
        .expect("subscribe");
    // The state a blue/green `instance.update` leaves when its worker dies
    // after the switch, before its result is recorded: the source's record
    // names the green identity and this command; the blue one is gone.
    let (blue, green) = (Identity::random(), Identity::random());
    let now = std::time::SystemTime::now();
    let switched = InstanceRecord {
        challenge_id: "bg".into(),
        identity: green.clone(),
        source_id: Some("team-bg".into()),
        status: InstanceStatus::Ready,
        since: to_timestamp(now),
        last_renew: to_timestamp(now),
        until: None,
        connection_info: "green".into(),
        flags: vec!["CTF{green}".into()],
        additional: Default::default(),
        command_id: "cmd-switch".into(),
        deployed_from: None,
    };
    stack
        .store
        .put_instance(&switched, None, Expect::Absent, None)
        .await
        .expect("seed");
    let command = Command {
        command_id: "cmd-switch".into(),
        issued_at: Some(cm_core::model::now()),
        requested_by: None,
        request: Some(Request::InstanceUpdate(UpdateInstance {
            challenge_id: "bg".into(),
            identity: blue.to_string(),
            strategy: UpdateStrategy::BlueGreen as i32,
            parent_command_id: String::new(),
        })),
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(queue::HDR_MSG_ID, "cmd-switch");
    headers.insert(queue::HDR_REPLY, format!("{REPLIES}.cmd-switch"));
    js.publish_with_headers(
        queue::command_subject(CommandKind::InstanceUpdate, "bg"),
        headers,
        command.encode_to_vec().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let got = replies_until(&mut replies, "cmd-switch", Duration::from_secs(30)).await;
    let Some((_, result)) = got.last() else {
        panic!("no answer\n{}", stack.worker_logs());
    };
    match &result.outcome {
        Some(Outcome::Instance(i)) => assert_eq!(i.connection_info, "green"),
        other => panic!("the redelivery answers the switched instance, got {other:?}"),
    }
}

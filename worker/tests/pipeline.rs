//! The command pipeline end to end: REST/NATS -> JetStream -> two worker
//! processes under etcd locks -> Pulumi -> etcd, against real servers.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

fn is_flag(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 21 && s.starts_with("CTF{") && s.ends_with('}'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lifecycle_over_rest() {
    let stack = Stack::start(2).await;
    let body = stack.call_ok(Method::POST, "/api/v1/challenge", Some(json!({ "id": "web-1", "scenario": "identity", "timeout": "600s", "until": null, "updateStrategy": "update_in_place", "additional": {"connection_prefix": "ssh://"} }))).await;
    assert_eq!(body["id"], "web-1");
    assert_eq!(body["timeout"], "600s");

    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "web-1", "sourceId": "team-1"})),
        )
        .await;
    assert_eq!(status, 200, "{created}\n{}", stack.worker_logs());
    let info = created["connectionInfo"]
        .as_str()
        .expect("connectionInfo")
        .to_owned();
    assert!(
        info.starts_with("ssh://nc ") && info.ends_with(".ctf.local 1337"),
        "{info}"
    );
    assert!(is_flag(&created["flags"][0]), "{created}");
    assert_eq!(
        created["flag"], created["flags"][0],
        "deprecated flag mirrors flags[0]"
    );
    assert_eq!(created["sourceId"], "team-1");

    let (status, got) = stack
        .call(Method::GET, "/api/v1/instance/web-1/team-1", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(got["connectionInfo"], info.as_str());

    let resp = stack
        .http
        .get(format!("{}/api/v1/instance?sourceId=team-1", stack.api))
        .send()
        .await
        .expect("query");
    let text = resp.text().await.expect("body");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["result"]["challengeId"], "web-1");

    let until_before = got["until"].as_str().expect("until").to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, renewed) = stack
        .call(Method::PATCH, "/api/v1/instance/web-1/team-1", None)
        .await;
    assert_eq!(status, 200, "{renewed}");
    let until_after = renewed["until"].as_str().expect("until");
    assert!(
        until_after > until_before.as_str(),
        "{until_before} -> {until_after}"
    );

    let identity = stack
        .store
        .get_instance("web-1", "team-1")
        .await
        .expect("store")
        .expect("record")
        .value
        .identity;
    assert!(
        stack
            .store
            .get_stack("web-1", &identity)
            .await
            .expect("store")
            .is_some()
    );

    // Events are retained: they must not carry the flag.
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let events = js
        .get_stream(cm_core::queue::EVENTS_STREAM)
        .await
        .expect("events");
    let flag = created["flags"][0].as_str().expect("flag").to_owned();
    let mut seen = 0;
    for seq in 1..=20 {
        let Ok(msg) = events.get_raw_message(seq).await else {
            break;
        };
        seen += 1;
        assert!(
            !msg.payload
                .windows(flag.len())
                .any(|w| w == flag.as_bytes()),
            "event {} carries the flag",
            msg.subject
        );
    }
    assert!(
        seen >= 2,
        "challenge.created and instance.created events stored"
    );

    let (status, deleted) = stack
        .call(Method::DELETE, "/api/v1/instance/web-1/team-1", None)
        .await;
    assert_eq!((status, deleted), (200, json!({})));
    let (status, missing) = stack
        .call(Method::GET, "/api/v1/instance/web-1/team-1", None)
        .await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["code"], 5);
    assert!(
        stack
            .store
            .get_stack("web-1", &identity)
            .await
            .expect("store")
            .is_none(),
        "stack state gone"
    );

    let (status, _) = stack
        .call(Method::DELETE, "/api/v1/challenge/web-1", None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = stack
        .call(Method::GET, "/api/v1/challenge/web-1", None)
        .await;
    assert_eq!(status, 404);
}

async fn nats_call(
    client: &async_nats::Client,
    endpoint: &str,
    body: Value,
) -> Result<Value, (usize, String)> {
    let resp = client
        .request(
            format!("cm.api.{endpoint}"),
            serde_json::to_vec(&body).expect("json").into(),
        )
        .await
        .expect("NATS request");
    if let Some(headers) = &resp.headers
        && let Some(code) = headers.get("Nats-Service-Error-Code")
    {
        let message = headers
            .get("Nats-Service-Error")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        return Err((code.as_str().parse().unwrap_or(0), message));
    }
    Ok(serde_json::from_slice(&resp.payload).expect("JSON response"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lifecycle_over_the_nats_service() {
    let stack = Stack::start(2).await;
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");

    // Discoverable with the standard $SRV subjects.
    let ping = client
        .request("$SRV.PING.cm", "".into())
        .await
        .expect("ping");
    let ping: Value = serde_json::from_slice(&ping.payload).expect("ping json");
    assert_eq!(ping["name"], "cm");

    let chall = nats_call(
        &client,
        "challenge.create",
        json!({"id": "pwn-2", "scenario": "identity", "timeout": "60s"}),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", stack.worker_logs()));
    assert_eq!(chall["id"], "pwn-2");
    let dup = nats_call(
        &client,
        "challenge.create",
        json!({"id": "pwn-2", "scenario": "identity"}),
    )
    .await;
    assert_eq!(dup.map_err(|e| e.0), Err(409));

    let inst = nats_call(
        &client,
        "instance.create",
        json!({"challengeId": "pwn-2", "sourceId": "player-9"}),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", stack.worker_logs()));
    assert!(is_flag(&inst["flags"][0]));
    let got = nats_call(
        &client,
        "instance.get",
        json!({"challengeId": "pwn-2", "sourceId": "player-9"}),
    )
    .await
    .expect("get");
    assert_eq!(got["connectionInfo"], inst["connectionInfo"]);
    let list = nats_call(&client, "instance.list", json!({"sourceId": "player-9"}))
        .await
        .expect("list");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let renewed = nats_call(
        &client,
        "instance.renew",
        json!({"challengeId": "pwn-2", "sourceId": "player-9"}),
    )
    .await
    .expect("renew");
    assert!(renewed["until"].as_str() >= inst["until"].as_str());
    nats_call(
        &client,
        "instance.delete",
        json!({"challengeId": "pwn-2", "sourceId": "player-9"}),
    )
    .await
    .expect("delete");
    let gone = nats_call(
        &client,
        "instance.get",
        json!({"challengeId": "pwn-2", "sourceId": "player-9"}),
    )
    .await;
    assert_eq!(gone.map_err(|e| e.0), Err(404));

    // Same validation and errors as REST.
    let bad = nats_call(
        &client,
        "instance.create",
        json!({"challengeId": "a/b", "sourceId": "x"}),
    )
    .await;
    let (code, message) = bad.expect_err("refused");
    assert_eq!(code, 400);
    assert!(
        message.contains("challenge id must not contain '/'"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_for_one_source_give_one_instance() {
    let stack = Stack::start(2).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "race", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    let body = json!({"challengeId": "race", "sourceId": "team-7"});
    let (a, b) = tokio::join!(
        stack.call(Method::POST, "/api/v1/instance", Some(body.clone())),
        stack.call(Method::POST, "/api/v1/instance", Some(body.clone())),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}\n{}", stack.worker_logs());
    let loser = if a.0 == 409 { a.1 } else { b.1 };
    assert_eq!(loser["code"], 6, "ALREADY_EXISTS: {loser}");

    let instances = stack.store.list_instances("race").await.expect("store");
    assert_eq!(instances.len(), 1, "exactly one instance record");
    let winner = &instances[0];
    assert!(
        stack
            .store
            .get_stack("race", &winner.identity)
            .await
            .expect("store")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_challenge_during_creates_leaves_no_orphan() {
    let stack = Stack::start(2).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "doomed", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    // Queue creates without waiting, then delete at once.
    for n in 0..6 {
        let (status, body) = stack
            .call_with(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "doomed", "sourceId": format!("team-{n}")})),
                &[("Prefer", "respond-async")],
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert!(body["operationId"].is_string());
    }
    stack
        .call_ok(Method::DELETE, "/api/v1/challenge/doomed", None)
        .await;

    // Creates that ran after the delete fail with NotFound; wait for the queue to drain.
    support::wait_drained(
        &stack.nats.url,
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(60),
    )
    .await;
    assert!(
        stack
            .store
            .get_challenge("doomed")
            .await
            .expect("store")
            .is_none()
    );
    let left = stack.store.list_instances("doomed").await.expect("store");
    assert!(left.is_empty(), "orphan records: {left:?}");
    let client = stack.store.client();
    let stacks = client
        .clone()
        .get(
            "/cm/stack/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .expect("etcd");
    assert_eq!(
        stacks.count(),
        0,
        "orphan stack states\n{}",
        stack.worker_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason_and_nothing_is_published_or_written() {
    let stack = Stack::start(0).await;
    let long = "x".repeat(10 * 1024);
    let cases: Vec<(Method, &str, Value, u16, &str)> = vec![
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "", "scenario": "identity"}),
            400,
            "challenge id must not be empty",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": long, "scenario": "identity"}),
            400,
            "maximum is 256",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "a/b", "scenario": "identity"}),
            400,
            "must not contain '/'",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "..", "scenario": "identity"}),
            400,
            "'..'",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "a\u{1}b", "scenario": "identity"}),
            400,
            "control characters",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "c", "scenario": "../../etc"}),
            400,
            "without '..'",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "c", "scenario": "identity", "min": -1}),
            400,
            "must not be negative",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "c", "scenario": "identity", "max": "-3"}),
            400,
            "must not be negative",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "c", "scenario": "identity", "timeout": "10 minutes"}),
            400,
            "invalid request",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "c", "scenario": "identity", "until": "yesterday"}),
            400,
            "invalid request",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": 42, "scenario": "identity"}),
            400,
            "invalid request",
        ),
        (
            Method::POST,
            "/api/v1/challenge",
            json!({"id": "c", "scenario": "identity", "additional": ["x"]}),
            400,
            "invalid request",
        ),
        (
            Method::POST,
            "/api/v1/instance",
            json!({"challengeId": "nope", "sourceId": "t"}),
            404,
            "challenge nope not found",
        ),
        (
            Method::POST,
            "/api/v1/instance",
            json!({"challengeId": "c", "sourceId": ""}),
            400,
            "source id must not be empty",
        ),
        (
            Method::GET,
            "/api/v1/instance/a%2Fb/t",
            Value::Null,
            400,
            "must not contain '/'",
        ),
        (
            Method::POST,
            "/api/v1/instance",
            json!({"challengeId": "c", "sourceId": ".."}),
            400,
            "source id must not be '.' or '..'",
        ),
        (
            Method::GET,
            "/api/v1/instance/c/a%0Ab",
            Value::Null,
            400,
            "control characters",
        ),
        // Without a sourceId: an empty stream, as chall-manager answers
        // (worker/tests/wire.rs checks it is empty).
        (Method::GET, "/api/v1/instance", Value::Null, 200, ""),
        (
            Method::PATCH,
            "/api/v1/challenge/nope",
            json!({"min": 1}),
            404,
            "challenge nope not found",
        ),
        (
            Method::DELETE,
            "/api/v1/challenge/nope",
            Value::Null,
            404,
            "challenge nope not found",
        ),
    ];
    for (method, path, body, expected_status, expected) in cases {
        let body = (!body.is_null()).then_some(body);
        let (status, resp) = stack.call(method.clone(), path, body.clone()).await;
        assert_eq!(status, expected_status, "{method} {path} {body:?}: {resp}");
        if !expected.is_empty() {
            let message = resp["message"].as_str().unwrap_or_default();
            assert!(message.contains(expected), "{method} {path}: {resp}");
            assert!(resp["code"].is_number(), "grpc-gateway error shape: {resp}");
        }
    }
    for (raw, expected) in [
        (b"{\"id\": \"c\",".to_vec(), "not valid JSON"),
        (b"[]".to_vec(), "JSON object"),
        (vec![0xff, 0xfe, b'{'], "not valid JSON"),
        (
            format!(
                "{{\"id\":\"c\",\"scenario\":\"{}\"}}",
                "y".repeat(1024 * 1024 + 10)
            )
            .into_bytes(),
            "larger than",
        ),
    ] {
        let (status, text) = stack.call_raw(Method::POST, "/api/v1/challenge", raw).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(expected), "{expected}: {text}");
    }

    // Nothing published, nothing written.
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(cm_core::queue::COMMANDS_STREAM)
        .await
        .expect("stream");
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        0,
        "no command published"
    );
    let keys = stack
        .store
        .client()
        .get(
            "/cm/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .expect("etcd");
    assert_eq!(keys.count(), 0, "nothing written to etcd");
}

async fn dead_letters(
    js: &async_nats::jetstream::Context,
    want: u64,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let stream = js
        .get_stream(cm_core::queue::DEAD_LETTERS_STREAM)
        .await
        .expect("dlq stream");
    for _ in 0..300 {
        let mut s = stream.clone();
        if s.info().await.expect("info").state.messages >= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    for seq in 1..=want {
        out.push(stream.get_raw_message(seq).await.expect("dead letter"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_at_once_and_failing_commands_after_their_bound() {
    let stack = Stack::start_with(1, &[("CM_LOCK_TIMEOUT", "1s"), ("CM_MAX_DELIVER", "2")]).await;
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client.clone());

    // 1. Undecodable: dead-lettered on its first delivery, with the reason.
    js.publish("cm.cmd.instance.create.x", "not a protobuf command".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let letters = dead_letters(&js, 1).await;
    let reason = letters[0]
        .headers
        .get(cm_core::queue::HDR_FAILURE_REASON)
        .map(|v| v.as_str().to_owned());
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("undecodable")),
        "{reason:?}"
    );
    assert_eq!(
        letters[0]
            .headers
            .get(cm_core::queue::HDR_DELIVERIES)
            .map(|v| v.as_str()),
        Some("1")
    );

    // 2. Retryable failure: the challenge lock is held elsewhere, so every
    //    delivery times out on it; after max_deliver (2) it is dead-lettered
    //    and the waiting client gets a clear 503.
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "held", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    let mut etcd = stack.store.client();
    let lease = etcd.lease_grant(60, None).await.expect("lease").id();
    let prefix = cm_core::lock::challenge_lock("/cm", "held");
    etcd.put(
        format!("{prefix}w-held-by-test"),
        "",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("hold the lock");
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "held", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 503, "{body}\n{}", stack.worker_logs());
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("set aside for an operator")),
        "{body}"
    );
    let letters = dead_letters(&js, 2).await;
    let reason = letters[1]
        .headers
        .get(cm_core::queue::HDR_FAILURE_REASON)
        .map(|v| v.as_str().to_owned());
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("waiting for the lock")),
        "{reason:?}"
    );
    assert_eq!(
        letters[1]
            .headers
            .get(cm_core::queue::HDR_DELIVERIES)
            .map(|v| v.as_str()),
        Some("2")
    );

    // The consumer moved on: with the lock free again, the next command works.
    etcd.lease_revoke(lease).await.expect("release");
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "held", "sourceId": "s"})),
        )
        .await;
}

/// A caller of the NATS front door that waits (no `Prefer: respond-async`)
/// for a command that outlives the result timeout gets the same "still
/// running" error REST gives (504), never a reply that reads as a success;
/// one that asked for an asynchronous answer gets the pending operation.
/// (The fault soak found the waiting caller told "done" of a delete that
/// had not run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_caller_that_waited_past_the_result_timeout_is_told_it_is_still_running() {
    // No worker: every command outlives the 1 s result timeout.
    let stack = Stack::start_custom(0, &[], |c| {
        c.result_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");
    match nats_call(
        &client,
        "challenge.create",
        json!({"id": "slow-1", "scenario": "identity"}),
    )
    .await
    {
        Err((504, message)) => assert!(
            message.contains("still running"),
            "the error says the command is still running: {message}"
        ),
        other => panic!("a waiting caller was not told the command is still running: {other:?}"),
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Prefer", "respond-async");
    let body = json!({"id": "slow-2", "scenario": "identity"});
    let resp = client
        .request_with_headers(
            "cm.api.challenge.create",
            headers,
            serde_json::to_vec(&body).expect("json").into(),
        )
        .await
        .expect("NATS request");
    assert!(
        resp.headers
            .as_ref()
            .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()),
        "an asynchronous caller is answered without error"
    );
    let accepted: Value = serde_json::from_slice(&resp.payload).expect("JSON response");
    assert_eq!(accepted["state"], "PENDING", "{accepted}");
    assert!(accepted["operationId"].is_string(), "{accepted}");
}

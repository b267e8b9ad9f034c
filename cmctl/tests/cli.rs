//! `cmctl` end to end: the built binary against real nats-server, etcd,
//! Pulumi, the API and workers. Every subcommand is run, its `--output json`
//! parsed and checked, and its exit codes for not found, conflict, bad input
//! and an unreachable API asserted.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Options, Stack};

fn date(text: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenges_and_instances_through_the_rest_api() {
    let stack = Stack::start(1, Options::default()).await;

    // challenge create: the API's JSON back, fields as given.
    let created = stack
        .cmctl(&[
            "challenge",
            "create",
            "--id",
            "web",
            "--scenario",
            "identity",
            "--timeout",
            "10m",
            "--until",
            "2099-01-01T00:00:00Z",
            "--additional",
            "connection_prefix=ssh://",
            "-o",
            "json",
        ])
        .await
        .ok();
    assert!(
        created.stderr.is_empty(),
        "no progress off a terminal: {created:?}"
    );
    let c = created.json();
    assert_eq!(s(&c, "id"), "web");
    assert_eq!(s(&c, "timeout"), "600s");
    assert!(s(&c, "until").starts_with("2099-01-01T00:00:00"), "{c}");
    assert_eq!(c["additional"]["connection_prefix"], "ssh://");

    // Conflict, bad input (the API's own message), bad flag values.
    let again = stack
        .cmctl(&[
            "challenge",
            "create",
            "--id",
            "web",
            "--scenario",
            "identity",
        ])
        .await
        .fails(3);
    assert!(again.stderr.contains("already exists"), "{again:?}");
    let bad = stack
        .cmctl(&[
            "challenge",
            "create",
            "--id",
            "a/b",
            "--scenario",
            "identity",
        ])
        .await
        .fails(1);
    assert!(
        bad.stderr.contains("must not contain '/'") && bad.stderr.contains("HTTP 400"),
        "{bad:?}"
    );
    let bad_pair = stack
        .cmctl(&[
            "challenge",
            "create",
            "--id",
            "x",
            "--scenario",
            "identity",
            "--additional",
            "novalue",
        ])
        .await;
    assert_eq!(bad_pair.code, 1, "{bad_pair:?}");
    assert!(bad_pair.stderr.contains("key=value"), "{bad_pair:?}");

    // get, list (JSON and table).
    let got = stack
        .cmctl(&["challenge", "get", "web", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(s(&got, "scenario"), "identity");
    let missing = stack.cmctl(&["challenge", "get", "nope"]).await.fails(2);
    assert!(
        missing.stderr.contains("challenge nope not found"),
        "{missing:?}"
    );
    let list = stack
        .cmctl(&["challenge", "list", "-o", "json"])
        .await
        .ok()
        .json();
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|c| s(c, "id"))
        .collect();
    assert_eq!(ids, ["web"]);
    let table = stack.cmctl(&["challenge", "list"]).await.ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("SCENARIO"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("web ") && lines[1].contains("identity") && lines[1].contains("600s"),
        "{table}"
    );

    // update: only the fields given change.
    let updated = stack
        .cmctl(&[
            "challenge",
            "update",
            "--id",
            "web",
            "--timeout",
            "20m",
            "--no-until",
            "--strategy",
            "blue_green",
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(s(&updated, "timeout"), "1200s");
    // Unset prints as `null`, as chall-manager's gateway prints it.
    assert_eq!(
        updated.get("until"),
        Some(&serde_json::Value::Null),
        "until removed: {updated}"
    );
    assert_eq!(updated["additional"]["connection_prefix"], "ssh://");
    stack
        .cmctl(&["challenge", "update", "--id", "nope", "--min", "0"])
        .await
        .fails(2);
    stack
        .cmctl(&["challenge", "update", "--id", "web"])
        .await
        .fails(1);

    // instance create: deployed by Pulumi; flags hidden unless asked for.
    let inst = stack
        .cmctl(&[
            "instance",
            "create",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
            "-o",
            "json",
        ])
        .await
        .ok();
    assert!(
        inst.stderr.is_empty(),
        "no progress off a terminal: {inst:?}"
    );
    let inst = inst.json();
    assert!(s(&inst, "connectionInfo").starts_with("ssh://"), "{inst}");
    assert!(
        inst.get("flags").is_none() && inst.get("flag").is_none(),
        "{inst}"
    );
    let conflict = stack
        .cmctl(&[
            "instance",
            "create",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
        ])
        .await
        .fails(3);
    assert!(conflict.stderr.contains("already exists"), "{conflict:?}");
    stack
        .cmctl(&[
            "instance",
            "create",
            "--challenge-id",
            "nope",
            "--source-id",
            "alice",
        ])
        .await
        .fails(2);

    let with_flags = stack
        .cmctl(&[
            "instance",
            "get",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
            "--show-flags",
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert!(
        with_flags["flags"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{with_flags}"
    );
    let shown = stack
        .cmctl(&[
            "instance",
            "get",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
        ])
        .await
        .ok()
        .stdout;
    assert!(
        shown.contains("connection") && shown.contains("ssh://"),
        "{shown}"
    );
    let listed = stack
        .cmctl(&["instance", "list", "--source-id", "alice", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(s(&listed[0], "challengeId"), "web");

    // renew: until moves to now + the new timeout (20m).
    let renewed = stack
        .cmctl(&[
            "instance",
            "renew",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert!(
        date(s(&renewed, "until")) > date(s(&inst, "until")),
        "{renewed} vs {inst}"
    );

    // --async, then operation get.
    let accepted = stack
        .cmctl(&[
            "instance",
            "renew",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
            "--async",
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(s(&accepted, "state"), "PENDING");
    let op_id = s(&accepted, "operationId").to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let op = stack
            .cmctl(&["operation", "get", &op_id, "-o", "json"])
            .await
            .ok()
            .json();
        if s(&op, "state") == "SUCCEEDED" {
            assert_eq!(s(&op, "kind"), "instance.renew");
            break;
        }
        assert_eq!(s(&op, "state"), "PENDING", "{op}");
        assert!(Instant::now() < deadline, "operation never finished: {op}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack
        .cmctl(&["operation", "get", "no-such-operation"])
        .await
        .fails(2);

    // delete on a terminal: the progress line is drawn there.
    let on_tty = stack
        .cmctl_on_tty(&[
            "instance",
            "delete",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
        ])
        .await;
    assert_eq!(on_tty.code, 0, "{on_tty:?}");
    assert!(
        on_tty
            .stdout
            .contains("destroying the instance of web for alice ("),
        "progress shown on a terminal: {on_tty:?}"
    );
    assert!(
        on_tty.stdout.contains("instance of web for alice deleted"),
        "{on_tty:?}"
    );
    stack
        .cmctl(&[
            "instance",
            "get",
            "--challenge-id",
            "web",
            "--source-id",
            "alice",
        ])
        .await
        .fails(2);

    let deleted = stack
        .cmctl(&["challenge", "delete", "web", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(deleted["deleted"], true);
    stack.cmctl(&["challenge", "get", "web"]).await.fails(2);
    stack.cmctl(&["challenge", "delete", "web"]).await.fails(2);

    // An unreachable API is 4.
    let port = cm_testkit::server::free_port();
    let away = stack
        .cmctl(&[
            "--api-url",
            &format!("http://127.0.0.1:{port}"),
            "challenge",
            "list",
        ])
        .await
        .fails(4);
    assert!(away.stderr.contains("cannot reach the API"), "{away:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_status_counts_commands_queued_while_no_worker_runs() {
    let mut stack = Stack::start(0, Options::default()).await;

    // No worker ever ran: no consumer yet, the stream is empty.
    let fresh = stack
        .cmctl(&["queue", "status", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(fresh["queued"], 0, "{fresh}");
    assert_eq!(fresh["workersConsumer"], false, "{fresh}");
    assert_eq!(fresh["deadLetters"], 0, "{fresh}");

    // A worker runs (creating its consumer), then stops.
    stack.start_worker();
    stack
        .cmctl(&[
            "challenge",
            "create",
            "--id",
            "first",
            "--scenario",
            "identity",
        ])
        .await
        .ok();
    stack.stop_workers().await;

    // Three commands queued with nobody to run them.
    let mut operations = Vec::new();
    for n in 0..3 {
        let id = format!("queued-{n}");
        let accepted = stack
            .cmctl(&[
                "challenge",
                "create",
                "--id",
                &id,
                "--scenario",
                "identity",
                "--async",
                "-o",
                "json",
            ])
            .await
            .ok()
            .json();
        operations.push(s(&accepted, "operationId").to_owned());
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = stack
        .cmctl(&["queue", "status", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(status["stream"], "CM_COMMANDS");
    assert_eq!(status["queued"], 3, "{status}");
    assert_eq!(status["pending"], 3, "{status}");
    assert_eq!(status["ackPending"], 0, "{status}");
    assert_eq!(status["workersConsumer"], true, "{status}");
    let age = status["oldestPendingAgeSeconds"].as_f64().expect("age");
    assert!((1.0..60.0).contains(&age), "{status}");
    let consumers = status["consumers"].as_array().expect("consumers");
    assert_eq!(consumers.len(), 1, "{status}");
    assert_eq!(consumers[0]["name"], "cm-workers");
    assert_eq!(consumers[0]["pending"], 3, "{status}");
    let table = stack.cmctl(&["queue", "status"]).await.ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("pending") && l.ends_with(" 3")),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("cm-workers ")),
        "{table}"
    );
    let pending = stack
        .cmctl(&["operation", "get", &operations[2], "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(pending["state"], "PENDING", "{pending}");

    // A worker drains the queue; it then waits for more.
    stack.start_worker();
    let deadline = Instant::now() + Duration::from_secs(60);
    let drained = loop {
        let status = stack
            .cmctl(&["queue", "status", "-o", "json"])
            .await
            .ok()
            .json();
        if status["queued"] == 0 && status["waiting"].as_u64() >= Some(1) {
            break status;
        }
        assert!(Instant::now() < deadline, "never drained: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(drained["pending"], 0, "{drained}");
    assert_eq!(drained["oldestPendingAgeSeconds"], 0.0, "{drained}");
    for op in &operations {
        let done = stack
            .cmctl(&["operation", "get", op, "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(done["state"], "SUCCEEDED", "{done}");
    }

    // NATS away is 4.
    let port = cm_testkit::server::free_port();
    stack
        .cmctl(&[
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
            "queue",
            "status",
        ])
        .await
        .fails(4);
}

/// The dead letters as `cmctl dlq list -o json` reports them.
async fn letters(stack: &Stack) -> Vec<Value> {
    stack
        .cmctl(&["dlq", "list", "-o", "json"])
        .await
        .ok()
        .json()
        .as_array()
        .cloned()
        .expect("array")
}

/// Waits until a dead letter of `kind` other than `known` appears.
async fn new_letter(stack: &Stack, kind: &str, known: &[u64]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(l) = letters(stack)
            .await
            .into_iter()
            .find(|l| l["kind"] == kind && !known.contains(&l["sequence"].as_u64().unwrap_or(0)))
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no new {kind} dead letter");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_deleted() {
    const WINDOW: Duration = Duration::from_secs(10);
    let stack = Stack::start(
        1,
        Options {
            duplicate_window: WINDOW,
            max_deliver: 2,
            lock_timeout: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await;
    let nats = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(nats);

    // 1. An undecodable command, with a secret in its headers.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "poison-1");
    headers.insert("Authorization", "Bearer s3cr3t-token");
    js.publish_with_headers(
        "cm.cmd.challenge.create.x",
        headers,
        "not a protobuf command".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let poison = new_letter(&stack, "unknown", &[]).await;
    let poison_seq = poison["sequence"].as_u64().expect("seq");
    assert!(s(&poison, "reason").contains("undecodable"), "{poison}");

    // 2. A command that fails every delivery: its challenge lock is held.
    stack
        .cmctl(&[
            "challenge",
            "create",
            "--id",
            "held",
            "--scenario",
            "identity",
        ])
        .await
        .ok();
    let mut etcd = stack.store.client();
    let lease = etcd.lease_grant(120, None).await.expect("lease").id();
    etcd.put(
        format!(
            "{}w-held-by-test",
            cm_core::lock::challenge_lock("/cm", "held")
        ),
        "",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("hold the lock");
    let published = Instant::now();
    let refused = stack
        .cmctl(&[
            "instance",
            "create",
            "--challenge-id",
            "held",
            "--source-id",
            "s",
        ])
        .await
        .fails(4);
    assert!(
        refused.stderr.contains("set aside for an operator"),
        "{refused:?}"
    );
    let letter = new_letter(&stack, "instance.create", &[]).await;
    let seq = letter["sequence"].as_u64().expect("seq");
    let seq_text = seq.to_string();
    let command_id = s(&letter, "commandId").to_owned();

    // list: both, with what an operator needs to tell them apart.
    let all = letters(&stack).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(s(&letter, "subject"), "cm.dlq.instance.create.held");
    assert_eq!(s(&letter, "challengeId"), "held");
    assert_eq!(letter["deliveries"], 2, "{letter}");
    assert!(
        s(&letter, "reason").contains("waiting for the lock"),
        "{letter}"
    );
    assert_eq!(s(&letter, "originalSubject"), "cm.cmd.instance.create.held");
    date(s(&letter, "time"));
    let table = stack.cmctl(&["dlq", "list"]).await.ok().stdout;
    assert!(table.starts_with("SEQ "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{seq} ")) && l.contains("instance.create")),
        "{table}"
    );

    // show: headers without secrets, the command decoded.
    let shown = stack
        .cmctl(&["dlq", "show", &poison_seq.to_string(), "-o", "json"])
        .await
        .ok()
        .json();
    let names: Vec<String> = shown["headers"]
        .as_object()
        .expect("headers")
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    assert!(!names.contains(&"authorization".to_owned()), "{shown}");
    assert!(!shown.to_string().contains("s3cr3t"), "{shown}");
    assert!(names.contains(&"cm-failure-reason".to_owned()), "{shown}");
    assert!(shown["command"].is_null(), "{shown}");
    assert!(s(&shown, "decodeError").contains("undecodable"), "{shown}");
    let shown = stack
        .cmctl(&["dlq", "show", &seq_text, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(s(&shown["command"], "commandId"), command_id);
    assert_eq!(shown["command"]["instanceCreate"]["challengeId"], "held");
    assert_eq!(shown["command"]["instanceCreate"]["sourceId"], "s");
    assert_eq!(shown["headers"]["cm-original-msg-id"], command_id.as_str());
    let text = stack.cmctl(&["dlq", "show", &seq_text]).await.ok().stdout;
    assert!(
        text.contains("command:") && text.contains("instanceCreate"),
        "{text}"
    );
    stack.cmctl(&["dlq", "show", "999"]).await.fails(2);

    // replay: an undecodable letter cannot be; a command still inside the
    // de-duplication window would be dropped, so it is refused and kept.
    stack
        .cmctl(&["dlq", "replay", &poison_seq.to_string()])
        .await
        .fails(1);
    assert!(
        published.elapsed() < WINDOW,
        "the machine is too slow for this test: the dead letter took {:?}",
        published.elapsed()
    );
    let early = stack.cmctl(&["dlq", "replay", &seq_text]).await.fails(3);
    assert!(early.stderr.contains("duplicate"), "{early:?}");
    assert_eq!(letters(&stack).await.len(), 2, "the letter stays");

    // Past the window, with the cause NOT fixed: the replay is queued, fails
    // its deliveries again (the old failed operation does not settle it) and
    // comes back as a new dead letter.
    let deadline = Instant::now() + WINDOW * 3;
    let replayed = loop {
        let run = stack
            .cmctl(&["dlq", "replay", &seq_text, "-o", "json"])
            .await;
        if run.code == 0 {
            break run.json();
        }
        assert_eq!(run.code, 3, "{run:?}");
        assert!(Instant::now() < deadline, "window never passed: {run:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(replayed[0]["result"], "replayed", "{replayed}");
    assert!(replayed[0]["queuedAs"].as_u64().is_some(), "{replayed}");
    stack.cmctl(&["dlq", "show", &seq_text]).await.fails(2);
    let again = new_letter(&stack, "instance.create", &[seq]).await;
    assert_eq!(s(&again, "commandId"), command_id, "same command id");
    assert_eq!(again["deliveries"], 2, "{again}");

    // Cause fixed: replay --all (the undecodable one is skipped).
    etcd.lease_revoke(lease).await.expect("release the lock");
    let deadline = Instant::now() + WINDOW * 3;
    let replayed = loop {
        let run = stack.cmctl(&["dlq", "replay", "--all", "-o", "json"]).await;
        if run.code == 0 {
            break run.json();
        }
        assert_eq!(run.code, 3, "{run:?}");
        assert!(Instant::now() < deadline, "window never passed: {run:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let results = replayed.as_array().expect("results");
    assert_eq!(results.len(), 2, "{replayed}");
    let by_seq = |n: u64| {
        results
            .iter()
            .find(|r| r["sequence"] == n)
            .unwrap_or_else(|| panic!("{n} missing in {replayed}"))
    };
    assert_eq!(by_seq(poison_seq)["result"], "skipped");
    assert_eq!(
        by_seq(again["sequence"].as_u64().expect("seq"))["result"],
        "replayed"
    );

    // The command ran under its own id: the instance exists and the
    // operation recorded under that id succeeded.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let op = stack
            .cmctl(&["operation", "get", &command_id, "-o", "json"])
            .await
            .ok()
            .json();
        if op["state"] == "SUCCEEDED" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replayed command never ran: {op}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let inst = stack
        .cmctl(&[
            "instance",
            "get",
            "--challenge-id",
            "held",
            "--source-id",
            "s",
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert!(!s(&inst, "connectionInfo").is_empty(), "{inst}");

    // delete: the undecodable letter goes; nothing is left.
    stack
        .cmctl(&["dlq", "delete", &poison_seq.to_string()])
        .await
        .ok();
    stack
        .cmctl(&["dlq", "delete", &poison_seq.to_string()])
        .await
        .fails(2);
    assert!(letters(&stack).await.is_empty());
    let status = stack
        .cmctl(&["queue", "status", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(status["deadLetters"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_pushed_to_a_registry_and_uploaded_deploy() {
    let registry = cm_testkit::registry::start();
    let stack = Stack::start(
        1,
        Options {
            insecure_registries: vec![registry.host.clone()],
            ..Options::default()
        },
    )
    .await;
    let example = cm_testkit::example("identity");
    let example = example.to_str().expect("utf-8 path");
    let target = registry.reference("ctf/identity:v1");

    // OCI, chall-manager's layout: the reference comes back pinned.
    let pushed = stack
        .cmctl(&[
            "scenario",
            "push",
            example,
            &target,
            "--oci-insecure-registries",
            &registry.host,
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    let reference = s(&pushed, "scenario").to_owned();
    assert!(
        reference.starts_with(&format!("{target}@sha256:")),
        "{reference}"
    );
    // Pushing the same files again gives the same digest.
    let again = stack
        .cmctl(&[
            "scenario",
            "push",
            example,
            &target,
            "--oci-insecure-registries",
            &registry.host,
            "-o",
            "json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(s(&again, "scenario"), reference);

    // Upload through the API: a nats-object reference.
    let uploaded = stack
        .cmctl(&["scenario", "push", example, "--upload", "-o", "json"])
        .await
        .ok()
        .json();
    let object = s(&uploaded, "scenario").to_owned();
    assert!(object.starts_with("nats-object:sha256:"), "{object}");

    // Both deploy.
    for (id, scenario) in [
        ("from-oci", reference.as_str()),
        ("from-upload", object.as_str()),
    ] {
        stack
            .cmctl(&[
                "challenge",
                "create",
                "--id",
                id,
                "--scenario",
                scenario,
                "-o",
                "json",
            ])
            .await
            .ok();
        let instance = stack
            .cmctl(&[
                "instance",
                "create",
                "--challenge-id",
                id,
                "--source-id",
                "team-1",
                "-o",
                "json",
            ])
            .await
            .ok()
            .json();
        assert!(
            s(&instance, "connectionInfo").ends_with(".ctf.local 1337"),
            "{instance}"
        );
    }

    // Mistakes: no Pulumi.yaml (usage, 1); an unreachable registry (4).
    let empty = tempfile::tempdir().expect("tempdir");
    stack
        .cmctl(&[
            "scenario",
            "push",
            empty.path().to_str().expect("utf-8"),
            &target,
        ])
        .await
        .fails(1);
    stack
        .cmctl(&[
            "scenario",
            "push",
            example,
            "127.0.0.1:1/nobody/here:v1",
            "--oci-insecure-registries",
            "127.0.0.1:1",
        ])
        .await
        .fails(4);
}

/// cmctl reaches an API that requires a bearer token with --api-token or
/// --api-token-file, is refused without it, and refuses unusable access
/// flags before sending anything.
#[tokio::test]
async fn a_token_guarded_api_is_reached_with_the_token_and_bad_access_flags_are_usage_errors() {
    let token = "cmctl-test-token-0123456789";
    let stack = support::Stack::start(
        0,
        support::Options {
            api_token: Some(token.to_owned()),
            ..Default::default()
        },
    )
    .await;
    // Without the token: the API's 401, as exit code 1 (refused request).
    let refused = stack.cmctl(&["challenge", "list"]).await;
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(refused.stderr.contains("401"), "{refused:#?}");
    // With it, inline or from a file.
    stack
        .cmctl(&["--api-token", token, "-o", "json", "challenge", "list"])
        .await
        .ok();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).expect("write");
    let file = file.to_string_lossy().into_owned();
    stack
        .cmctl(&["--api-token-file", &file, "-o", "json", "challenge", "list"])
        .await
        .ok();
    // Unusable flags: usage errors (exit 1), nothing sent.
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    let not_pem = not_pem.to_string_lossy().into_owned();
    for (args, says) in [
        (
            vec!["--api-cert", &file, "challenge", "list"],
            "go together",
        ),
        (
            vec!["--api-ca", &not_pem, "challenge", "list"],
            "no PEM certificate",
        ),
        (
            vec![
                "--api-token",
                token,
                "--api-token-file",
                &file,
                "challenge",
                "list",
            ],
            "not both",
        ),
        (
            vec![
                "--api-token-file",
                "/nonexistent/token",
                "challenge",
                "list",
            ],
            "cannot read",
        ),
    ] {
        let run = stack.cmctl(&args).await.fails(1);
        assert!(run.stderr.contains(says), "{args:?}: {run:#?}");
    }
}

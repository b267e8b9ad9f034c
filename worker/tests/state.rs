//! Pulumi states at scale, against the real stack: a state larger than etcd
//! accepts lives in the JetStream object store and etcd holds a small
//! pointer; etcd's database does not grow with the state's size, the
//! number of checkpoints or the number of deploys; the objects go with
//! their stacks; the janitor's sweep removes only what no pointer names;
//! etcd's size limit and its NOSPACE alarm are told apart from an outage.

mod support;

use std::time::Duration;

use cm_core::{
    stack_store::{StackStore, StatePointer},
    store::{Store, StoreError, StoreOptions, StoredStack},
};
use cm_testkit::server;
use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

/// etcd's default request limit (`--max-request-bytes`): no state this big
/// could be written to etcd.
const ETCD_REQUEST_LIMIT: u64 = 1_572_864;

async fn create_challenge(stack: &Stack, id: &str, additional: Value) {
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": id, "scenario": "steps", "additional": additional})),
        )
        .await;
}

async fn states(stack: &Stack) -> StackStore {
    let nats = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("nats");
    StackStore::open(&async_nats::jetstream::new(nats), stack.store.root())
        .await
        .expect("state bucket")
}

/// The raw bytes etcd holds under an instance's stack key.
async fn raw_stack_value(stack: &Stack, cid: &str, identity: &cm_core::Identity) -> Vec<u8> {
    let key = format!("/cm/stack/{cid}/{identity}");
    let resp = stack
        .store
        .client()
        .get(key.as_str(), None)
        .await
        .expect("etcd");
    resp.kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .unwrap_or_default()
}

fn step_count(state: &[u8]) -> usize {
    let state: Value = serde_json::from_slice(state).expect("state is JSON");
    state
        .pointer("/checkpoint/checkpoint/latest/resources")
        .and_then(Value::as_array)
        .map_or(0, |rs| {
            rs.iter().filter(|r| r["type"] == "cm:example:Step").count()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_larger_than_etcd_accepts_is_deployed_stored_and_destroyed() {
    // Every checkpoint stored: the worst case for what etcd would take.
    let stack = Stack::start_with(1, &[("CM_CHECKPOINT_INTERVAL", "0s")]).await;
    create_challenge(&stack, "big", json!({"steps": "12", "payload_kb": "256"})).await;
    let before = stack.store.space().await.expect("etcd status");

    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "big", "sourceId": "team-a"})),
        )
        .await;
    let rec = stack
        .store
        .get_instance("big", "team-a")
        .await
        .expect("store")
        .expect("record")
        .value;

    let Some(StoredStack::Pointer(pointer)) = stack
        .store
        .get_stack("big", &rec.identity)
        .await
        .expect("store")
    else {
        panic!("the stack key does not hold a pointer");
    };
    assert!(
        pointer.size > ETCD_REQUEST_LIMIT,
        "the state ({} bytes) is over etcd's request limit",
        pointer.size
    );
    let raw = raw_stack_value(&stack, "big", &rec.identity).await;
    assert!(
        raw.len() < 512,
        "etcd holds a pointer, not the state: {} bytes",
        raw.len()
    );
    let state = stack
        .stack_state_bytes("big", &rec.identity)
        .await
        .expect("state");
    assert_eq!(state.len() as u64, pointer.size);
    assert_eq!(step_count(&state), 12, "the stored state is whole");

    let after = stack.store.space().await.expect("etcd status");
    let grown = after.db_size_in_use - before.db_size_in_use;
    eprintln!(
        "state {} bytes; etcd in use {} -> {} bytes ({grown:+})",
        pointer.size, before.db_size_in_use, after.db_size_in_use
    );
    assert!(
        grown < 1 << 20,
        "etcd grew by {grown} bytes for one deploy of a {}-byte state",
        pointer.size
    );
    // One object: the run's checkpoints went to one object, removed (in the
    // background) once the final state was written.
    let objects = states(&stack).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let names = objects.names().await.expect("list");
        if names == vec![pointer.object.clone()] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "objects left besides the final state: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stack
        .call_ok(Method::DELETE, "/api/v1/instance/big/team-a", None)
        .await;
    assert!(
        stack
            .store
            .get_stack("big", &rec.identity)
            .await
            .expect("store")
            .is_none()
    );
    assert!(
        objects.names().await.expect("list").is_empty(),
        "the state went with its stack"
    );
    let (bytes, messages) = objects.usage().await.expect("bucket usage");
    assert_eq!(
        (bytes, messages),
        (0, 0),
        "no chunk and no tombstone is left in the bucket's stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_creates_and_deletes_leave_etcd_small() {
    let stack = Stack::start_with(1, &[("CM_CHECKPOINT_INTERVAL", "0s")]).await;
    // ~200 KB states, each stored at every checkpoint.
    create_challenge(&stack, "churn", json!({"steps": "3", "payload_kb": "64"})).await;
    let before = stack.store.space().await.expect("etcd status");
    let mut written = 0u64;
    for round in 0..5 {
        let sources: Vec<String> = (0..10).map(|i| format!("team-{round}-{i}")).collect();
        let creates = sources.iter().map(|sid| {
            stack.call(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "churn", "sourceId": sid})),
            )
        });
        for (status, body) in futures::future::join_all(creates).await {
            assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
        }
        for sid in &sources {
            let rec = stack
                .store
                .get_instance("churn", sid)
                .await
                .expect("store")
                .expect("record");
            if let Some(StoredStack::Pointer(p)) = stack
                .store
                .get_stack("churn", &rec.value.identity)
                .await
                .expect("store")
            {
                written += p.size;
            }
        }
        let paths: Vec<String> = sources
            .iter()
            .map(|sid| format!("/api/v1/instance/churn/{sid}"))
            .collect();
        let deletes = paths.iter().map(|p| stack.call(Method::DELETE, p, None));
        for (status, body) in futures::future::join_all(deletes).await {
            assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
        }
    }
    let after = stack.store.space().await.expect("etcd status");
    let grown = after.db_size - before.db_size;
    eprintln!(
        "50 creates and deletes, final states {written} bytes in all: etcd file {} -> {} bytes, in use {} -> {}",
        before.db_size, after.db_size, before.db_size_in_use, after.db_size_in_use
    );
    assert!(
        written > 50 * 150_000,
        "the states were big: {written} bytes"
    );
    // The bound this project states (deploy/README.md, "etcd hygiene"): 4 MiB of
    // database growth for 50 deploys and deletes, whatever the states' size.
    assert!(
        grown < 4 << 20,
        "etcd's database grew by {grown} bytes over 50 creates and deletes"
    );
    assert!(
        states(&stack).await.names().await.expect("list").is_empty(),
        "no state object is left"
    );
}

#[tokio::test]
async fn a_record_over_etcds_size_limit_is_a_permanent_error() {
    let etcd = server::etcd();
    let store = Store::connect(
        std::slice::from_ref(&etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    let challenge = cm_core::model::ChallengeRecord {
        id: "huge".into(),
        scenario: "steps".into(),
        timeout: None,
        until: None,
        additional: [("blob".to_owned(), "x".repeat(2 << 20))].into(),
        min: 0,
        max: 0,
        max_per_source: None,
        pool: Default::default(),
    };
    match store
        .put_challenge(&challenge, cm_core::store::Expect::Absent)
        .await
    {
        Err(e @ StoreError::TooLarge(_)) => {
            assert!(e.is_permanent(), "{e}");
            assert!(e.to_string().contains("too large"), "{e}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        store.get_challenge("huge").await.expect("read").is_none(),
        "nothing was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_space_shows_in_the_healthcheck() {
    let nats = server::nats();
    let etcd = server::etcd_with_quota(4 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = format!("http://{}", listener.local_addr().expect("addr"));
    let mut config = support::api_config(&nats.url, &etcd.url);
    // etcd 3.4 does not report its quota: the API is told, as deployments do
    // with CM_ETCD_QUOTA_BYTES.
    config.connection.store.quota_bytes = Some(4 << 20);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = cm_api::run(config, listener, async {
            let _ = stopped.await;
        })
        .await;
    });
    let http = reqwest::Client::new();
    support::wait_healthy(&http, &api).await;
    let health: Value = http
        .get(format!("{api}/healthcheck"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["etcd"]["quotaBytes"], json!(4 << 20), "{health}");
    assert_eq!(health["etcd"]["alarms"], json!([]), "{health}");

    // Fill etcd until it raises NOSPACE and refuses writes.
    let mut client = etcd_client::Client::connect([etcd.url.as_str()], None)
        .await
        .expect("etcd");
    let blob = vec![b'x'; 512 << 10];
    let mut refused = None;
    for i in 0..64 {
        if let Err(e) = client.put(format!("/filler/{i}"), blob.clone(), None).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("etcd never ran out of space");
    assert!(refused.contains("space exceeded"), "{refused}");

    let resp = http
        .get(format!("{api}/healthcheck"))
        .send()
        .await
        .expect("health");
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.expect("body");
    assert!(body.contains("NOSPACE"), "{body}");
    let _ = stop.send(());
    let _ = task.await;
}

#[tokio::test]
async fn the_sweep_removes_only_old_objects_no_pointer_names() {
    let nats = server::nats();
    let etcd = server::etcd();
    let store = Store::connect(
        std::slice::from_ref(&etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    let js =
        async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.expect("nats"));
    let objects = StackStore::open(&js, "/cm").await.expect("bucket");
    // Reads go to the stream leader: a replica catching up after a restart
    // must not answer "missing" for a state written a moment ago.
    let mut stream = js
        .get_stream(format!("OBJ_{}", cm_core::stack_store::BUCKET))
        .await
        .expect("the bucket's stream");
    assert!(
        !stream.info().await.expect("info").config.allow_direct,
        "direct (any replica) reads are off"
    );
    // Another deployment's object, sharing the NATS server.
    let elsewhere = StackStore::open(&js, "/other").await.expect("bucket");
    let identity: cm_core::Identity = "0123456789abcdef".parse().expect("identity");

    let kept: StatePointer = objects
        .put("c", &identity, b"{\"kept\":1}")
        .await
        .expect("put");
    store
        .put_stack(
            "c",
            &identity,
            cm_core::store::PointerWrite {
                pointer: &kept,
                over: 0,
            },
        )
        .await
        .expect("pointer");
    let orphan = objects
        .put("c", &identity, b"{\"orphan\":1}")
        .await
        .expect("put");
    let foreign = elsewhere.put("c", &identity, b"{}").await.expect("put");

    let janitor = cm_janitor::Janitor::new(store.clone(), js.clone(), 100);
    assert_eq!(
        janitor
            .sweep_states(Duration::from_secs(3600))
            .await
            .expect("sweep"),
        0,
        "a young orphan may be a write in progress: kept"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        janitor
            .sweep_states(Duration::from_secs(1))
            .await
            .expect("sweep"),
        1
    );
    assert_eq!(
        objects.get(&kept).await.expect("the named object stays"),
        b"{\"kept\":1}"
    );
    assert!(matches!(
        objects.get(&orphan).await,
        Err(cm_core::stack_store::StackStoreError::Missing { .. })
    ));
    assert_eq!(
        elsewhere
            .get(&foreign)
            .await
            .expect("another root's object stays"),
        b"{}"
    );
}

/// Reads take no consumer: a state rewritten while it is read comes back
/// whole (one version or the other, never a mix), and chunks lost from the
/// stream are an error at once rather than a read that waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_rewrites_and_fail_fast_on_lost_chunks() {
    let nats = server::nats();
    let js =
        async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.expect("nats"));
    let objects = StackStore::open(&js, "/cm").await.expect("bucket");
    let identity: cm_core::Identity = "0123456789abcdef".parse().expect("identity");
    let live = objects.checkpoint_object("c", &identity);
    // Several chunks each (the client's chunks are 128 KiB).
    let version = |n: u8| vec![b'a' + n; 600 * 1024];
    objects.rewrite(&live, &version(0)).await.expect("first");

    let writer = {
        let (objects, live) = (objects.clone(), live.clone());
        tokio::spawn(async move {
            // Faster than any run checkpoints (at most one per interval,
            // 2 s by default), slower than back to back.
            for n in 1..20u8 {
                objects.rewrite(&live, &version(n)).await.expect("rewrite");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let data = objects.get(&live).await.expect("a read during rewrites");
        assert_eq!(data.len(), 600 * 1024);
        assert!(
            data.iter().all(|b| *b == data[0]),
            "one version, not a mix of two"
        );
        reads += 1;
    }
    writer.await.expect("writer");
    assert!(reads > 0);
    assert_eq!(objects.get(&live).await.expect("last"), version(19));

    // The chunks of a recorded state purged under its metadata.
    let kept = objects.put("c", &identity, &version(3)).await.expect("put");
    let bucket = js
        .get_object_store(cm_core::stack_store::BUCKET)
        .await
        .expect("bucket");
    let nuid = bucket.info(&kept.object).await.expect("info").nuid;
    js.get_stream(format!("OBJ_{}", cm_core::stack_store::BUCKET))
        .await
        .expect("stream")
        .purge()
        .filter(format!("$O.{}.C.{nuid}", cm_core::stack_store::BUCKET))
        .await
        .expect("purge");
    let read = tokio::time::timeout(Duration::from_secs(10), objects.get(&kept))
        .await
        .expect("answered, not waiting for chunks that will never come");
    assert!(
        matches!(
            read,
            Err(cm_core::stack_store::StackStoreError::Mismatch { .. })
        ),
        "{read:?}"
    );
}

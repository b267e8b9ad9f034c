//! Races between transitions of one instance, ordered deterministically with
//! failpoint pauses (`CM_FAILPOINT=pause:<name>`, see `worker/src/failpoint.rs`)
//! on real servers, and checked against the invariants of `docs/invariants.md`:
//! - I1: a pool claim racing an in-place update of that pooled instance
//!   never leaves one identity both pooled and claimed, nor claimed twice;
//! - fencing: a handler whose lease was lost (revoked while it was paused)
//!   cannot write once it resumes, so a deleted instance is not resurrected.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use cm_core::model::{InstanceRecord, InstanceStatus};
use cm_core::stack_store::StatePointer;
use cm_core::store::StoredStack;
use etcd_client::{EventType, GetOptions, WatchOptions};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

/// Waits until the pause `name` was reached by a worker.
/// Watches every change under a challenge's instance records from the
/// first revision on, and after each revision checks I1: no identity both
/// pooled and claimed, no identity claimed by two sources.
struct IdentityChecker {
    violations: Arc<Mutex<Vec<String>>>,
    /// The revision the watch has reported up to.
    seen: Arc<AtomicI64>,
    watcher: etcd_client::WatchRequestSender,
    task: tokio::task::JoinHandle<()>,
}

impl IdentityChecker {
    async fn start(stack: &Stack, cid: &str) -> Self {
        let prefix = format!("/cm/instance/{cid}/");
        let watch = stack
            .store
            .client()
            .watch(
                prefix.clone(),
                Some(WatchOptions::new().with_prefix().with_start_revision(1)),
            )
            .await
            .expect("watch");
        let (watcher, mut stream) = watch.split();
        let violations = Arc::new(Mutex::new(Vec::new()));
        let found = violations.clone();
        let seen = Arc::new(AtomicI64::new(0));
        let seen_by_task = seen.clone();
        let task = tokio::spawn(async move {
            // key -> identity
            let mut state: BTreeMap<String, String> = BTreeMap::new();
            let check = |state: &BTreeMap<String, String>, rev: i64| {
                let mut pooled = BTreeSet::new();
                let mut claimed: BTreeMap<&str, &str> = BTreeMap::new();
                let mut out = Vec::new();
                for (key, identity) in state {
                    let rest = &key[prefix.len()..];
                    if rest.starts_with("pool/") {
                        pooled.insert(identity.as_str());
                    } else if let Some(other) = claimed.insert(identity, rest) {
                        out.push(format!(
                            "rev {rev}: {identity} claimed by {other} and {rest}"
                        ));
                    }
                }
                for identity in claimed.keys() {
                    if pooled.contains(identity) {
                        out.push(format!("rev {rev}: {identity} both pooled and claimed"));
                    }
                }
                out
            };
            while let Some(Ok(resp)) = stream.next().await {
                let mut last_rev = None;
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let rev = kv.mod_revision();
                    if last_rev.is_some_and(|r| r != rev) {
                        let v = check(&state, last_rev.unwrap_or_default());
                        found.lock().expect("lock").extend(v);
                    }
                    last_rev = Some(rev);
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match event.event_type() {
                        EventType::Delete => {
                            state.remove(&key);
                        }
                        EventType::Put => {
                            let identity = serde_json::from_slice::<InstanceRecord>(kv.value())
                                .map(|r| r.identity.to_string())
                                .unwrap_or_else(|_| "(unreadable)".into());
                            state.insert(key, identity);
                        }
                    }
                }
                if let Some(rev) = last_rev {
                    let v = check(&state, rev);
                    found.lock().expect("lock").extend(v);
                }
                if let Some(h) = resp.header() {
                    seen_by_task.fetch_max(h.revision(), Ordering::AcqRel);
                }
            }
        });
        Self {
            violations,
            seen,
            watcher,
            task,
        }
    }

    /// The violations seen up to etcd's current revision.
    async fn violations(&mut self, stack: &Stack) -> Vec<String> {
        let head = stack
            .store
            .client()
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .expect("get")
            .header()
            .map_or(0, |h| h.revision());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.seen.load(Ordering::Acquire) < head {
            assert!(Instant::now() < deadline, "the watch never caught up");
            // A progress notification reports the watch's current revision.
            self.watcher.request_progress().await.expect("progress");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.violations.lock().expect("lock").clone()
    }
}

impl Drop for IdentityChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn instances(stack: &Stack, cid: &str) -> Vec<InstanceRecord> {
    stack.store.list_instances(cid).await.expect("store")
}

/// Waits (90 s at most) until `cid` holds `ready` ready pooled instances
/// among `total` (any total when `None`); fails with `what`, the records
/// and the workers' logs.
async fn wait_pool(stack: &Stack, cid: &str, ready: usize, total: Option<usize>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let all = instances(stack, cid).await;
        let pooled = all
            .iter()
            .filter(|r| r.source_id.is_none() && r.status == InstanceStatus::Ready)
            .count();
        if pooled == ready && total.is_none_or(|t| t == all.len()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {pooled} ready pooled of {} instances {all:?}\n{}",
            all.len(),
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn claimed(stack: &Stack, cid: &str, sid: &str) -> InstanceRecord {
    stack
        .store
        .get_instance(cid, sid)
        .await
        .expect("store")
        .expect("claimed record")
        .value
}

/// The scenario: challenge `race1` (`steps`, min 1 max 1); the pooled
/// instance is updated in place and paused between its Pulumi run and its
/// record write; a claim for `p1` lands meanwhile; the update completes; a
/// claim for `p2` must not get `p1`'s identity or flag, and etcd never holds
/// one identity both pooled and claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_racing_an_update_of_the_pooled_instance_never_shares_it() {
    const PAUSE: &str = "instance-update-before-write";
    let (stack, pauses) = Stack::start_paused(2, PAUSE, &[]).await;
    let mut checker = IdentityChecker::start(&stack, "race1").await;
    stack.call_ok(Method::POST, "/api/v1/challenge", Some(json!({ "id": "race1", "scenario": "steps", "min": 1, "max": "1", "additional": {"steps": "2"} }))).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let pooled = loop {
        let all = instances(&stack, "race1").await;
        if let Some(r) = all
            .iter()
            .find(|r| r.source_id.is_none() && r.status == InstanceStatus::Ready)
        {
            break r.identity.clone();
        }
        assert!(
            Instant::now() < deadline,
            "pool never filled: {all:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The update of the challenge, in place: it pauses on the pooled
    // instance once Pulumi has run, before writing its record.
    let api = stack.api.clone();
    let http = stack.http.clone();
    let update = tokio::spawn(async move {
        let resp = http
            .patch(format!("{api}/api/v1/challenge/race1"))
            .json(&json!({"additional": {"steps": "3"}, "updateStrategy": "update_in_place"}))
            .send()
            .await
            .expect("patch");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    });
    stack.wait_paused(pauses.path(), PAUSE).await;

    let (status, first) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "race1", "sourceId": "p1"})),
        )
        .await;
    assert_eq!(status, 200, "{first}\n{}", stack.worker_logs());
    let p1 = claimed(&stack, "race1", "p1").await;
    assert_ne!(
        p1.identity, pooled,
        "p1 claimed the pooled instance while its update was running (two transitions of one identity at once)"
    );

    support::resume(pauses.path(), PAUSE);
    let (status, body) = update.await.expect("update task");
    assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());

    let (status, second) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "race1", "sourceId": "p2"})),
        )
        .await;
    assert_eq!(status, 200, "{second}\n{}", stack.worker_logs());
    let p2 = claimed(&stack, "race1", "p2").await;
    assert_ne!(
        p1.identity, p2.identity,
        "two sources share one identity (the pooled one was {pooled})"
    );
    assert_ne!(first["flag"], second["flag"], "two sources share one flag");
    assert_ne!(p1.flags, p2.flags, "two sources share one flag");
    let pool: Vec<_> = instances(&stack, "race1")
        .await
        .into_iter()
        .filter(|r| r.source_id.is_none())
        .map(|r| r.identity)
        .collect();
    assert!(
        !pool.contains(&p1.identity) && !pool.contains(&p2.identity),
        "a claimed identity is back in the pool: {pool:?}"
    );
    let violations = checker.violations(&stack).await;
    assert!(violations.is_empty(), "I1 broken: {violations:#?}");
}

/// Fencing: a create paused after its Pulumi run loses its lease (revoked,
/// as etcd does to a worker paused past its TTL); the instance is deleted
/// meanwhile under fresh locks; when the stale create resumes, its write
/// must fail: the deleted identity's record and stack state stay gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_whose_lease_was_lost_cannot_resurrect_a_deleted_instance() {
    const PAUSE: &str = "instance-create-before-write";
    let (stack, pauses) = Stack::start_paused(1, PAUSE, &[]).await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "fence", "scenario": "steps", "additional": {"steps": "2"}})),
        )
        .await;
    let op = stack
        .submit_async(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "fence", "sourceId": "p1"})),
        )
        .await;
    stack.wait_paused(pauses.path(), PAUSE).await;
    let stale = claimed(&stack, "fence", "p1").await;
    assert_eq!(stale.status, InstanceStatus::Deploying);

    // The create's locks are bound to the worker's lease: revoke it, as etcd
    // does when a worker is paused past its TTL.
    stack.revoke_lock_leases().await;

    // Another holder deletes the instance under fresh locks.
    let (status, body) = stack
        .call(Method::DELETE, "/api/v1/instance/fence/p1", None)
        .await;
    assert!(
        status == 200 || status == 404,
        "{status} {body}\n{}",
        stack.worker_logs()
    );

    // The stale create resumes (if it still runs): its writes must fail.
    support::resume(pauses.path(), PAUSE);
    let done: Value = stack.wait_operation(&op, Duration::from_secs(120)).await;
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(200),
            Duration::from_secs(60)
        )
        .await,
        "queue not drained\n{}",
        stack.worker_logs()
    );
    let now = stack
        .store
        .get_instance("fence", "p1")
        .await
        .expect("store");
    if let Some(now) = &now {
        assert_ne!(
            now.value.identity,
            stale.identity,
            "the deleted identity was resurrected: {done}\n{}",
            stack.worker_logs()
        );
    }
    let state = stack
        .store
        .get_stack("fence", &stale.identity)
        .await
        .expect("store");
    assert!(
        state.is_none(),
        "the deleted identity's stack state was written back\n{}",
        stack.worker_logs()
    );
    // Whatever instance p1 has now (a create that ran after the delete) is
    // whole: a ready record with its stack state.
    if let Some(now) = now {
        assert_eq!(now.value.status, InstanceStatus::Ready, "{done}");
        assert!(
            stack
                .store
                .get_stack("fence", &now.value.identity)
                .await
                .expect("store")
                .is_some()
        );
    }
}

/// A store fenced by a lock refuses every write once the lock's lease is
/// gone, even after a new holder took the same lock; the new holder's
/// fenced writes go through. The session notices the loss and cancels its
/// `lost` token (handlers race against it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_fails_once_its_lock_is_lost() {
    use cm_core::{
        lock::{self, LockMode, Session},
        store::{PointerWrite, Store, StoreError},
    };
    let etcd = cm_testkit::server::etcd();
    let store = Store::connect(std::slice::from_ref(&etcd.url), "/cm", &Default::default())
        .await
        .expect("store");
    let client = store.client();
    let old = Session::start(client.clone(), 3).await.expect("session");
    let lost = old.lost();
    let identity: cm_core::Identity = "0123456789abcdef".parse().expect("identity");
    let prefix = lock::identity_lock("/cm", "c", &identity);
    let held = lock::acquire(
        &client,
        old.lease(),
        &prefix,
        LockMode::Write,
        Duration::from_secs(5),
    )
    .await
    .expect("lock");
    let stale = store.fenced(&held.fence());
    stale
        .put_stack(
            "c",
            &identity,
            PointerWrite {
                pointer: &StatePointer {
                    object: "first".into(),
                    sha256: "00".into(),
                    size: 1,
                    live: false,
                },
                over: 0,
            },
        )
        .await
        .expect("a held lock's write goes through");

    let revoked = old.lease();
    client.clone().lease_revoke(revoked).await.expect("revoke");
    let fresh = Session::start(client.clone(), 10).await.expect("session");
    let next = lock::acquire(
        &client,
        fresh.lease(),
        &prefix,
        LockMode::Write,
        Duration::from_secs(5),
    )
    .await
    .expect("the lock is free again");
    // Both writes below are guarded by the revision they read: only the
    // fence tells them apart.
    let (_, at) = store.get_stack_at("c", &identity).await.expect("get");
    store
        .fenced(&next.fence())
        .put_stack(
            "c",
            &identity,
            PointerWrite {
                pointer: &StatePointer {
                    object: "new".into(),
                    sha256: "00".into(),
                    size: 1,
                    live: false,
                },
                over: at,
            },
        )
        .await
        .expect("the new holder writes");
    match stale
        .put_stack(
            "c",
            &identity,
            PointerWrite {
                pointer: &StatePointer {
                    object: "stale".into(),
                    sha256: "00".into(),
                    size: 1,
                    live: false,
                },
                over: at,
            },
        )
        .await
    {
        Err(StoreError::Fenced { key }) => assert!(key.starts_with(&prefix), "{key}"),
        other => panic!("the stale holder's write was not refused: {other:?}"),
    }
    match stale
        .put_stack(
            "c",
            &identity,
            PointerWrite {
                pointer: &StatePointer {
                    object: "stale".into(),
                    sha256: "00".into(),
                    size: 1,
                    live: false,
                },
                over: store.get_stack_at("c", &identity).await.expect("get").1,
            },
        )
        .await
    {
        Err(StoreError::Fenced { key }) => assert!(key.starts_with(&prefix), "{key}"),
        other => {
            panic!("the stale holder's write over the latest revision was not refused: {other:?}")
        }
    }
    assert_eq!(
        store.get_stack("c", &identity).await.expect("get"),
        Some(StoredStack::Pointer(StatePointer {
            object: "new".into(),
            sha256: "00".into(),
            size: 1,
            live: false,
        }))
    );
    tokio::time::timeout(Duration::from_secs(10), lost.cancelled())
        .await
        .expect("the session noticed its lease was lost");
    // Then a new lease is granted, with a fresh token.
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.lease() == revoked {
        assert!(Instant::now() < deadline, "no new lease granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!old.lost().is_cancelled(), "the new lease's token is live");
}

/// A waiter whose own key vanished while it waited (its lease expired)
/// must not be told it holds the lock once the holder leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waiter_whose_key_expired_does_not_proceed() {
    use cm_core::lock::{self, LockMode};
    let etcd = cm_testkit::server::etcd();
    let store =
        cm_core::store::Store::connect(std::slice::from_ref(&etcd.url), "/cm", &Default::default())
            .await
            .expect("store");
    let mut client = store.client();
    let holder_lease = client.lease_grant(30, None).await.expect("lease").id();
    let waiter_lease = client.lease_grant(30, None).await.expect("lease").id();
    let prefix = "/cm/lock/instance/c/s/";
    let held = lock::acquire(
        &client,
        holder_lease,
        prefix,
        LockMode::Write,
        Duration::from_secs(5),
    )
    .await
    .expect("lock");
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            lock::acquire(
                &client,
                waiter_lease,
                prefix,
                LockMode::Write,
                Duration::from_secs(30),
            )
            .await
        })
    };
    // The waiter's key is written: it queues behind the holder.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("get")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.lease_revoke(waiter_lease).await.expect("revoke");
    held.release_now().await;
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter returned")
        .expect("task");
    assert!(
        got.is_err(),
        "a waiter whose key expired was handed the lock: {got:?}"
    );
    let left = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("get")
        .count();
    assert_eq!(left, 0, "no lock key left behind");
}

/// Eviction while holding a create's locks: the create of `(b, s)` holds the
/// source's lock and evicts `s`'s instance of `a`; a create of `(a, s)`
/// queued meanwhile holds `(a, s)`'s slot key and waits for the source's
/// lock. If the eviction waited for that slot, each would wait for the
/// other until the lock timeout. Both must settle well before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eviction_does_not_deadlock_with_a_create_on_the_victims_challenge() {
    const PAUSE: &str = "instance-create-before-evict";
    let (stack, pauses) = Stack::start_paused(
        1,
        PAUSE,
        &[
            ("CM_MAX_INSTANCES_PER_SOURCE", "1"),
            ("CM_EVICT_OLDEST", "true"),
            ("CM_LOCK_TIMEOUT", "45s"),
        ],
    )
    .await;
    for id in ["a", "b"] {
        let (status, body) = stack
            .call(
                Method::POST,
                "/api/v1/challenge",
                Some(json!({"id": id, "scenario": "identity"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "a", "sourceId": "s"})),
        )
        .await;

    let evicting = queue_create(&stack, "b", "s").await;
    stack.wait_paused(pauses.path(), PAUSE).await;
    let competing = queue_create(&stack, "a", "s").await;
    // The competing create has written its keys (source, challenge, slot)
    // and waits behind the evicting create's source lock.
    let mut client = stack.store.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(
            "/cm/lock/instance/a/s/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("get")
        .count()
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the competing create never queued\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    support::resume(pauses.path(), PAUSE);
    for op in [&evicting, &competing] {
        stack.wait_operation(op, Duration::from_secs(60)).await;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the creates waited for each other ({took:?}; the lock timeout is 45 s)\n{}",
        stack.worker_logs()
    );
    let b = stack.store.get_instance("b", "s").await.expect("store");
    assert!(b.is_some(), "the evicting create ended with its instance");
}

/// Queues an instance create (`Prefer: respond-async`); its operation id.
async fn queue_create(stack: &Stack, cid: &str, sid: &str) -> String {
    stack
        .submit_async(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": cid, "sourceId": sid})),
        )
        .await
}

/// A refill deploys its pool one instance at a time; between two deploys it
/// must not keep the challenge locked, or a challenge update (a writer)
/// waits for the whole refill, however large the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_challenge_update_is_not_held_back_by_a_whole_refill() {
    const PAUSE: &str = "pool-refill-between-rounds";
    let (stack, pauses) = Stack::start_paused(1, PAUSE, &[("CM_LOCK_TIMEOUT", "60s")]).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "big", "scenario": "identity", "min": 3, "timeout": "600s"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The refill deployed its first instance and is between two deploys.
    stack.wait_paused(pauses.path(), PAUSE).await;

    let api = stack.api.clone();
    let http = stack.http.clone();
    let update = tokio::spawn(async move {
        let resp = http
            .patch(format!("{api}/api/v1/challenge/big"))
            .json(&json!({"timeout": "900s"}))
            .send()
            .await
            .expect("patch");
        resp.status().as_u16()
    });
    let answered = tokio::time::timeout(Duration::from_secs(20), update).await;
    support::resume(pauses.path(), PAUSE);
    let status = answered
        .unwrap_or_else(|_| {
            panic!(
                "the challenge update waited for the refill\n{}",
                stack.worker_logs()
            )
        })
        .expect("task");
    assert_eq!(status, 200, "{}", stack.worker_logs());

    // The refill still completes the pool.
    wait_pool(&stack, "big", 3, None, "pool not refilled").await;
}

/// A claim lands after a refill's last read of the pool, while that refill
/// still holds the pool's locks: the claim asks for no refill of its own
/// (one that did would find the locks taken and step aside), so the refill
/// at work must count the pool again once it releases them, and deploy the
/// instance the claim took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_behind_a_finishing_refill_is_refilled() {
    const PAUSE: &str = "pool-refill-before-done";
    let (stack, pauses) = Stack::start_paused(1, PAUSE, &[]).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "one", "scenario": "identity", "min": 1, "timeout": "600s"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The prefill deployed the pool's instance, found the pool full and
    // holds its locks.
    stack.wait_paused(pauses.path(), PAUSE).await;
    let refilled = "cm.evt.pool.refilled.one";
    assert_eq!(stack.events(refilled).await, 0, "the prefill is not over");
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "one", "sourceId": "p1"})),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
    support::resume(pauses.path(), PAUSE);

    // The prefill sees the claim once it lets go, and fills the pool again.
    let short = "the pool stayed short after the claim";
    wait_pool(&stack, "one", 1, Some(2), short).await;
    // The claim asked for no refill of its own: the prefill covered it.
    let url = stack.nats.url.clone();
    assert!(support::wait_drained(&url, Duration::from_millis(100), Duration::from_secs(60)).await);
    assert_eq!(
        stack.events(refilled).await,
        1,
        "one refill in all, the prefill\n{}",
        stack.worker_logs()
    );
}

/// Liveness of the pool size against a challenge writer: a refill that
/// finds the challenge's write lock held (a non-resizing update) steps
/// aside after a brief wait. The update must ask for the pool's refill once
/// it lets the lock go, or the pool stays short until the next claim. Here
/// the stepping-aside refill is the prefill (a claim's refill meets the
/// same lock the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refill_that_steps_aside_behind_a_challenge_update_is_made_up_for() {
    const REFILL: &str = "pool-refill-before-locks";
    const UPDATE: &str = "challenge-update-locked";
    let (stack, pauses) = Stack::start_paused_at(1, &[REFILL, UPDATE], &[]).await;
    let pooled = json!({"id": "one", "scenario": "identity", "min": 1, "timeout": "600s"});
    stack
        .call_ok(Method::POST, "/api/v1/challenge", Some(pooled))
        .await;
    stack.wait_paused(pauses.path(), REFILL).await;
    // A non-resizing update takes the write lock and holds it.
    let op = stack
        .submit_async(
            Method::PATCH,
            "/api/v1/challenge/one",
            Some(json!({"timeout": "900s"})),
        )
        .await;
    stack.wait_paused(pauses.path(), UPDATE).await;
    // The prefill meets the lock and steps aside: done, nothing deployed.
    support::resume(pauses.path(), REFILL);
    let refilled = "cm.evt.pool.refilled.one";
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.events(refilled).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the prefill never ended\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        instances(&stack, "one").await.is_empty(),
        "the prefill was to step aside behind the update's lock\n{}",
        stack.worker_logs()
    );
    support::resume(pauses.path(), UPDATE);
    stack.wait_succeeded(&op, Duration::from_secs(90)).await;

    // The update made up for it: the pool fills.
    let short = "the pool stayed short after the update";
    wait_pool(&stack, "one", 1, Some(1), short).await;
}

/// I1/I3 against a refill's surplus destroy: the pool shrinks (`min` 1 to
/// 0) and the refill is about to destroy the pooled instance when a claim
/// for `p1` comes: the claim must not get that instance (its stack is being
/// destroyed), and whatever `p1` gets must be whole afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_racing_a_refills_surplus_destroy_gets_a_whole_instance() {
    const PAUSE: &str = "pool-refill-before-destroy";
    let (stack, pauses) = Stack::start_paused(2, PAUSE, &[]).await;
    let mut checker = IdentityChecker::start(&stack, "shrink").await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "shrink", "scenario": "identity", "min": 1, "max": 5})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let pooled = loop {
        let all = instances(&stack, "shrink").await;
        if let Some(r) = all
            .iter()
            .find(|r| r.source_id.is_none() && r.status == InstanceStatus::Ready)
        {
            break r.identity.clone();
        }
        assert!(
            Instant::now() < deadline,
            "pool never filled: {all:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // min 0: the refill destroys the pooled instance; it pauses just before.
    let (status, body) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/shrink",
            Some(json!({"min": 0})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    stack.wait_paused(pauses.path(), PAUSE).await;

    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "shrink", "sourceId": "p1"})),
        )
        .await;
    support::resume(pauses.path(), PAUSE);
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(200),
            Duration::from_secs(60)
        )
        .await,
        "queue not drained\n{}",
        stack.worker_logs()
    );
    let p1 = claimed(&stack, "shrink", "p1").await;
    assert_ne!(
        p1.identity, pooled,
        "p1 claimed the instance the refill was destroying"
    );
    let state: Value = stack
        .stack_state_bytes("shrink", &p1.identity)
        .await
        .and_then(|b| serde_json::from_slice(&b).ok())
        .expect("p1's instance has a stack state");
    let resources = state
        .pointer("/checkpoint/checkpoint/latest/resources")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    assert!(
        resources > 0,
        "p1's instance was destroyed under it: {state}\n{}",
        stack.worker_logs()
    );
    let left: Vec<_> = instances(&stack, "shrink")
        .await
        .into_iter()
        .filter(|r| r.source_id.is_none())
        .collect();
    assert!(left.is_empty(), "the pool was not drained: {left:?}");
    let violations = checker.violations(&stack).await;
    assert!(violations.is_empty(), "I1 broken: {violations:#?}");
}

/// The descendants of process `pid` whose command name is `name` (a run's
/// `pulumi` is the worker's grandchild, under its guard).
fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                let comm =
                    std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim() == name {
                    out.push(child);
                }
                parents.push(child);
            }
        }
    }
    out
}

/// Waits until worker `n` runs a `pulumi` process; returns their pids.
async fn pulumi_runs_of(stack: &Stack, n: usize) -> Vec<u32> {
    let worker = stack.worker_pid(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = children_named(worker, "pulumi");
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no pulumi run started\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive(pids: &[u32]) -> bool {
    pids.iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// A handler whose lease is lost is stopped, and its Pulumi run with it: a
/// slow deploy's lease is revoked mid-run; the `pulumi` process it started
/// must be gone long before the run would have ended, and the command,
/// retried, still ends with one whole instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_lease_stops_the_handler_and_kills_its_pulumi_run() {
    let stack = Stack::start(1).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({
                "id": "slow", "scenario": "steps",
                "additional": {"steps": "6", "step_ms": "3000"}
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let op = queue_create(&stack, "slow", "p1").await;
    let running = pulumi_runs_of(&stack, 0).await;
    // The run is under way (its first step's checkpoint may or may not be
    // stored yet); the 6 steps take 18 s in all. Revoke the lease.
    let mut client = stack.store.client();
    let locks = client
        .get("/cm/lock/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("locks");
    let leases: BTreeSet<i64> = locks.kvs().iter().map(|kv| kv.lease()).collect();
    assert!(!leases.is_empty(), "the create holds locks");
    let revoked = Instant::now();
    for lease in leases {
        client.lease_revoke(lease).await.expect("revoke");
    }
    let deadline = revoked + Duration::from_secs(8);
    while alive(&running) {
        assert!(
            Instant::now() < deadline,
            "the stale handler's pulumi run is still running {:?} after its lease was revoked\n{}",
            revoked.elapsed(),
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Retried under a new lease, the command ends with one whole instance.
    ends_with_one_whole_instance(&stack, &op, "slow").await;
}

/// The create `op` of a 6-step instance for `p1` on `cid` succeeded, and
/// the instance is ready with all six steps.
async fn ends_with_one_whole_instance(stack: &Stack, op: &str, cid: &str) {
    let body = stack.wait_operation(op, Duration::from_secs(120)).await;
    assert_eq!(
        body["state"],
        "SUCCEEDED",
        "{body}\n{}",
        stack.worker_logs()
    );
    let rec = claimed(stack, cid, "p1").await;
    assert_eq!(rec.status, InstanceStatus::Ready);
    assert!(rec.connection_info.ends_with("x6"), "{rec:?}");
}

/// A paused worker cannot renew its lease, nor stop its Pulumi run: the
/// guard around the run (outside the worker) must kill it before the lease
/// can expire, so the worker taking the lock over never runs Pulumi on the
/// stack at the same time. The worker is stopped (SIGSTOP) mid-run; the
/// `pulumi` process must be gone while the paused worker's lock keys are
/// still there, and the command, once the worker resumes, ends with one
/// whole instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_workers_pulumi_run_is_killed_before_its_lease_can_expire() {
    let stack = Stack::start_with(1, &[("CM_LEASE_TTL", "3")]).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({
                "id": "paused", "scenario": "steps",
                "additional": {"steps": "6", "step_ms": "3000"}
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let op = queue_create(&stack, "paused", "p1").await;
    let running = pulumi_runs_of(&stack, 0).await;
    let worker = stack.worker_pid(0).to_string();
    let signal = |sig: &str| {
        let done = std::process::Command::new("kill")
            .args([sig, worker.as_str()])
            .status()
            .expect("kill");
        assert!(done.success(), "kill {sig} {worker}");
    };
    signal("-STOP");
    let stopped = Instant::now();
    let mut client = stack.store.client();
    let mut killed_at = None;
    // The 6 steps take 18 s: sample until the lease has expired.
    loop {
        let locks = client
            .get("/cm/lock/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("locks");
        let running_now = alive(&running);
        if !running_now && killed_at.is_none() {
            killed_at = Some(stopped.elapsed());
        }
        if locks.kvs().is_empty() {
            assert!(
                !running_now,
                "the paused worker's lease expired ({:?} after SIGSTOP) while its pulumi run went on",
                stopped.elapsed()
            );
            break;
        }
        if stopped.elapsed() > Duration::from_secs(15) {
            signal("-CONT");
            panic!(
                "the paused worker's locks outlived its 3 s lease by far (pulumi killed after {killed_at:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = killed_at.expect("checked above");
    assert!(
        killed_at < Duration::from_secs(3),
        "the run was killed {killed_at:?} after SIGSTOP; the lease lives 3 s"
    );
    signal("-CONT");
    ends_with_one_whole_instance(&stack, &op, "paused").await;
}

/// A revoked lease frees its locks at once, but its worker learns of it
/// only at its next keep-alive (a third of the TTL later) and only then
/// stops its Pulumi run. The next holder must not run Pulumi on the stack
/// before that: a slow create holds the instance (lease 30 s, keep-alives
/// 10 s apart), a delete waits for it on a second worker, the creating
/// worker's lease is revoked. The delete's destroy may start only once the
/// create's `pulumi` process is gone, and the delete ends well.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_holders_run_ends_before_the_next_holder_runs_on_the_stack() {
    let mut stack = Stack::start_with(
        1,
        &[
            ("CM_LEASE_TTL", "30"),
            ("CM_WORKER_CONCURRENCY", "1"),
            ("CM_CHECKPOINT_INTERVAL", "1s"),
        ],
    )
    .await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({
                "id": "handover", "scenario": "steps",
                "additional": {"steps": "8", "step_ms": "3000"}
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    queue_create(&stack, "handover", "p1").await;
    let first = pulumi_runs_of(&stack, 0).await;
    // A checkpoint names what the create deployed: the delete destroys it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stacks = stack
            .store
            .client()
            .get("/cm/stack/handover/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("stacks");
        if !stacks.kvs().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the create stored no checkpoint\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The creating worker has no free permit: the delete goes to this one.
    stack.spawn_worker();
    let delete = stack
        .submit_async(Method::DELETE, "/api/v1/instance/handover/p1", None)
        .await;
    let mut client = stack.store.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let creator = loop {
        let locks = client
            .get("/cm/lock/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("locks");
        // The oldest lock keys are the create's; once the delete waits, a
        // second lease holds keys too.
        let mut kvs: Vec<_> = locks.kvs().iter().collect();
        kvs.sort_by_key(|kv| kv.create_revision());
        let leases: BTreeSet<i64> = kvs.iter().map(|kv| kv.lease()).collect();
        if leases.len() > 1 {
            break kvs[0].lease();
        }
        assert!(
            Instant::now() < deadline,
            "the delete never waited for the create's locks\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let second = stack.worker_pid(1);
    client.lease_revoke(creator).await.expect("revoke");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (first, stop) = (first.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen_second = false;
            while !stop.load(Ordering::SeqCst) {
                let theirs = !children_named(second, "pulumi").is_empty();
                seen_second |= theirs;
                if theirs && alive(&first) {
                    return Err("the delete's pulumi ran while the revoked create's still did");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(seen_second)
        })
    };
    let body = stack
        .wait_operation(&delete, Duration::from_secs(120))
        .await;
    stop.store(true, Ordering::SeqCst);
    let sampled = sampler.await.expect("sampler");
    assert_eq!(
        body["state"],
        "SUCCEEDED",
        "{body}\n{}",
        stack.worker_logs()
    );
    match sampled {
        Ok(true) => {}
        Ok(false) => panic!(
            "the delete never ran pulumi: nothing was checked\n{}",
            stack.worker_logs()
        ),
        Err(what) => panic!("{what}\n{}", stack.worker_logs()),
    }
}

/// A renewal takes no lock when nobody else is at work on the instance; it
/// must then never write while someone is: a key under the slot's lock (a
/// delete, an expiry, a reset in progress) or a writer's key under the
/// challenge's lock (an update moving `until`) sends it to the locked path,
/// where it waits its turn. The keys are put by hand, as a holder's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_never_writes_while_the_slot_or_the_challenge_is_locked() {
    let stack = Stack::start(1).await;
    stack.call_ok(Method::POST, "/api/v1/challenge", Some(json!({"id": "rn", "scenario": "steps", "timeout": "600s", "additional": {"steps": "1"}}))).await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "rn", "sourceId": "p1"})),
        )
        .await;

    // Uncontended: renewed at once.
    let before = until(&stack).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    stack
        .call_ok(Method::PATCH, "/api/v1/instance/rn/p1", None)
        .await;
    let renewed = until(&stack).await;
    assert!(renewed > before, "renewed: {before:?} -> {renewed:?}");

    for held in [
        "/cm/lock/instance/rn/p1/w-test",
        "/cm/lock/challenge/rn/w-test",
    ] {
        let mut etcd = stack.store.client();
        etcd.put(held, "", None).await.expect("put a lock key");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = until(&stack).await;
        let op = stack
            .submit_async(Method::PATCH, "/api/v1/instance/rn/p1", None)
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            until(&stack).await,
            before,
            "renewed while {held} was held\n{}",
            stack.worker_logs()
        );
        etcd.delete(held, None).await.expect("release");
        let done = stack.wait_operation(&op, Duration::from_secs(60)).await;
        assert_eq!(
            done["state"],
            "SUCCEEDED",
            "{done}\n{}",
            stack.worker_logs()
        );
        assert!(
            until(&stack).await > before,
            "renewed once {held} was released"
        );
    }
}

async fn until(stack: &Stack) -> std::time::SystemTime {
    let until = claimed(stack, "rn", "p1").await.until.expect("an until");
    cm_core::model::to_system_time(&until)
}

/// A claim from the pool takes no lock when nobody else is at work on the
/// slot; it must then never claim while someone is: a key under the slot's
/// lock (a create, delete, expiry or reset of that slot), under the
/// source's (a create counting the source's instances, an eviction), or a
/// writer's under the challenge's (an update, a delete). Each sends the
/// claim to the locked path, where it waits its turn. The keys are put by
/// hand, as a holder's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_without_locks_never_claims_while_the_slot_the_source_or_the_challenge_is_locked() {
    let stack = Stack::start(1).await;
    stack.call_ok(Method::POST, "/api/v1/challenge", Some(json!({"id": "cl", "scenario": "steps", "timeout": "600s", "min": 4, "additional": {"steps": "1"}}))).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready_pool = |all: &[InstanceRecord]| -> BTreeSet<String> {
        all.iter()
            .filter(|r| r.source_id.is_none() && r.status == InstanceStatus::Ready)
            .map(|r| r.identity.to_string())
            .collect()
    };
    while ready_pool(&instances(&stack, "cl").await).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "pool never filled\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Uncontended: claimed without a lock.
    let pool = ready_pool(&instances(&stack, "cl").await);
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "cl", "sourceId": "p0"})),
        )
        .await;
    let p0 = claimed(&stack, "cl", "p0").await;
    assert!(
        pool.contains(p0.identity.as_str()),
        "p0 got a pooled instance"
    );
    assert!(
        stack
            .worker_logs()
            .contains("claimed a pooled instance (no lock)"),
        "the uncontended claim took the path without locks\n{}",
        stack.worker_logs()
    );

    for (source, held) in [
        ("p1", "/cm/lock/instance/cl/p1/w-test"),
        ("p2", "/cm/lock/source/p2/w-test"),
        ("p3", "/cm/lock/challenge/cl/w-test"),
    ] {
        let mut etcd = stack.store.client();
        etcd.put(held, "", None).await.expect("put a lock key");
        let op = stack
            .submit_async(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "cl", "sourceId": source})),
            )
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let early = stack.store.get_instance("cl", source).await.expect("store");
        assert!(
            early.is_none(),
            "{source} got an instance while {held} was held: {early:?}\n{}",
            stack.worker_logs()
        );
        etcd.delete(held, None).await.expect("release");
        stack.wait_succeeded(&op, Duration::from_secs(90)).await;
        let got = claimed(&stack, "cl", source).await;
        assert_eq!(got.status, InstanceStatus::Ready);
    }
}

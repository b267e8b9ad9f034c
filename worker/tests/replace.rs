//! Replacements of an instance's stack (a reset) killed at their two crash
//! windows: during the fresh identity's deploy, and after the switch but
//! before the replaced stack's destroy. Either way a stack is left that no
//! record names; its state is in the store (checkpoints are stored as
//! Pulumi writes them), the janitor's orphan sweep finds it once no lock
//! holds it, and a worker destroys it: the end state is one instance, one
//! stack state, nothing deployed that nothing answers for.

mod support;

use std::time::{Duration, Instant};

use cm_core::{Identity, store::StoreOptions};
use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

/// The killed worker's lease: its locks are freed this long after it died.
const SHORT_LEASE: (&str, &str) = ("CM_LEASE_TTL", "3");

async fn janitor(stack: &Stack) -> cm_janitor::Janitor {
    let js = async_nats::jetstream::new(
        async_nats::connect(stack.nats.url.as_str())
            .await
            .expect("nats"),
    );
    let store = cm_core::store::Store::connect(
        std::slice::from_ref(&stack.etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store");
    cm_janitor::Janitor::new(store, js, 1000)
}

async fn create_ready(stack: &Stack, cid: &str, sid: &str, additional: Value) -> Identity {
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": cid, "scenario": "steps", "additional": additional})),
        )
        .await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": cid, "sourceId": sid})),
        )
        .await;
    claimed_identity(stack, cid, sid).await
}

async fn claimed_identity(stack: &Stack, cid: &str, sid: &str) -> Identity {
    stack
        .store
        .get_instance(cid, sid)
        .await
        .expect("store")
        .expect("the instance exists")
        .value
        .identity
}

/// Queues a reset without waiting; returns its operation id.
async fn queue_reset(stack: &Stack, cid: &str, sid: &str) -> String {
    stack
        .submit_async(
            Method::POST,
            &format!("/api/v1/instance/{cid}/{sid}/reset"),
            None,
        )
        .await
}

/// The identities that have a stack state under `cid`.
async fn stacks(stack: &Stack, cid: &str) -> Vec<Identity> {
    let prefix = format!("/cm/stack/{cid}/");
    let resp = stack
        .store
        .client()
        .get(
            prefix.as_str(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("etcd");
    resp.kvs()
        .iter()
        .filter_map(|kv| {
            String::from_utf8_lossy(kv.key())
                .strip_prefix(prefix.as_str())?
                .parse()
                .ok()
        })
        .collect()
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

/// Runs orphan sweeps until `cid` has exactly the stack of `keep` left
/// (the orphans destroyed by a worker, then their states deleted).
async fn sweep_until_only(
    stack: &Stack,
    janitor: &cm_janitor::Janitor,
    cid: &str,
    keep: &Identity,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = stacks(stack, cid).await;
        if left == [keep.clone()] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stacks left besides {keep}: {left:?}\n{}",
            stack.worker_logs()
        );
        janitor.sweep_orphans().await.expect("sweep");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_killed_mid_deploy_leaves_an_orphan_the_janitor_reclaims() {
    let mut stack = Stack::start(0).await;
    stack.spawn_worker_with(&[SHORT_LEASE]);
    let old = create_ready(
        &stack,
        "rs",
        "team-a",
        json!({"steps": "6", "step_ms": "600"}),
    )
    .await;
    let op = queue_reset(&stack, "rs", "team-a").await;

    // The fresh identity's deploy is half way: its checkpoints are stored
    // under its own identity, which no record names yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    let fresh = loop {
        let mut found = None;
        for identity in stacks(&stack, "rs").await {
            if identity != old
                && let Some(state) = stack.stack_state_bytes("rs", &identity).await
                && step_count(&state) >= 2
                && support::pulumi_processes(&identity) > 0
            {
                found = Some(identity);
            }
        }
        if let Some(identity) = found {
            break identity;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of the fresh identity stored while Pulumi ran\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let janitor = janitor(&stack).await;
    assert!(
        !stack
            .store
            .orphan_stacks()
            .await
            .expect("orphans")
            .iter()
            .any(|(_, i)| *i == fresh),
        "a stack being deployed (its identity locked) is no orphan\n{}",
        stack.worker_logs()
    );
    stack.kill_worker(0);

    // Another worker answers the redelivered reset (with another fresh
    // identity); the dead run's stack is an orphan once its lease is gone.
    stack.spawn_worker();
    let done = stack.wait_operation(&op, Duration::from_secs(120)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    let now = claimed_identity(&stack, "rs", "team-a").await;
    assert!(now != old && now != fresh, "reset to a third identity");
    sweep_until_only(&stack, &janitor, "rs", &now).await;
    assert!(
        stack
            .store
            .orphan_stacks()
            .await
            .expect("orphans")
            .is_empty(),
        "nothing orphaned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_killed_after_its_switch_leaves_the_old_stack_to_the_janitor() {
    const PAUSE: &str = "instance-reset-before-retire";
    let pauses = tempfile::tempdir().expect("tempdir");
    let dir = pauses.path().to_str().expect("utf-8").to_owned();
    let armed = format!("pause:{PAUSE}");
    let mut stack = Stack::start(0).await;
    stack.spawn_worker_with(&[
        SHORT_LEASE,
        ("CM_FAILPOINT", &armed),
        ("CM_FAILPOINT_DIR", &dir),
    ]);
    let old = create_ready(&stack, "rt", "team-a", json!({"steps": "2"})).await;
    let op = queue_reset(&stack, "rt", "team-a").await;
    stack.wait_paused(pauses.path(), PAUSE).await;
    let switched = claimed_identity(&stack, "rt", "team-a").await;
    assert_ne!(switched, old, "the record names the fresh identity");
    let old_state = stack
        .stack_state_bytes("rt", &old)
        .await
        .expect("old state kept");
    assert_eq!(step_count(&old_state), 2, "the old stack is still deployed");
    stack.kill_worker(0);

    // The redelivered reset answers the switched record; the old stack,
    // which no record names, is the janitor's to find.
    stack.spawn_worker();
    let done = stack.wait_operation(&op, Duration::from_secs(120)).await;
    assert_eq!(
        done["state"],
        "SUCCEEDED",
        "{done}\n{}",
        stack.worker_logs()
    );
    assert_eq!(claimed_identity(&stack, "rt", "team-a").await, switched);
    let janitor = janitor(&stack).await;
    sweep_until_only(&stack, &janitor, "rt", &switched).await;
    let logs = stack.worker_logs();
    assert!(
        logs.contains("orphaned stack destroyed"),
        "a worker destroyed the old stack\n{logs}"
    );
}

/// A pool refill whose worker dies mid-deploy leaves a reservation
/// `Deploying` that the redelivered refill counts as pooled and nobody can
/// claim: the pool stays one short for good. The orphan sweep hands it to a
/// worker, which destroys what it holds and asks for a refill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refill_killed_mid_deploy_leaves_a_reservation_resumed_or_reclaimed() {
    let mut stack = Stack::start(0).await;
    stack.spawn_worker_with(&[SHORT_LEASE]);
    stack.call_ok(Method::POST, "/api/v1/challenge", Some(json!({ "id": "pl", "scenario": "steps", "min": 1, "max": 0, "additional": {"steps": "6", "step_ms": "600"} }))).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reserved = loop {
        let pooled = stack.store.list_pooled("pl").await.expect("store");
        if let Some(r) = pooled.first()
            && let Some(state) = stack.stack_state_bytes("pl", &r.value.identity).await
            && step_count(&state) >= 2
        {
            assert_eq!(r.value.status, cm_core::model::InstanceStatus::Deploying);
            break r.value.identity.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no half-deployed pool reservation\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stack.kill_worker(0);
    // Once the dead worker's lease has expired nothing holds the
    // reservation: the orphan sweep lists it (the path for a pool no refill
    // visits again).
    let janitor = janitor(&stack).await;
    let abandoned = ("pl".to_owned(), reserved.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stack
        .store
        .orphan_stacks()
        .await
        .expect("store")
        .contains(&abandoned)
    {
        assert!(
            Instant::now() < deadline,
            "the abandoned reservation was never listed for reclaim"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Whichever comes first, the redelivered refill (it resumes the
    // reservation) or the sweep's reclaim (it destroys it and asks for a
    // refill), the pool ends with one ready instance and no other stack.
    stack.spawn_worker();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let pooled = stack.store.list_pooled("pl").await.expect("store");
        if let [only] = pooled.as_slice()
            && only.value.status == cm_core::model::InstanceStatus::Ready
        {
            break only.value.identity.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the pool never got a ready instance for the abandoned reservation: {pooled:?}\n{}",
            stack.worker_logs()
        );
        janitor.sweep_orphans().await.expect("sweep");
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let state = stack
        .stack_state_bytes("pl", &ready)
        .await
        .expect("the ready instance's state");
    assert_eq!(
        step_count(&state),
        6,
        "a whole stack (resumed: {})",
        ready == reserved
    );
    sweep_until_only(&stack, &janitor, "pl", &ready).await;
}

/// How the reset's run on its fresh identity is lost.
#[derive(Clone, Copy, PartialEq)]
enum LostRun {
    /// Its worker's lease is revoked (the worker lives on).
    LeaseRevoked,
    /// Its worker is `kill -9`ed.
    WorkerKilled,
}

/// A run whose lease is lost before its first checkpoint is recorded (the
/// lease revoked while the checkpoint writer waits at
/// `checkpoint-pointer-first`) has already started what it deploys: here a
/// reset's fresh identity, whose `tcp-flag` service is up. That run must
/// still record its state (under its run marker, its lock gone), so the
/// fresh stack is an orphan the sweep can destroy, not a service nobody
/// knows of. Before, the checkpoints of a run that lost its lock were
/// dropped, and the service ran for good (the fault soak found three, seed
/// `1796209723941220641`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_lost_its_lease_still_records_what_it_deployed() {
    lost_fresh_run(LostRun::LeaseRevoked).await;
}

/// The same run, its worker `kill -9`ed before the first checkpoint is
/// stored: the new stack's state was recorded before the run started
/// (empty, marked mid-`up`), so the sweep's destroy runs `up` first and
/// stops the service. Before, nothing named the stack (the soak found one,
/// seed `1796212575220296798`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_killed_before_its_first_checkpoint_leaves_a_stack_the_sweep_destroys() {
    lost_fresh_run(LostRun::WorkerKilled).await;
}

/// The `tcp-flag` tests of this binary, one at a time: each tells its
/// services from others' by the servers started since it began.
static SERVICES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn lost_fresh_run(how: LostRun) {
    let _alone = SERVICES.lock().await;
    const PAUSE: &str = "checkpoint-pointer-first";
    cm_testkit::provider_plugin("localservice");
    let servers = support::services::NewServers::since_now();
    let pauses = tempfile::tempdir().expect("tempdir");
    let dir = pauses.path().to_str().expect("utf-8").to_owned();
    let armed = format!("pause:{PAUSE}");
    let mut stack = Stack::start(0).await;
    stack.spawn_worker_with(&[SHORT_LEASE]);
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "lost", "scenario": "tcp-flag", "timeout": "600s"})),
        )
        .await;
    stack
        .call_ok(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "lost", "sourceId": "p1"})),
        )
        .await;
    let first = claimed_identity(&stack, "lost", "p1").await;
    let owner = |pid: u32| support::services::owner_stack(pid).unwrap_or_default();

    // The next worker holds its runs' first pointer write.
    stack.kill_worker(0);
    stack.spawn_worker_with(&[
        SHORT_LEASE,
        ("CM_FAILPOINT", &armed),
        ("CM_FAILPOINT_DIR", &dir),
    ]);
    let op = queue_reset(&stack, "lost", "p1").await;
    stack.wait_paused(pauses.path(), PAUSE).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let fresh = loop {
        if let Some((pid, _)) = servers
            .started()
            .into_iter()
            .find(|(pid, _)| owner(*pid) != first.as_str())
        {
            break owner(pid);
        }
        assert!(
            Instant::now() < deadline,
            "the reset's fresh service never started\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    match how {
        LostRun::LeaseRevoked => {
            // The run's locks hang on the worker's lease: revoke it. The
            // run's checkpoint, let go, is recorded all the same (its
            // first: the service may or may not be in it yet; the state
            // says its `up` had not ended).
            stack.revoke_lock_leases().await;
            support::resume(pauses.path(), PAUSE);
            let fresh: Identity = fresh.parse().expect("identity");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let state = stack
                    .read_stack_state("lost", &fresh)
                    .await
                    .and_then(Result::ok);
                // Past the empty state recorded before the run: a
                // checkpoint Pulumi wrote (it names the root resource).
                let by_pulumi = state
                    .as_deref()
                    .is_some_and(|b| String::from_utf8_lossy(b).contains("pulumi:pulumi:Stack"));
                if by_pulumi {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the lost run's checkpoint was never recorded\n{}",
                    stack.worker_logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        LostRun::WorkerKilled => {
            stack.kill_worker(1);
            stack.spawn_worker_with(&[SHORT_LEASE]);
        }
    }

    // The reset is retried (under a new lease, or by the new worker after
    // the ack deadline) and switches to another identity; the sweep
    // destroys every stack the record does not name.
    stack.wait_succeeded(&op, Duration::from_secs(120)).await;
    let kept = claimed_identity(&stack, "lost", "p1").await;
    assert_ne!(
        kept.as_str(),
        fresh,
        "the retried reset deploys its own identity"
    );
    let janitor = janitor(&stack).await;
    sweep_until_only(&stack, &janitor, "lost", &kept).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let strays: Vec<(u32, u16, String)> = servers
            .started()
            .into_iter()
            .filter(|(pid, _)| owner(*pid) != kept.as_str())
            .map(|(pid, port)| (pid, port, owner(pid)))
            .collect();
        if strays.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "services running that no record names (the lost run's {fresh} among them?): {strays:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

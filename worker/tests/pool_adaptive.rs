//! Adaptive pools (`pool: adaptive`) against the real stack: the pool grows
//! with a burst of claims (ahead of the claims still to come), never past
//! `max` nor past the cluster's refill slots, shrinks back to `min` once
//! claims stop (on the janitor's reviews), and a steady rate of claims
//! destroys nothing (on a challenge without min or max: the pool is all
//! demand).

mod support;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cm_core::{Identity, model::InstanceStatus};
use reqwest::Method;
use serde_json::json;
use support::Stack;

/// The two tests time the pool against a claim rate: one at a time, so
/// neither slows the other's deploys.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Worker settings that make the estimator move within a test's seconds.
const FAST_ESTIMATOR: [(&str, &str); 5] = [
    ("CM_POOL_RATE_FAST", "2s"),
    ("CM_POOL_RATE_SLOW", "6s"),
    ("CM_POOL_HEADROOM", "3"),
    ("CM_REFILL_BATCH", "4"),
    ("CM_REFILL_SLOTS", "2"),
];

/// An in-process janitor that only reviews adaptive pools, every second.
fn start_janitor(
    stack: &Stack,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = cm_janitor::JanitorConfig {
        pool_review: Some(Duration::from_secs(1)),
        ..support::janitor_config(stack, Duration::from_secs(3600))
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        cm_janitor::run(config, async {
            let _ = stopped.await;
        })
        .await
        .expect("janitor");
    });
    (stop, task)
}

/// What a sampler saw of one challenge's instances, every 50 ms.
#[derive(Default)]
struct Seen {
    most_total: AtomicUsize,
    most_pooled: AtomicUsize,
    most_deploying: AtomicUsize,
}

fn sample(stack: &Stack, cid: &'static str) -> (Arc<Seen>, Arc<AtomicBool>) {
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (store, s, halt) = (stack.store.clone(), seen.clone(), stop.clone());
    tokio::spawn(async move {
        while !halt.load(Ordering::Relaxed) {
            if let Ok(all) = store.list_instances(cid).await {
                let pooled: Vec<_> = all.iter().filter(|r| r.source_id.is_none()).collect();
                let deploying = pooled
                    .iter()
                    .filter(|r| r.status == InstanceStatus::Deploying)
                    .count();
                s.most_total.fetch_max(all.len(), Ordering::Relaxed);
                s.most_pooled.fetch_max(pooled.len(), Ordering::Relaxed);
                s.most_deploying.fetch_max(deploying, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (seen, stop)
}

async fn pooled(stack: &Stack, cid: &str) -> Vec<(Identity, InstanceStatus)> {
    stack
        .store
        .list_pooled(cid)
        .await
        .expect("store")
        .into_iter()
        .map(|v| (v.value.identity, v.value.status))
        .collect()
}

async fn claim(stack: &Stack, cid: &str, sid: &str) {
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": cid, "sourceId": sid})),
        )
        .await;
    assert_eq!(status, 200, "claim {sid}: {body}\n{}", stack.worker_logs());
}

async fn register(stack: &Stack, body: serde_json::Value) {
    let (status, answer) = stack
        .call(Method::POST, "/api/v1/challenge", Some(body))
        .await;
    assert_eq!(status, 200, "{answer}\n{}", stack.worker_logs());
    assert_eq!(
        answer["pool"], "adaptive",
        "the mode is part of the challenge: {answer}"
    );
}

async fn wait_until<F: Fn(&[(Identity, InstanceStatus)]) -> bool>(
    stack: &Stack,
    cid: &str,
    limit: Duration,
    what: &str,
    done: F,
) {
    let deadline = Instant::now() + limit;
    loop {
        let now = pooled(stack, cid).await;
        if done(&now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the pool is {now:?}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_pool_grows_with_a_burst_within_max_and_the_slots_and_returns_to_min() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start_with(2, &FAST_ESTIMATOR).await;
    let (stop_janitor, janitor) = start_janitor(&stack);
    register(
        &stack,
        json!({"id": "burst", "scenario": "identity", "timeout": "600s",
               "min": 1, "max": 13, "pool": "adaptive"}),
    )
    .await;
    let ready = |p: &[(Identity, InstanceStatus)]| {
        p.iter()
            .filter(|(_, s)| *s == InstanceStatus::Ready)
            .count()
    };
    wait_until(
        &stack,
        "burst",
        Duration::from_secs(60),
        "min never reached",
        |p| ready(p) == 1,
    )
    .await;
    let (seen, stop_sampling) = sample(&stack, "burst");

    // A burst: 10 claims in about two seconds.
    for i in 0..10 {
        claim(&stack, "burst", &format!("team-{i}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let demand = stack.store.get_demand("burst").await.expect("demand");
    assert_eq!(
        demand.claims, 10,
        "every claim is in the estimate: {demand:?}"
    );
    assert!(
        demand.deploy_seconds > 0.0,
        "deploy time measured: {demand:?}"
    );

    // The demand asks for more than max leaves (13 - 10 claimed = 3): the
    // pool grows past min, to 3.
    wait_until(
        &stack,
        "burst",
        Duration::from_secs(60),
        "the pool never grew",
        |p| ready(p) == 3,
    )
    .await;

    // Claims stop: the janitor's reviews bring it back to min.
    wait_until(
        &stack,
        "burst",
        Duration::from_secs(90),
        "the pool never shrank back to min",
        |p| p.len() == 1,
    )
    .await;
    stop_sampling.store(true, Ordering::Relaxed);
    let (total, most_pooled, deploying) = (
        seen.most_total.load(Ordering::Relaxed),
        seen.most_pooled.load(Ordering::Relaxed),
        seen.most_deploying.load(Ordering::Relaxed),
    );
    assert!(total <= 13, "{total} instances at once, max is 13");
    assert!(most_pooled >= 3, "the pool grew to {most_pooled}");
    assert!(
        deploying <= 2,
        "{deploying} pool deploys at once; the cluster has 2 refill slots"
    );
    let _ = stop_janitor.send(());
    let _ = janitor.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_claim_rate_destroys_no_pooled_instance() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start_with(2, &FAST_ESTIMATOR).await;
    let (stop_janitor, janitor) = start_janitor(&stack);
    register(
        &stack,
        // min 0, no max: the pool exists only through the demand.
        json!({"id": "steady", "scenario": "identity", "timeout": "600s",
               "pool": "adaptive"}),
    )
    .await;
    assert!(
        pooled(&stack, "steady").await.is_empty(),
        "no demand, no pool"
    );

    // One claim every 700 ms for 21 s; every identity ever pooled is noted
    // (a sampler, every 50 ms, whatever the claims take).
    let ever_pooled = Arc::new(std::sync::Mutex::new(HashSet::<Identity>::new()));
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (store, seen, halt) = (stack.store.clone(), ever_pooled.clone(), sampling.clone());
        tokio::spawn(async move {
            while !halt.load(Ordering::Relaxed) {
                if let Ok(pool) = store.list_pooled("steady").await
                    && let Ok(mut seen) = seen.lock()
                {
                    seen.extend(pool.into_iter().map(|v| v.value.identity));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let snapshot = |set: &Arc<std::sync::Mutex<HashSet<Identity>>>| {
        set.lock().map(|s| s.clone()).unwrap_or_default()
    };
    let mut claimed: HashSet<Identity> = HashSet::new();
    let mut warm: Option<HashSet<Identity>> = None;
    let started = Instant::now();
    for i in 0..30 {
        let sid = format!("player-{i}");
        claim(&stack, "steady", &sid).await;
        let rec = stack
            .store
            .get_instance("steady", &sid)
            .await
            .expect("store")
            .expect("claimed");
        claimed.insert(rec.value.identity);
        tokio::time::sleep_until((started + Duration::from_millis(700 * (i + 1))).into()).await;
        // After the first 8 s the estimate has settled: from then on, no
        // pooled instance may vanish other than by a claim.
        if i == 11 {
            warm = Some(snapshot(&ever_pooled));
        }
    }
    sampling.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let ever_pooled = snapshot(&ever_pooled);
    let warm = warm.expect("warm-up noted");
    let still: HashSet<Identity> = pooled(&stack, "steady")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let destroyed: Vec<&Identity> = ever_pooled
        .iter()
        .filter(|id| !warm.contains(*id) && !claimed.contains(*id) && !still.contains(*id))
        .collect();
    assert!(
        destroyed.is_empty(),
        "pooled instances deployed during the steady phase were destroyed unclaimed: {destroyed:?}"
    );
    // And the claims were served from the pool (an identity seen pooled
    // before its claim), not deployed while the player waited.
    let from_pool = claimed
        .iter()
        .filter(|id| ever_pooled.contains(*id))
        .count();
    assert!(
        from_pool >= 24,
        "{from_pool} of {} claims served from the pool",
        claimed.len()
    );
    let _ = stop_janitor.send(());
    let _ = janitor.await;
}

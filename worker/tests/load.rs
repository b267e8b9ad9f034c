//! Load: 500 instance requests over 50 challenges (one in five pooled) from
//! 50 concurrent clients against two worker processes. Every request ends in
//! success or a clear error, none is lost, no instance exists twice, and the
//! store and the Pulumi stacks agree afterwards. Prints its figures.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cm_core::model::InstanceStatus;
use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

const CHALLENGES: usize = 50;
const REQUESTS: usize = 500;
const CLIENTS: usize = 50;
/// Every tenth request repeats an earlier (challenge, source) pair.
const REPEAT_EVERY: usize = 10;

fn challenge_id(n: usize) -> String {
    format!("load-{n:02}")
}

fn pooled(n: usize) -> bool {
    n.is_multiple_of(5)
}

/// The (challenge, source) pair of request `i`.
fn pair(i: usize) -> (String, String) {
    let j = if i % REPEAT_EVERY == REPEAT_EVERY - 1 {
        i - 1
    } else {
        i
    };
    (
        challenge_id(j % CHALLENGES),
        format!("team-{}", j / CHALLENGES),
    )
}

#[derive(Debug)]
struct Outcome {
    pair: (String, String),
    status: u16,
    body: Value,
    took: Duration,
}

/// Polls an operation the API stopped waiting for until it ends.
async fn finish(stack: &Stack, answer: &Value) -> (u16, Value) {
    let msg = answer["message"].as_str().unwrap_or_default();
    let id = msg.rsplit('/').next().unwrap_or_default().to_owned();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (status, body) = stack
            .call(Method::GET, &format!("/api/v1/operation/{id}"), None)
            .await;
        if status == 200 && body["state"] != "PENDING" && !body["state"].is_null() {
            let outcome = &body["result"];
            // A failure answers as REST would have: AlreadyExists is 409.
            return match outcome.get("failure") {
                Some(f) if f["code"] == 6 || f["code"] == "ALREADY_EXISTS" => (409, f.clone()),
                Some(f) => (500, f.clone()),
                None => (200, body),
            };
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} never ended: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_requests_fifty_clients_two_workers() {
    let stack = Arc::new(Stack::start(2).await);
    for n in 0..CHALLENGES {
        let mut body = json!({"id": challenge_id(n), "scenario": "identity", "timeout": "3600s"});
        if pooled(n) {
            body["min"] = json!(2);
            body["max"] = json!(12);
        }
        let (status, resp) = stack
            .call(Method::POST, "/api/v1/challenge", Some(body))
            .await;
        assert_eq!(status, 200, "{resp}\n{}", stack.worker_logs());
    }

    let next = Arc::new(Mutex::new(0usize));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (stack, next, outcomes) = (stack.clone(), next.clone(), outcomes.clone());
        clients.spawn(async move {
            loop {
                let i = {
                    let mut n = next.lock().expect("counter");
                    if *n >= REQUESTS {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                let (cid, sid) = pair(i);
                let t = Instant::now();
                let (mut status, mut body) = stack
                    .call(
                        Method::POST,
                        "/api/v1/instance",
                        Some(json!({"challengeId": cid, "sourceId": sid})),
                    )
                    .await;
                if status == 504 {
                    (status, body) = finish(&stack, &body).await;
                }
                outcomes.lock().expect("outcomes").push(Outcome {
                    pair: (cid, sid),
                    status,
                    body,
                    took: t.elapsed(),
                });
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        joined.expect("client");
    }
    let elapsed = started.elapsed();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    assert_eq!(outcomes.len(), REQUESTS, "every request got an answer");

    // Each pair: exactly one success; repeats of a pair are refused 409.
    let mut by_pair: BTreeMap<(String, String), Vec<&Outcome>> = BTreeMap::new();
    for o in &outcomes {
        by_pair.entry(o.pair.clone()).or_default().push(o);
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for o in &outcomes {
        *statuses.entry(o.status).or_default() += 1;
    }
    for (pair, answers) in &by_pair {
        let ok = answers.iter().filter(|o| o.status == 200).count();
        assert_eq!(ok, 1, "{pair:?}: {answers:#?}\n{}", stack.worker_logs());
        for o in answers.iter().filter(|o| o.status != 200) {
            assert_eq!(o.status, 409, "{pair:?}: unexpected {o:#?}");
            let msg = o.body["message"].as_str().unwrap_or_default();
            assert!(msg.contains("already exists"), "a clear 409: {}", o.body);
        }
    }
    assert!(
        support::wait_drained(
            &stack.nats.url,
            Duration::from_millis(500),
            Duration::from_secs(300)
        )
        .await,
        "the queue (refills) did not drain\n{}",
        stack.worker_logs()
    );

    // The store and the stacks agree: one ready record per pair, each with
    // a stack state, every stack state belonging to a record, and the
    // identities all distinct.
    let mut identities = BTreeSet::new();
    let mut stacks_expected = BTreeSet::new();
    for n in 0..CHALLENGES {
        let cid = challenge_id(n);
        for rec in stack.store.list_instances(&cid).await.expect("list") {
            assert_eq!(
                rec.status,
                InstanceStatus::Ready,
                "{cid} {}: the workers' log lines about it:\n{}",
                rec.identity,
                stack
                    .worker_logs()
                    .lines()
                    .filter(|l| {
                        l.contains(rec.identity.as_str())
                            || (l.contains(&format!("challenge={cid}"))
                                && (l.contains("WARN") || l.contains("ERROR")))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            assert!(
                identities.insert(rec.identity.to_string()),
                "identity {} twice",
                rec.identity
            );
            assert!(
                stack
                    .store
                    .get_stack(&cid, &rec.identity)
                    .await
                    .expect("stack")
                    .is_some(),
                "{cid} {} has no stack state",
                rec.identity
            );
            stacks_expected.insert(format!("/cm/stack/{cid}/{}", rec.identity));
            if let Some(sid) = &rec.source_id {
                assert!(
                    by_pair.contains_key(&(cid.clone(), sid.clone())),
                    "unrequested {cid}/{sid}"
                );
            }
        }
    }
    let claimed: usize = {
        let mut c = 0;
        for (cid, sid) in by_pair.keys() {
            if stack
                .store
                .get_instance(cid, sid)
                .await
                .expect("get")
                .is_some()
            {
                c += 1;
            }
        }
        c
    };
    assert_eq!(claimed, by_pair.len(), "every pair holds its instance");
    let stacks = stack
        .store
        .client()
        .get(
            "/cm/stack/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("etcd");
    let stored: BTreeSet<String> = stacks
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok().map(str::to_owned))
        .collect();
    assert_eq!(
        stored.len(),
        stacks_expected.len(),
        "one stack state per instance, no orphan"
    );

    let mut took: Vec<Duration> = outcomes.iter().map(|o| o.took).collect();
    took.sort();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p) as usize];
    println!(
        "load: {REQUESTS} requests ({} pairs, {} repeats), {CLIENTS} clients, 2 workers: {elapsed:?} total, \
         {:.1} instances/min, answers {statuses:?}, latency p50 {:?} p99 {:?} max {:?}; \
         {} instances stored (incl. pools), {} stack states",
        by_pair.len(),
        REQUESTS - by_pair.len(),
        by_pair.len() as f64 / elapsed.as_secs_f64() * 60.0,
        pct(0.5),
        pct(0.99),
        took[took.len() - 1],
        identities.len(),
        stored.len(),
    );
}

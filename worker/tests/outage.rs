//! Outages of the queue and the store under real processes: nats-server
//! killed and restarted while clients write (no accepted command is lost),
//! etcd killed and restarted (the API answers 503 at once while it is away,
//! and API and worker recover without a restart of their own).

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

/// What one client request got back.
#[derive(Debug)]
struct Answer {
    id: String,
    status: u16,
    body: Value,
    sent: Duration,
    took: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restart_under_load_loses_no_accepted_command() {
    let mut stack = Stack::start(2).await;
    // Warm up: the scenario is compiled once, before the load.
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "warm-up", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..12 {
        let (http, api, stop) = (http.clone(), stack.api.clone(), stop.clone());
        clients.spawn(async move {
            let mut answers = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("load-{c}-{n}");
                n += 1;
                let sent = t0.elapsed();
                let sent_req = http
                    .post(format!("{api}/api/v1/challenge"))
                    .json(&json!({"id": id, "scenario": "identity"}))
                    .send()
                    .await;
                // No answer at all (a hang or a dropped connection) is status 0.
                let (status, body) = match sent_req {
                    Ok(resp) => (
                        resp.status().as_u16(),
                        resp.json::<Value>().await.unwrap_or(Value::Null),
                    ),
                    Err(e) => (0, Value::String(e.to_string())),
                };
                let took = t0.elapsed() - sent;
                answers.push(Answer {
                    id,
                    status,
                    body,
                    sent,
                    took,
                });
            }
            answers
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.nats.stop();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.nats.start();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    while let Some(joined) = clients.join_next().await {
        answers.extend(joined.expect("client task"));
    }
    let in_outage = outage.elapsed();
    let drained = support::wait_drained(
        &stack.nats.url,
        Duration::from_millis(200),
        Duration::from_secs(90),
    )
    .await;
    let unanswered: Vec<&Answer> = answers.iter().filter(|a| a.status == 0).collect();
    assert!(
        unanswered.is_empty() && drained,
        "drained: {drained}; unanswered: {unanswered:#?}\n{}",
        stack.worker_logs()
    );

    let (mut ok, mut timed_out, mut refused) = (0, 0, 0);
    for a in &answers {
        match a.status {
            // Accepted and done: it must be there.
            200 => ok += 1,
            // Accepted, answer not awaited in time: it must be done by now.
            504 => {
                timed_out += 1;
                let op = a.body["message"].as_str().unwrap_or_default();
                assert!(
                    op.contains("operation"),
                    "{}: 504 names its operation: {}",
                    a.id,
                    a.body
                );
            }
            // Refused before anything was queued: the client was told so.
            503 => {
                refused += 1;
                let msg = a.body["message"].as_str().unwrap_or_default();
                assert!(
                    msg.contains("unavailable"),
                    "{}: unclear 503: {}",
                    a.id,
                    a.body
                );
                continue;
            }
            other => panic!("{}: unexpected answer {other}: {}", a.id, a.body),
        }
        let stored = stack.store.get_challenge(&a.id).await.expect("store");
        assert!(
            stored.is_some(),
            "{} was accepted ({}) but is lost\n{}",
            a.id,
            a.status,
            stack.worker_logs()
        );
    }
    let slowest = answers.iter().max_by_key(|a| a.took).expect("answers");
    println!(
        "nats restart: {} requests in {in_outage:?}: {ok} ok, {timed_out} accepted late (504), {refused} refused (503); slowest answer {:?} (sent at {:?})",
        answers.len(),
        slowest.took,
        slowest.sent,
    );
    assert!(ok > 0 && answers.len() > 24, "the load ran: {answers:?}");

    // And the system works normally afterwards.
    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "after-restart", "scenario": "identity"})),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_outage_answers_503_then_recovers_without_restarts() {
    let mut stack = Stack::start(1).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "steady", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    stack.etcd.stop();
    for (method, path, body) in [
        (Method::GET, "/api/v1/challenge/steady", None),
        (
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "steady", "sourceId": "team-x"})),
        ),
    ] {
        let started = Instant::now();
        let (status, answer) = stack.call(method.clone(), path, body).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{method} {path} while etcd is away: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("store is unavailable")),
            "a clear message: {answer}"
        );
        assert!(
            took < Duration::from_secs(6),
            "{method} {path} answered after {took:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stack.etcd.start();

    // The API recovers on its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = stack
            .call(Method::GET, "/api/v1/challenge/steady", None)
            .await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "API still failing 30 s after etcd came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // So does the worker (its lease, locks and store client): a deploy works.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = stack
            .call(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "steady", "sourceId": "team-x"})),
            )
            .await;
        if status == 200 {
            assert!(
                body["connectionInfo"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker still failing 60 s after etcd came back: {status} {body}\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every lock is released (in the background, retried through the
    // outage): none is left held by the worker's still-living lease.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = stack
            .store
            .client()
            .get(
                "/cm/lock/",
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await
            .expect("etcd")
            .count();
        if held == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} lock keys still held 20 s after the outage\n{}",
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

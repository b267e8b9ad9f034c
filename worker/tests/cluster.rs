//! The system on clustered servers, as production runs it: a 3-node
//! nats-server cluster (the project's streams at replicas 3) and a 3-member
//! etcd cluster, every binary given all the endpoints. Instances are created
//! while the commands stream's leader is killed, then while etcd's leader is
//! killed; afterwards every instance asked for exists exactly once with its
//! own identity, the queue is drained and no lock key is left.

mod support;

use std::{collections::BTreeSet, time::Duration};

use cm_core::store::{Store, StoreOptions};
use cm_testkit::cluster::{EtcdCluster, NatsCluster};
use serde_json::{Value, json};

/// POST /api/v1/instance as a careful client does while the cluster fails
/// over: retried on 503/504 or no answer, every try with the same
/// `Idempotency-Key`, so the tries are one command and the answer is its
/// result. Gives the status that settled it and how many tries it took.
async fn create(http: &reqwest::Client, api: &str, source: &str) -> (u16, u32) {
    let body = json!({"challengeId": "cl", "sourceId": source});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut tries = 0;
    loop {
        tries += 1;
        let status = match http
            .post(format!("{api}/api/v1/instance"))
            .header("Idempotency-Key", format!("cluster-create-{source}"))
            .json(&body)
            .send()
            .await
        {
            Ok(resp) => resp.status().as_u16(),
            Err(_) => 0,
        };
        if !matches!(status, 0 | 503 | 504) || tokio::time::Instant::now() > deadline {
            return (status, tries);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates an instance for each of `sources` at once, runs `fault` while
/// they are in flight, and checks that each was created.
async fn creates_during(
    http: &reqwest::Client,
    api: &str,
    sources: &[String],
    fault: impl FnOnce(),
    logs: &dyn Fn() -> String,
) {
    let creates = sources
        .iter()
        .map(|s| {
            let (http, api, s) = (http.clone(), api.to_owned(), s.clone());
            tokio::spawn(async move { create(&http, &api, &s).await })
        })
        .collect::<Vec<_>>();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fault();
    for (source, task) in sources.iter().zip(creates) {
        let (status, tries) = task.await.expect("create task");
        assert_eq!(
            status,
            200,
            "{source}: {status} after {tries} tries\n{}",
            logs()
        );
    }
}

/// Index of the member leading the commands stream.
async fn stream_leader(nats: &NatsCluster) -> usize {
    let client = cm_core::nats::connect(&nats.url(), "cluster-test", &Default::default())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(cm_core::queue::COMMANDS_STREAM)
        .await
        .expect("commands stream");
    let info = stream.info().await.expect("stream info");
    let cluster = info.cluster.as_ref().expect("a clustered stream");
    assert_eq!(
        cluster.replicas.len(),
        2,
        "the commands stream has a leader and two replicas: {cluster:?}"
    );
    let leader = cluster.leader.as_deref().expect("a stream leader");
    nats.index_of(leader).expect("leader is a member")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_survive_the_loss_of_the_stream_leader_and_the_etcd_leader() {
    let mut nats = NatsCluster::start(3).await;
    let mut etcd = EtcdCluster::start(3);
    let nats_url = nats.url();
    let etcd_endpoints = etcd.urls.join(",");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = format!("http://{}", listener.local_addr().expect("addr"));
    let mut config = support::api_config(&nats_url, &etcd.urls[0]);
    config.connection.etcd_endpoints = etcd.urls.clone();
    config.connection.queue.replicas = 3;
    let (stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(async move {
        cm_api::run(config, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("API");
    });
    let logs = tempfile::tempdir().expect("logs");
    let mut workers = Vec::new();
    for n in 0..2 {
        let log = std::fs::File::create(logs.path().join(format!("worker-{n}.log"))).expect("log");
        workers.push(
            support::worker_command(&nats_url, &etcd_endpoints)
                .env("CM_STREAM_REPLICAS", "3")
                .env("CM_LEASE_TTL", "5")
                .stderr(log)
                .spawn()
                .expect("spawn cm-worker"),
        );
    }
    let worker_logs = || {
        (0..2)
            .map(|n| {
                std::fs::read_to_string(logs.path().join(format!("worker-{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let http = reqwest::Client::new();
    support::wait_healthy(&http, &api).await;

    let resp = http
        .post(format!("{api}/api/v1/challenge"))
        .json(&json!({"id": "cl", "scenario": "identity"}))
        .send()
        .await
        .expect("challenge");
    assert_eq!(resp.status().as_u16(), 200, "{}", worker_logs());

    // Phase 1: kill the commands stream's leader while creates are in flight.
    let leader = stream_leader(&nats).await;
    let sources: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    let (first, second) = sources.split_at(4);
    creates_during(&http, &api, first, || nats.kill(leader), &worker_logs).await;
    nats.start_member(leader);
    nats.wait_jetstream().await;

    // Phase 2: kill etcd's leader while creates are in flight.
    let leader = etcd.leader().await.expect("an etcd leader");
    creates_during(&http, &api, second, || etcd.kill(leader), &worker_logs).await;
    etcd.start_member(leader);

    // Quiescence: every command settled.
    assert!(
        support::wait_drained(
            &nats_url,
            Duration::from_millis(200),
            Duration::from_secs(120)
        )
        .await,
        "the queue did not drain\n{}",
        worker_logs()
    );

    // Each source has exactly one ready instance, all identities distinct.
    // A read may still answer 503 (retry later) while the restarted etcd
    // member's connections come back: retried, as a client would.
    let mut identities = BTreeSet::new();
    for source in &sources {
        let mut tries = 0;
        let (status, body) = loop {
            tries += 1;
            let resp = http
                .get(format!("{api}/api/v1/instance/cl/{source}"))
                .send()
                .await
                .expect("get");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("json");
            if status != 503 || tries == 60 {
                break (status, body);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(status, 200, "{source}: {body}\n{}", worker_logs());
        let info = body["connectionInfo"].as_str().expect("connection info");
        assert!(
            identities.insert(info.to_owned()),
            "{source} shares {info} with another source"
        );
    }
    let store = Store::connect(&etcd.urls, "/cm", &StoreOptions::default())
        .await
        .expect("store");
    let claimed = store.list_instances("cl").await.expect("instances");
    assert_eq!(
        claimed.len(),
        sources.len(),
        "one record per source: {claimed:?}"
    );

    // No lock left once every command settled (the workers still run, so
    // their locks were released, not expired).
    let mut etcd_client = etcd_client::Client::connect(&etcd.urls, None)
        .await
        .expect("etcd");
    let locks = etcd_client
        .get(
            "/cm/lock/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("locks");
    assert!(
        locks.kvs().is_empty(),
        "lock keys left: {:?}",
        locks
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect::<Vec<_>>()
    );

    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let _ = stop_api.send(());
    let _ = api_task.await;
}

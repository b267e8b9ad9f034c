//! A scenario that deploys a real network service: `examples/tcp-flag`
//! registers a `localservice:index:TcpService` (the provider plugin built from
//! `providers/localservice`), a detached TCP server on loopback answering
//! with the instance's flag. Through the REST API (real nats-server, etcd,
//! worker process, pulumi) and through the driver directly.

mod support;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use cm_core::{Identity, Secret};
use cm_worker::pulumi::{Deployment, Driver, DriverConfig, PreparedScenario, StackState};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{
    Stack,
    services::{
        Reaper, kill, owner_stack, port_of, read_answer, server_pids, servers, wait_refused,
    },
};
use tokio::net::TcpStream;

/// The flag the tcp-flag example derives, computed independently here.
fn expected_flag(identity: &Identity) -> String {
    let digest = Sha256::digest(format!("tcp-flag:{identity}"));
    format!("CTF{{{}}}", &hex::encode(digest)[..16])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flag_instances_serve_their_flag_and_are_gone_after_delete() {
    cm_testkit::provider_plugin("localservice");
    let stack = Stack::start(1).await;
    let mut reaper = Reaper::default();

    stack
        .call_ok(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "tcp-1", "scenario": "tcp-flag", "timeout": "600s"})),
        )
        .await;

    let mut deployed: Vec<(String, u16, String)> = Vec::new();
    for source in ["team-1", "team-2"] {
        let started = Instant::now();
        let (status, created) = stack
            .call(
                Method::POST,
                "/api/v1/instance",
                Some(json!({"challengeId": "tcp-1", "sourceId": source})),
            )
            .await;
        let elapsed = started.elapsed();
        assert_eq!(status, 200, "{created}\n{}", stack.worker_logs());
        let info = created["connectionInfo"].as_str().expect("connectionInfo");
        let port = port_of(info);
        reaper.watch(port);
        eprintln!("create {source} (through the API): {elapsed:?}");

        let flag = created["flags"][0].as_str().expect("flags[0]").to_owned();
        let identity = stack
            .store
            .get_instance("tcp-1", source)
            .await
            .expect("store")
            .expect("record")
            .value
            .identity;
        assert_eq!(flag, expected_flag(&identity), "the scenario's flag");
        assert_eq!(created["flag"], Value::String(flag.clone()));

        let answer = read_answer(port).await.expect("connect to the service");
        assert_eq!(answer, format!("{flag}\n"), "the service answers its flag");
        assert_eq!(
            server_pids(port).len(),
            1,
            "one server process for port {port}"
        );
        let state = stack
            .stack_state_bytes("tcp-1", &identity)
            .await
            .expect("stack state");
        assert!(
            !state.windows(flag.len()).any(|w| w == flag.as_bytes()),
            "the flag is a secret: the stored stack state must not hold it in clear"
        );
        deployed.push((source.to_owned(), port, flag));
    }
    assert_ne!(deployed[0].1, deployed[1].1, "one port per instance");
    assert_ne!(deployed[0].2, deployed[1].2, "one flag per instance");
    let logs = stack.worker_logs();
    for (_, _, flag) in &deployed {
        assert!(
            !logs.contains(flag.as_str()),
            "a flag reached the worker log"
        );
    }

    for (source, port, _) in &deployed {
        let started = Instant::now();
        let (status, body) = stack
            .call(
                Method::DELETE,
                &format!("/api/v1/instance/tcp-1/{source}"),
                None,
            )
            .await;
        let elapsed = started.elapsed();
        assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
        eprintln!("delete {source} (through the API): {elapsed:?}");
        let refused = TcpStream::connect(("127.0.0.1", *port)).await;
        assert!(
            matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "port {port} must refuse connections after the delete: {refused:?}"
        );
        assert_eq!(
            server_pids(*port),
            Vec::<u32>::new(),
            "no server process left for port {port}"
        );
    }
}

/// A driver on the suite's shared cache.
fn driver() -> Arc<Driver> {
    Arc::new(
        Driver::new(DriverConfig {
            pulumi: cm_testkit::pulumi(),
            go: cm_testkit::go(),
            cache_dir: support::shared_cache(),
            passphrase: Secret::new("localservice-test-passphrase".to_owned()),
            niceness: cm_worker::pulumi::DEFAULT_NICENESS,
        })
        .expect("driver"),
    )
}

/// The `pid` output of the stack's TcpService.
fn server_pid(state: &StackState) -> u32 {
    state
        .checkpoint
        .pointer("/checkpoint/latest/resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|r| r["type"] == "localservice:index:TcpService")
        .and_then(|r| r.pointer("/outputs/pid"))
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .expect("a TcpService with a pid output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_replaced_by_up_and_destroy_does_not_mind() {
    cm_testkit::provider_plugin("localservice");
    let driver = driver();
    let mut reaper = Reaper::default();
    let scenario = driver
        .prepare(&cm_testkit::example("tcp-flag"))
        .await
        .expect("prepare");
    let identity = Identity::random();
    let flag = expected_flag(&identity);

    let started = Instant::now();
    let first = driver
        .up(&scenario, &identity, &BTreeMap::new(), None)
        .await
        .expect("up");
    eprintln!("driver up (new stack): {:?}", started.elapsed());
    let port = port_of(&first.outputs.connection_info);
    reaper.watch(port);
    assert_eq!(first.outputs.flags, vec![flag.clone()]);
    assert_eq!(
        read_answer(port).await.expect("answer"),
        format!("{flag}\n")
    );
    let pid = server_pid(&first.state);
    assert_eq!(server_pids(port), vec![pid], "the pid output is the server");

    // The server dies behind Pulumi's back: the next `up` brings a new one.
    kill(pid);
    assert!(
        wait_refused(port).await,
        "port {port} still open after kill"
    );
    let started = Instant::now();
    let second = driver
        .up(&scenario, &identity, &BTreeMap::new(), Some(&first.state))
        .await
        .expect("up after the server died");
    eprintln!(
        "driver up (replacing a dead server): {:?}",
        started.elapsed()
    );
    let new_port = port_of(&second.outputs.connection_info);
    reaper.watch(new_port);
    assert_eq!(
        read_answer(new_port).await.expect("answer"),
        format!("{flag}\n")
    );
    let new_pid = server_pid(&second.state);
    assert_ne!(new_pid, pid, "a new server process");
    assert_eq!(server_pids(new_port), vec![new_pid]);

    // Dead again: destroying the stack is still not an error.
    kill(new_pid);
    assert!(wait_refused(new_port).await, "port {new_port} still open");
    let started = Instant::now();
    let after = driver
        .destroy(&scenario, &second.state)
        .await
        .expect("destroy with the server already gone");
    eprintln!(
        "driver destroy (server already gone): {:?}",
        started.elapsed()
    );
    assert_eq!(after.resource_count(), 0, "destroy leaves no resource");
    assert_eq!(server_pids(new_port), Vec::<u32>::new());
}

/// A `tcp-flag` stack deployed by the driver directly (its server killed
/// when the reaper is dropped).
async fn deployed_tcp_flag() -> (Arc<Driver>, PreparedScenario, Deployment, Reaper) {
    cm_testkit::provider_plugin("localservice");
    let driver = driver();
    let scenario = driver
        .prepare(&cm_testkit::example("tcp-flag"))
        .await
        .expect("prepare");
    let made = driver
        .up(&scenario, &Identity::random(), &BTreeMap::new(), None)
        .await
        .expect("up");
    let mut reaper = Reaper::default();
    reaper.watch(port_of(&made.outputs.connection_info));
    (driver, scenario, made, reaper)
}

/// Destroys `state`: it must end empty, the service on `port` must be
/// gone, and no server of that stack may be left.
async fn assert_destroy_leaves_nothing(
    driver: &Driver,
    scenario: &PreparedScenario,
    state: &StackState,
    port: u16,
) {
    let started = Instant::now();
    let after = driver.destroy(scenario, state).await.expect("destroy");
    eprintln!("driver destroy: {:?}", started.elapsed());
    assert_eq!(after.resource_count(), 0, "destroy leaves no resource");
    assert!(
        wait_refused(port).await,
        "port {port}: a service the stack's last run made still answers"
    );
    let left: Vec<(u32, u16)> = servers()
        .into_iter()
        .filter(|(pid, _)| owner_stack(*pid).as_deref() == Some(state.stack.as_str()))
        .collect();
    assert_eq!(left, [], "no server of the destroyed stack is left");
}

/// A run killed after the provider started a server, before Pulumi recorded
/// it, leaves the TcpService as a pending create: in no state, with no id.
/// When the next run on that stack is a destroy (a delete, an expiry, the
/// orphan sweep's reclaim), that server must still be stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_after_an_interrupted_create_stops_what_that_create_started() {
    let (driver, scenario, made, _reaper) = deployed_tcp_flag().await;
    let port = port_of(&made.outputs.connection_info);
    let pid = server_pid(&made.state);
    assert_eq!(owner_stack(pid), Some(made.state.stack.clone()));

    // The state such a run leaves: the service only as a pending create
    // (its inputs, no id, no outputs), its server running.
    let mut interrupted = made.state.clone();
    let latest = interrupted
        .checkpoint
        .pointer_mut("/checkpoint/latest")
        .expect("latest");
    let resources = latest["resources"].as_array_mut().expect("resources");
    let at = resources
        .iter()
        .position(|r| r["type"] == "localservice:index:TcpService")
        .expect("a TcpService");
    let mut half_made = resources.remove(at);
    if let Some(fields) = half_made.as_object_mut() {
        fields.retain(|k, _| !matches!(k.as_str(), "id" | "outputs"));
    }
    latest["pending_operations"] = json!([{"type": "creating", "resource": half_made}]);
    assert!(
        !interrupted.config.is_empty(),
        "a stored state keeps the configuration of the run that wrote it"
    );

    assert_destroy_leaves_nothing(&driver, &scenario, &interrupted, port).await;
}

/// A worker killed outright in the middle of an `up` leaves, at best, the
/// last checkpoint stored before the kill (at most one per checkpoint
/// interval): what the run made after it is in no state. Such a state is
/// marked as taken mid-`up`; a destroy of it (a delete of the half-made
/// instance, the orphan sweep) must still stop what the run made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_of_a_checkpoint_taken_mid_up_stops_what_the_run_made_after_it() {
    let (driver, scenario, made, _reaper) = deployed_tcp_flag().await;
    let port = port_of(&made.outputs.connection_info);
    assert!(!made.state.mid_up, "the state an `up` left when it ended");

    // The checkpoint stored before the run made its service.
    let mut taken = made.state.clone();
    let resources = taken
        .checkpoint
        .pointer_mut("/checkpoint/latest/resources")
        .and_then(Value::as_array_mut)
        .expect("resources");
    resources.retain(|r| r["type"] != "localservice:index:TcpService");
    taken.mid_up = true;

    assert_destroy_leaves_nothing(&driver, &scenario, &taken, port).await;
}

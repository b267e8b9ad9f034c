//! Reads that stay correct at scale (issue 15): whole-prefix reads paginated
//! past the gRPC message limit, and a janitor that stale expiry-index
//! entries cannot block. Real etcd and NATS, no worker needed.

use std::time::{Duration, SystemTime};

use cm_core::{
    Identity,
    model::{InstanceRecord, InstanceStatus, to_timestamp},
    queue,
    store::{Expect, Store, StoreOptions},
};
use cm_schemas::v1::{Command, command::Request};
use cm_testkit::server;
use etcd_client::{Txn, TxnOp};
use futures::StreamExt;
use prost::Message as _;

async fn store(etcd: &server::Server) -> Store {
    Store::connect(
        std::slice::from_ref(&etcd.url),
        "/cm",
        &StoreOptions::default(),
    )
    .await
    .expect("store")
}

fn record(cid: &str, sid: Option<String>, until: Option<SystemTime>, pad: usize) -> InstanceRecord {
    let now = SystemTime::now();
    InstanceRecord {
        challenge_id: cid.into(),
        identity: Identity::random(),
        source_id: sid,
        status: InstanceStatus::Ready,
        since: to_timestamp(now),
        last_renew: to_timestamp(now),
        until: until.map(to_timestamp),
        connection_info: "x".repeat(pad),
        flags: vec!["CTF{scale}".into()],
        additional: Default::default(),
        command_id: "seed".into(),
        deployed_from: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_more_records_than_one_grpc_message_holds_works() {
    let etcd = server::etcd();
    let store = store(&etcd).await;
    // 3000 records of ~2.5 KiB: 7 MiB, past the client's 4 MiB message limit.
    let mut client = store.client();
    let n = 3000;
    let mut ops = Vec::new();
    for i in 0..n {
        let rec = record("big", None, None, 2500);
        ops.push(TxnOp::put(
            format!("/cm/instance/big/pool/{}", rec.identity),
            serde_json::to_vec(&rec).expect("json"),
            None,
        ));
        if ops.len() == 100 || i == n - 1 {
            client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .expect("seed");
        }
    }
    let all = store.list_instances("big").await.expect("a paginated list");
    assert_eq!(all.len(), n);
    let mut ids: Vec<_> = all.iter().map(|r| r.identity.to_string()).collect();
    ids.dedup();
    assert_eq!(ids.len(), n, "no record twice");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in key order across pages"
    );

    // A small page size: many pages, the same answer.
    let small = store.clone().with_page_size(7);
    let pooled = small.list_pooled("big").await.expect("list");
    assert_eq!(pooled.len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_expiry_entries_do_not_block_the_janitor() {
    let etcd = server::etcd();
    let nats = server::nats();
    let store = store(&etcd).await;
    let client = async_nats::connect(nats.url.as_str()).await.expect("nats");
    let js = async_nats::jetstream::new(client.clone());
    queue::ensure_streams(&js, &Default::default())
        .await
        .expect("streams");

    // 1100 entries of instances that no longer exist (deleted by a path that
    // missed their entry), all older than one really expired instance.
    let old = SystemTime::now() - Duration::from_secs(3600);
    let mut etcd_client = store.client();
    let mut ops = Vec::new();
    for i in 0..1100u32 {
        let t = to_timestamp(old + Duration::from_millis(u64::from(i)));
        ops.push(TxnOp::put(
            format!("/cm/expiry/{:020}.{:09}/ghost/team-{i}", t.seconds, t.nanos),
            Identity::random().as_str(),
            None,
        ));
        if ops.len() == 100 {
            etcd_client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .expect("seed");
        }
    }
    let real = record(
        "live",
        Some("team-real".into()),
        Some(SystemTime::now() - Duration::from_secs(60)),
        0,
    );
    store
        .put_instance(&real, None, Expect::Absent, None)
        .await
        .expect("seed the expired instance");
    // A renewed instance whose old entry stayed behind: stale too; its live
    // entry (in the future) is not expired yet.
    let renewed = record(
        "live",
        Some("team-renewed".into()),
        Some(SystemTime::now() + Duration::from_secs(3600)),
        0,
    );
    store
        .put_instance(&renewed, None, Expect::Absent, None)
        .await
        .expect("seed");
    let t = to_timestamp(old - Duration::from_secs(1));
    etcd_client
        .put(
            format!(
                "/cm/expiry/{:020}.{:09}/live/team-renewed",
                t.seconds, t.nanos
            ),
            renewed.identity.as_str(),
            None,
        )
        .await
        .expect("stale entry");

    // And one key that is no entry at all.
    etcd_client
        .put("/cm/expiry/0/broken", "x", None)
        .await
        .expect("malformed entry");

    let mut commands = client.subscribe("cm.cmd.>").await.expect("subscribe");
    let janitor = cm_janitor::Janitor::new(store.clone(), js, 1000);
    let report = janitor.tick().await.expect("tick");
    assert_eq!(report.published, 1, "{report:?}");
    assert_eq!(report.stale, 1102, "{report:?}");
    let msg = tokio::time::timeout(Duration::from_secs(5), commands.next())
        .await
        .expect("a command")
        .expect("a command");
    let command = Command::decode(msg.payload).expect("command");
    let Some(Request::InstanceExpire(expire)) = command.request else {
        panic!("not an expiry: {command:?}");
    };
    assert_eq!(
        (expire.challenge_id.as_str(), expire.source_id.as_str()),
        ("live", "team-real")
    );
    // The stale entries are gone; the live ones stay.
    let left = etcd_client
        .get(
            "/cm/expiry/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("etcd");
    assert_eq!(
        left.kvs().len(),
        2,
        "the expired and the renewed instance's entries"
    );
    let report = janitor.tick().await.expect("second tick");
    assert_eq!((report.expired, report.stale), (1, 0), "{report:?}");
}

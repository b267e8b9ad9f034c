//! The command pipeline end to end: REST/NATS -> JetStream -> two worker
//! processes under etcd locks -> Pulumi -> etcd, against real servers.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

fn is_flag(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 21 && s.starts_with("CTF{") && s.ends_with('}'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lifecycle_over_rest() {
    let stack = Stack::start(2).await;
    let (status, body) = stack
        .call(Method::POST, "/api/v1/challenge", Some(json!({
            "id": "web-1", "scenario": "identity", "timeout": "600s", "until": null,
            "updateStrategy": "update_in_place", "additional": {"connection_prefix": "ssh://"}
        })))
        .await;
    assert_eq!(status, 200, "{body}\n{}", stack.worker_logs());
    assert_eq!(body["id"], "web-1");
    assert_eq!(body["timeout"], "600s");

    let (status, created) = stack
        .call(Method::POST, "/api/v1/instance", Some(json!({"challengeId": "web-1", "sourceId": "team-1"})))
        .await;
    assert_eq!(status, 200, "{created}\n{}", stack.worker_logs());
    let info = created["connectionInfo"].as_str().expect("connectionInfo").to_owned();
    assert!(info.starts_with("ssh://nc ") && info.ends_with(".ctf.local 1337"), "{info}");
    assert!(is_flag(&created["flags"][0]), "{created}");
    assert_eq!(created["flag"], created["flags"][0], "deprecated flag mirrors flags[0]");
    assert_eq!(created["sourceId"], "team-1");

    let (status, got) = stack.call(Method::GET, "/api/v1/instance/web-1/team-1", None).await;
    assert_eq!(status, 200);
    assert_eq!(got["connectionInfo"], info.as_str());

    let resp = stack
        .http
        .get(format!("{}/api/v1/instance?sourceId=team-1", stack.api))
        .send()
        .await
        .expect("query");
    let text = resp.text().await.expect("body");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["result"]["challengeId"], "web-1");

    let until_before = got["until"].as_str().expect("until").to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, renewed) = stack.call(Method::PATCH, "/api/v1/instance/web-1/team-1", None).await;
    assert_eq!(status, 200, "{renewed}");
    let until_after = renewed["until"].as_str().expect("until");
    assert!(until_after > until_before.as_str(), "{until_before} -> {until_after}");

    let identity = stack.store.get_instance("web-1", "team-1").await.expect("store").expect("record").value.identity;
    assert!(stack.store.get_stack("web-1", &identity).await.expect("store").is_some());

    let (status, deleted) = stack.call(Method::DELETE, "/api/v1/instance/web-1/team-1", None).await;
    assert_eq!((status, deleted), (200, json!({})));
    let (status, missing) = stack.call(Method::GET, "/api/v1/instance/web-1/team-1", None).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["code"], 5);
    assert!(stack.store.get_stack("web-1", &identity).await.expect("store").is_none(), "stack state gone");

    let (status, _) = stack.call(Method::DELETE, "/api/v1/challenge/web-1", None).await;
    assert_eq!(status, 200);
    let (status, _) = stack.call(Method::GET, "/api/v1/challenge/web-1", None).await;
    assert_eq!(status, 404);
}

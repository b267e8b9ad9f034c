//! The CTFd plugin (`ctfer-io/ctfd-chall-manager`, commit
//! `9268c8aafb608c055a0b21e5b1886249b72ed40e`) against the real stack: every
//! request its `utils/challenge_store.py` and `utils/instance_manager.py`
//! send, byte for byte as Python's `json.dumps` writes them (`", "` and
//! `": "` separators, `None` as `null`), and every field the plugin reads
//! where it reads it:
//!
//! - `create_challenge(id, **params)`: `POST /api/v1/challenge`, the payload
//!   of `models.prepare_chall_manager_payload` (`scenario`, `min`, `max` as
//!   numbers, `additional` object, `until` RFC 3339 with `Z` or `null`,
//!   `timeout` `"<n>s"` or `null`, `updateStrategy` when the form has it)
//!   plus `"id": "<n>"`; only the status is read.
//! - `update_challenge`: `PATCH /api/v1/challenge/<id>`, the same keys plus
//!   `updateMask`, a comma-joined string of the present keys among
//!   `timeout, until, additional, min, max, scenario`.
//! - `delete_challenge`: `DELETE`, status only.
//! - `query_challenges`: streamed lines, `res["result"]`, then
//!   `item["instances"]` of every challenge and `["sourceId"]` of each.
//! - `create_instance`: `{"challengeId": "<c>", "sourceId": "<s>"}`, reads
//!   `r.json()`; `get_instance` reads `since` (cache only when not null),
//!   `connectionInfo`, `until`; the admin page splits `since`, `lastRenew`
//!   and `until` on `T`; `attempt` reads `flags`.
//! - `update_instance` (renew): `PATCH` with body `{}`.
//! - `delete_instance`: `DELETE`, reads `r.json()`.
//! - `query_instance`: `GET /api/v1/instance?sourceId=<s>`, lines with a
//!   `result`, `["challengeId"]` of each.
//! - errors: `chall_manager_exception_builder` reads `code`, `message`,
//!   `details` of the body; a 404 on `get_instance` means "expired".
//! - `check_chall_manager_healthcheck`: `GET /healthcheck`, 2xx.

mod support;

use serde_json::Value;
use support::Stack;

/// A request as `requests` sends it: a raw body with
/// `Content-Type: application/json` when the plugin sets it.
async fn send(
    stack: &Stack,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut req = stack.http.request(method, format!("{}{path}", stack.api));
    if let Some(body) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(body.to_owned());
    }
    let resp = req.send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

/// `json.loads` of each non-empty line, then `res["result"]` (the plugin's
/// stream reading).
fn results(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let res: Value = serde_json::from_str(l).expect("json.loads(line)");
            res.get("result").cloned().expect("res[\"result\"]")
        })
        .collect()
}

/// What `chall_manager_exception_builder` does with an error answer.
fn exception(status: u16, body: &str) -> (u16, i64, String, Vec<Value>) {
    let e: Value = serde_json::from_str(body).expect("json.loads(resp.text)");
    (
        status,
        e["code"].as_i64().expect("cm_error[\"code\"]"),
        e["message"]
            .as_str()
            .expect("cm_error[\"message\"]")
            .to_owned(),
        e["details"]
            .as_array()
            .expect("cm_error[\"details\"]")
            .clone(),
    )
}

/// What the templates do with a timestamp: `value.split('T')`, then the
/// time's first 8 characters.
fn template_time(v: &Value) -> (String, String) {
    let s = v.as_str().expect("a timestamp string");
    let (date, time) = s.split_once('T').expect("split('T')");
    (date.to_owned(), time[..8].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_of_the_ctfd_plugin_succeeds_and_every_field_it_reads_is_there() {
    use reqwest::Method;
    let stack = Stack::start(1).await;

    // check_chall_manager_healthcheck
    let (s, _) = send(&stack, Method::GET, "/healthcheck", None).await;
    assert!((200..300).contains(&s));

    // create_challenge(1, **params): a timeout, no until, an empty pool.
    let (s, b) = send(
        &stack,
        Method::POST,
        "/api/v1/challenge",
        Some(r#"{"scenario": "identity", "min": 0, "max": 0, "additional": {}, "until": null, "timeout": "600s", "id": "1"}"#),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Another with an until as create.js writes it (seconds, Z), no timeout
    // (`f"{None}s"` replaced by None), an additional, and updateStrategy.
    let (s, b) = send(
        &stack,
        Method::POST,
        "/api/v1/challenge",
        Some(r#"{"scenario": "identity", "min": 0, "max": 0, "additional": {"connection_prefix": "ssh://"}, "until": "2099-07-10T15:00:00Z", "updateStrategy": "update_in_place", "timeout": null, "id": "2"}"#),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // query_challenges, with no instance anywhere: item["instances"] is [].
    let (s, b) = send(&stack, Method::GET, "/api/v1/challenge", None).await;
    assert_eq!(s, 200);
    let challenges = results(&b);
    assert_eq!(challenges.len(), 2);
    for c in &challenges {
        assert_eq!(c["instances"], Value::Array(Vec::new()), "{c}");
    }

    // create_instance(1, 7): r.json() is cached, then read.
    let (s, b) = send(
        &stack,
        Method::POST,
        "/api/v1/instance",
        Some(r#"{"challengeId": "1", "sourceId": "7"}"#),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let created: Value = serde_json::from_str(&b).expect("r.json()");
    assert!(created["connectionInfo"].is_string());
    assert!(created["since"].is_string());

    // get_instance: `since` not null (cached), connectionInfo/until/since
    // returned to the player; the admin page's split('T').
    let (s, b) = send(&stack, Method::GET, "/api/v1/instance/1/7", None).await;
    assert_eq!(s, 200, "{b}");
    let got: Value = serde_json::from_str(&b).expect("r.json()");
    assert!(!got["since"].is_null());
    for k in ["connectionInfo", "until", "since"] {
        assert!(got.get(k).is_some(), "{k} in result.keys(): {got}");
    }
    for k in ["since", "lastRenew", "until"] {
        let (date, time) = template_time(&got[k]);
        assert_eq!((date.len(), time.len()), (10, 8), "{k}: {got}");
    }
    // attempt(): list(data["flags"]).
    assert!(
        got["flags"].as_array().is_some_and(|f| !f.is_empty()),
        "{got}"
    );

    // update_instance (renew): PATCH with json.dumps({}).
    let (s, b) = send(&stack, Method::PATCH, "/api/v1/instance/1/7", Some("{}")).await;
    assert_eq!(s, 200, "{b}");
    let renewed: Value = serde_json::from_str(&b).expect("r.json()");
    assert!(renewed["since"].is_string());

    // query_instance(7): lines with "result", ["challengeId"].
    let (s, b) = send(&stack, Method::GET, "/api/v1/instance?sourceId=7", None).await;
    assert_eq!(s, 200);
    let mine = results(&b);
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["challengeId"], "1");

    // calculate_all_mana_used: every challenge's instances, their sourceId.
    let (_, b) = send(&stack, Method::GET, "/api/v1/challenge", None).await;
    let sources: Vec<String> = results(&b)
        .iter()
        .flat_map(|c| {
            c["instances"]
                .as_array()
                .cloned()
                .expect("item[\"instances\"]")
        })
        .map(|i| i["sourceId"].as_str().expect("sourceId").to_owned())
        .collect();
    assert_eq!(sources, ["7"]);

    // update_challenge(1, **params): every key the form holds, and the
    // mask the plugin joins ("timeout,until,additional,min,max,scenario").
    let (s, b) = send(
        &stack,
        Method::PATCH,
        "/api/v1/challenge/1",
        Some(r#"{"scenario": "identity", "min": 0, "max": 0, "additional": {}, "until": null, "updateStrategy": "update_in_place", "timeout": "1200s", "updateMask": "timeout,until,additional,min,max,scenario"}"#),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let updated: Value = serde_json::from_str(&b).expect("json");
    assert_eq!(updated["timeout"], "1200s");
    // Just the timeout (the plugin's docstring example), and clearing it.
    let (s, b) = send(
        &stack,
        Method::PATCH,
        "/api/v1/challenge/2",
        Some(r#"{"timeout": "600s", "updateMask": "timeout"}"#),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = send(
        &stack,
        Method::PATCH,
        "/api/v1/challenge/2",
        Some(
            r#"{"timeout": null, "until": "2099-08-01T00:00:00Z", "updateMask": "timeout,until"}"#,
        ),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let cleared: Value = serde_json::from_str(&b).expect("json");
    assert_eq!(cleared["timeout"], Value::Null);
    assert_eq!(cleared["until"], "2099-08-01T00:00:00Z");

    // Errors as the plugin reads them: a second instance (409), an
    // instance that is gone (404 = "expired" for attempt()).
    let (s, b) = send(
        &stack,
        Method::POST,
        "/api/v1/instance",
        Some(r#"{"challengeId": "1", "sourceId": "7"}"#),
    )
    .await;
    let (http, code, message, details) = exception(s, &b);
    assert_eq!((http, code), (409, 6));
    assert!(!message.is_empty());
    assert_eq!(details[0]["reason"], "INSTANCE_ALREADY_EXISTS");
    let (s, b) = send(&stack, Method::GET, "/api/v1/instance/2/7", None).await;
    let (http, code, _, details) = exception(s, &b);
    assert_eq!((http, code), (404, 5));
    assert_eq!(details[0]["reason"], "INSTANCE_NOT_FOUND");

    // delete_instance: r.json().
    let (s, b) = send(&stack, Method::DELETE, "/api/v1/instance/1/7", None).await;
    assert_eq!(s, 200, "{b}");
    let _: Value = serde_json::from_str(&b).expect("r.json()");

    // delete_challenge(1), (2): status only; then unknown.
    for id in ["1", "2"] {
        let (s, b) = send(
            &stack,
            Method::DELETE,
            &format!("/api/v1/challenge/{id}"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b) = send(&stack, Method::DELETE, "/api/v1/challenge/1", None).await;
    let (http, code, _, details) = exception(s, &b);
    assert_eq!((http, code), (404, 5));
    assert_eq!(details[0]["reason"], "CHALLENGE_NOT_FOUND");
}

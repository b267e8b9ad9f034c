//! Wire parity with chall-manager: every endpoint and error case, on REST and
//! over the NATS service, checked against the response shapes in
//! `api/tests/fixtures/chall-manager/shapes.json` (field names, presence,
//! JSON types, formats, error details), so that dropping or renaming a field
//! fails here. Real nats-server, etcd, docker-registry, API and worker.
//!
//! The shape language (see the fixture README): a string token (`string`,
//! `int64`, `timestamp`, `duration`, `null`, alternatives with `|`, `=text`
//! for an exact string, `$name` for a definition); `[shape]` an array of
//! such elements; `{"$tuple": [...]}` exactly these elements in order;
//! `{"$map": shape}` an object of any keys; `{"$const": v}` exactly `v`;
//! `{"$and": [...]}` all of them; any other object: exactly these members,
//! a key ending in `?` may be absent.

mod support;

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};
use support::Stack;

/// Our documented extensions (optional fields chall-manager lacks).
const EXTENSIONS: [&str; 1] = ["maxPerSource"];

fn fixtures() -> Value {
    let path = cm_testkit::workspace_root().join("api/tests/fixtures/chall-manager/shapes.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture file"))
        .expect("fixture JSON")
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `.ddd`, `.dddddd`, `.ddddddddd` or nothing, as protojson prints fractions.
fn fraction_ok(f: &str) -> bool {
    f.is_empty() || (f.starts_with('.') && [4, 7, 10].contains(&f.len()) && is_digits(&f[1..]))
}

fn token_matches(token: &str, value: &Value) -> bool {
    match (token, value) {
        ("null", Value::Null) => true,
        ("string", Value::String(_)) => true,
        ("number", Value::Number(_)) => true,
        ("bool", Value::Bool(_)) => true,
        ("int64", Value::String(s)) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            is_digits(digits)
        }
        ("duration", Value::String(s)) => s.strip_suffix('s').is_some_and(|n| {
            let n = n.strip_prefix('-').unwrap_or(n);
            let (int, frac) = n.split_at(n.find('.').unwrap_or(n.len()));
            is_digits(int) && fraction_ok(frac)
        }),
        // 2026-12-01T00:47:35.685921401Z: UTC with Z, 0/3/6/9 digits.
        ("timestamp", Value::String(s)) => {
            let b = s.as_bytes();
            s.len() >= 20
                && s.ends_with('Z')
                && is_digits(&s[0..4])
                && b[4] == b'-'
                && is_digits(&s[5..7])
                && b[7] == b'-'
                && is_digits(&s[8..10])
                && b[10] == b'T'
                && is_digits(&s[11..13])
                && b[13] == b':'
                && is_digits(&s[14..16])
                && b[16] == b':'
                && is_digits(&s[17..19])
                && fraction_ok(&s[19..s.len() - 1])
        }
        (exact, Value::String(s)) if exact.starts_with('=') => &exact[1..] == s,
        _ => false,
    }
}

/// Checks `value` against `shape`; the mismatches, with their JSON paths.
fn check(defs: &Value, shape: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    match shape {
        Value::String(token) if token.starts_with('$') => {
            let def = defs
                .get(&token[1..])
                .unwrap_or_else(|| panic!("fixture: no definition {token}"));
            check(defs, def, value, path, errors);
        }
        Value::String(tokens) => {
            if !tokens.split('|').any(|t| token_matches(t, value)) {
                errors.push(format!("{path}: expected {tokens}, got {value}"));
            }
        }
        Value::Array(element) => match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(defs, &element[0], item, &format!("{path}[{i}]"), errors);
                }
            }
            other => errors.push(format!("{path}: expected an array, got {other}")),
        },
        Value::Object(spec) if spec.contains_key("$tuple") => match value {
            Value::Array(items) if items.len() == spec["$tuple"].as_array().map_or(0, Vec::len) => {
                for (i, (s, item)) in spec["$tuple"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .zip(items)
                    .enumerate()
                {
                    check(defs, s, item, &format!("{path}[{i}]"), errors);
                }
            }
            other => errors.push(format!(
                "{path}: expected {} elements, got {other}",
                spec["$tuple"].as_array().map_or(0, Vec::len)
            )),
        },
        Value::Object(spec) if spec.contains_key("$map") => match value {
            Value::Object(map) => {
                for (k, v) in map {
                    check(defs, &spec["$map"], v, &format!("{path}.{k}"), errors);
                }
            }
            other => errors.push(format!("{path}: expected an object, got {other}")),
        },
        Value::Object(spec) if spec.contains_key("$const") => {
            if &spec["$const"] != value {
                errors.push(format!("{path}: expected {}, got {value}", spec["$const"]));
            }
        }
        Value::Object(spec) if spec.contains_key("$and") => {
            for s in spec["$and"].as_array().into_iter().flatten() {
                check_members(defs, s, value, path, errors, true);
            }
        }
        Value::Object(_) => check_members(defs, shape, value, path, errors, false),
        other => panic!("fixture: bad shape {other}"),
    }
}

/// An object shape: every member present (unless `key?`) and matching; with
/// `partial`, other members are left to the other shapes of an `$and`.
fn check_members(
    defs: &Value,
    shape: &Value,
    value: &Value,
    path: &str,
    errors: &mut Vec<String>,
    partial: bool,
) {
    let shape = match shape {
        Value::String(token) if token.starts_with('$') => &defs[&token[1..]],
        other => other,
    };
    let (Value::Object(spec), Value::Object(map)) = (shape, value) else {
        errors.push(format!("{path}: expected an object, got {value}"));
        return;
    };
    let mut known = BTreeSet::new();
    for (key, member) in spec {
        let (name, optional) = match key.strip_suffix('?') {
            Some(name) => (name, true),
            None => (key.as_str(), false),
        };
        known.insert(name.to_owned());
        match map.get(name) {
            Some(v) => check(defs, member, v, &format!("{path}.{name}"), errors),
            None if optional => {}
            None => errors.push(format!("{path}.{name}: missing")),
        }
    }
    if !partial {
        for key in map.keys() {
            if !known.contains(key) && !EXTENSIONS.contains(&key.as_str()) {
                errors.push(format!("{path}.{key}: not in chall-manager's shape"));
            }
        }
    }
}

/// Asserts `body` (with `status`) is fixture case `case`.
fn assert_case(fx: &Value, case: &str, status: u16, body: &Value) {
    let spec = fx["cases"]
        .get(case)
        .unwrap_or_else(|| panic!("fixture: no case {case}"));
    assert_eq!(
        spec["status"].as_u64(),
        Some(u64::from(status)),
        "{case}: HTTP status (body {body})"
    );
    let mut errors = Vec::new();
    check(&fx["defs"], &spec["body"], body, "$", &mut errors);
    assert!(errors.is_empty(), "{case}: {errors:#?}\nbody: {body}");
}

/// The same check on a NATS reply: its body against the case's body (a
/// stream case: each element of the array against the `result` shape), its
/// error headers against the status.
fn assert_nats_case(fx: &Value, case: &str, reply: &NatsReply) {
    let spec = &fx["cases"][case];
    let status = spec["status"].as_u64().expect("status");
    match &reply.error_code {
        Some(code) => assert_eq!(*code as u64, status, "{case}: service error code"),
        None => assert_eq!(status, 200, "{case}: expected an error, got {}", reply.body),
    }
    let mut errors = Vec::new();
    if spec["stream"].as_bool() == Some(true) {
        let items = reply.body.as_array().expect("a list answers an array");
        for (i, item) in items.iter().enumerate() {
            check(
                &fx["defs"],
                &spec["body"]["result"],
                item,
                &format!("$[{i}]"),
                &mut errors,
            );
        }
    } else {
        check(&fx["defs"], &spec["body"], &reply.body, "$", &mut errors);
    }
    assert!(
        errors.is_empty(),
        "NATS {case}: {errors:#?}\nbody: {}",
        reply.body
    );
}

/// A streamed REST answer: one `{"result": ...}` per line.
async fn stream(stack: &Stack, path: &str) -> (u16, Vec<Value>) {
    let resp = stack
        .http
        .get(format!("{}{path}", stack.api))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    (status, lines)
}

struct NatsReply {
    error_code: Option<usize>,
    body: Value,
}

async fn nats(client: &async_nats::Client, endpoint: &str, body: &[u8]) -> NatsReply {
    let resp = client
        .request(format!("cm.api.{endpoint}"), body.to_vec().into())
        .await
        .expect("NATS request");
    let error_code = resp
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.as_str().parse().expect("numeric code"));
    let body = serde_json::from_slice(&resp.payload).unwrap_or_else(|e| {
        panic!(
            "{endpoint}: the reply body is JSON ({e}): {:?}",
            String::from_utf8_lossy(&resp.payload)
        )
    });
    NatsReply { error_code, body }
}

#[test]
fn the_checker_fails_when_a_field_is_dropped_renamed_or_retyped() {
    let fx = fixtures();
    let instance = json!({
        "challengeId": "c", "sourceId": "s",
        "since": "2026-12-01T00:47:35.685921401Z", "lastRenew": "2026-12-01T00:47:35Z",
        "until": "2026-12-01T01:47:35.685Z", "connectionInfo": "nc x 1",
        "flag": "F", "flags": ["F"], "additional": {}
    });
    let challenge = json!({
        "id": "c", "scenario": "identity", "timeout": "600s", "until": null,
        "instances": [instance.clone()], "additional": {"k": "v"}, "min": "0", "max": "0"
    });
    assert_case(&fx, "challenge.get", 200, &challenge);
    assert_case(&fx, "instance.get", 200, &instance);
    let mut optional_absent = instance.clone();
    for k in ["until", "flag"] {
        optional_absent.as_object_mut().expect("object").remove(k);
    }
    assert_case(&fx, "instance.get", 200, &optional_absent);

    let failing = |body: Value, case: &str| {
        let spec = &fx["cases"][case]["body"];
        let mut errors = Vec::new();
        check(&fx["defs"], spec, &body, "$", &mut errors);
        assert!(!errors.is_empty(), "{case} accepted {body}");
    };
    for field in ["instances", "min", "max", "until", "timeout", "additional"] {
        let mut dropped = challenge.clone();
        dropped.as_object_mut().expect("object").remove(field);
        failing(dropped.clone(), "challenge.get");
        let mut renamed = dropped;
        renamed[format!("{field}_renamed")] = challenge[field].clone();
        failing(renamed, "challenge.get");
    }
    for field in [
        "flags",
        "connectionInfo",
        "since",
        "lastRenew",
        "additional",
    ] {
        let mut dropped = instance.clone();
        dropped.as_object_mut().expect("object").remove(field);
        failing(dropped, "instance.get");
    }
    let mut retyped = challenge.clone();
    retyped["min"] = json!(0);
    failing(retyped, "challenge.get");
    let mut offset = instance.clone();
    offset["since"] = json!("2026-12-01T00:47:35.685921401+00:00");
    failing(offset, "instance.get");
    let mut digits = instance.clone();
    digits["since"] = json!("2026-12-01T00:47:35.68592Z");
    failing(digits, "instance.get");
    failing(
        json!({"code": 5, "message": "x", "details": []}),
        "error.challenge_not_found",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_error_has_chall_managers_shape_on_rest_and_nats() {
    let fx = fixtures();
    let registry = cm_testkit::registry::start();
    let host = registry.host.clone();
    let stack = Stack::start_custom(
        1,
        &[("CM_OCI_INSECURE_REGISTRIES", registry.host.as_str())],
        move |api| api.oci.insecure_registries = vec![host],
    )
    .await;
    let get = |path: &'static str| stack.call(Method::GET, path, None);

    // ---- REST -------------------------------------------------------------
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(
                json!({"id": "wire", "scenario": "identity", "timeout": "600s", "additional": {}}),
            ),
        )
        .await;
    assert_case(&fx, "challenge.create", s, &b);
    assert_eq!(b["instances"], json!([]), "no instance yet: []");
    assert_eq!(
        (&b["min"], &b["max"], &b["until"]),
        (&json!("0"), &json!("0"), &Value::Null)
    );
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "wire", "scenario": "identity"})),
        )
        .await;
    assert_case(&fx, "error.challenge_already_exists", s, &b);
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "pool", "scenario": "identity", "min": -1, "max": "-3"})),
        )
        .await;
    assert_case(&fx, "error.challenge_pooler_out_of_bounds", s, &b);
    assert_eq!(
        b["details"][1]["fieldViolations"].as_array().map(Vec::len),
        Some(2)
    );
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "oci", "scenario": "127.0.0.1:1/ctf/none:v1"})),
        )
        .await;
    assert_case(&fx, "error.oci_interaction", s, &b);
    let missing = registry.reference("ctf/missing:v1");
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "oci", "scenario": missing})),
        )
        .await;
    assert_case(&fx, "error.oci_reference_not_found", s, &b);
    // A scenario the worker refuses (not a Go program): pushed as a real
    // artifact, so the API's up-front check passes and the worker answers.
    let python = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        python.path().join("Pulumi.yaml"),
        "name: py\nruntime: python\n",
    )
    .expect("write");
    std::fs::write(python.path().join("__main__.py"), "print(1)\n").expect("write");
    let py_ref = registry.reference("ctf/python:v1");
    let oci_client = cm_core::oci::Client::new(cm_core::oci::ClientConfig {
        insecure_registries: vec![registry.host.clone()],
        ..Default::default()
    });
    cm_core::oci::push(
        &oci_client,
        python.path(),
        &cm_core::oci::Reference::parse(&py_ref).expect("reference"),
    )
    .await
    .expect("push");
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "py", "scenario": py_ref})),
        )
        .await;
    assert_case(&fx, "error.scenario_non_matching_specification", s, &b);
    assert_eq!(b["details"][0]["metadata"]["reference"], json!(py_ref));
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "oci", "scenario": "localhost:5000/UPPER/case:v1"})),
        )
        .await;
    assert_case(&fx, "error.oci_reference_malformed", s, &b);
    let (s, b) = stack
        .call_raw(Method::POST, "/api/v1/challenge", b"{\"id\":".to_vec())
        .await;
    assert_case(
        &fx,
        "error.malformed_body",
        s,
        &serde_json::from_str(&b).expect("JSON error"),
    );
    let (s, b) = get("/api/v1/challenge/nope").await;
    assert_case(&fx, "error.challenge_not_found", s, &b);
    let (s, b) = stack
        .call(Method::DELETE, "/api/v1/challenge/nope", None)
        .await;
    assert_case(&fx, "error.challenge_not_found", s, &b);
    let (s, b) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/nope",
            Some(json!({"updateMask": "timeout", "timeout": "60s"})),
        )
        .await;
    assert_case(&fx, "error.challenge_not_found", s, &b);
    let (s, b) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/wire",
            Some(json!({"updateMask": "bogus"})),
        )
        .await;
    assert_case(&fx, "error.challenge_invalid_update_mask", s, &b);
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "nope", "sourceId": "1"})),
        )
        .await;
    assert_case(&fx, "error.challenge_not_found", s, &b);
    for method in [Method::PATCH, Method::DELETE] {
        let (s, b) = stack
            .call(method, "/api/v1/instance/nope/1", Some(json!({})))
            .await;
        assert_case(&fx, "error.challenge_not_found", s, &b);
    }
    let (s, b) = get("/api/v1/instance/wire/1").await;
    assert_case(&fx, "error.instance_not_found", s, &b);
    let (s, b) = stack
        .call(Method::DELETE, "/api/v1/instance/wire/1", None)
        .await;
    assert_case(&fx, "error.instance_not_found", s, &b);

    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "wire", "sourceId": "1"})),
        )
        .await;
    assert_case(&fx, "instance.create", s, &b);
    assert!(
        b["until"].is_string(),
        "a challenge with a timeout: until set"
    );
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "wire", "sourceId": "1"})),
        )
        .await;
    assert_case(&fx, "error.instance_already_exists", s, &b);
    let (s, b) = get("/api/v1/instance/wire/1").await;
    assert_case(&fx, "instance.get", s, &b);
    let (s, b) = get("/api/v1/challenge/wire").await;
    assert_case(&fx, "challenge.get", s, &b);
    assert_eq!(b["instances"].as_array().map(Vec::len), Some(1));
    let (s, lines) = stream(&stack, "/api/v1/challenge").await;
    assert!(!lines.is_empty());
    for line in &lines {
        assert_case(&fx, "challenge.query", s, line);
    }
    // Without a sourceId, chall-manager streams nothing (recorded).
    let (s, lines) = stream(&stack, "/api/v1/instance").await;
    assert_eq!((s, lines.len()), (200, 0));
    let (s, lines) = stream(&stack, "/api/v1/instance?sourceId=1").await;
    assert_eq!(lines.len(), 1);
    for line in &lines {
        assert_case(&fx, "instance.query", s, line);
    }
    let (s, b) = stack
        .call(Method::PATCH, "/api/v1/instance/wire/1", Some(json!({})))
        .await;
    assert_case(&fx, "instance.renew", s, &b);
    let (s, b) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/wire",
            Some(json!({"updateMask": "timeout,until", "timeout": "1200s", "until": null})),
        )
        .await;
    assert_case(&fx, "challenge.update", s, &b);
    assert_eq!(b["timeout"], json!("1200s"));
    // The challenge's until in the past moves the instance's: renewal refused.
    let (s, _) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/wire",
            Some(json!({"updateMask": "until", "until": "2001-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = stack
        .call(Method::PATCH, "/api/v1/instance/wire/1", Some(json!({})))
        .await;
    assert_case(&fx, "error.instance_expired", s, &b);

    // A challenge without a timeout refuses renewal; once past its until,
    // refuses instances.
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "frozen", "scenario": "identity"})),
        )
        .await;
    assert_case(&fx, "challenge.create", s, &b);
    assert_eq!(b["timeout"], Value::Null);
    let (s, _) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "frozen", "sourceId": "1"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = stack
        .call(Method::PATCH, "/api/v1/instance/frozen/1", Some(json!({})))
        .await;
    assert_case(&fx, "error.challenge_no_renewal", s, &b);
    let (s, _) = stack
        .call(
            Method::PATCH,
            "/api/v1/challenge/frozen",
            Some(json!({"updateMask": "until", "until": "2001-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "frozen", "sourceId": "2"})),
        )
        .await;
    assert_case(&fx, "error.challenge_expired", s, &b);

    let (s, b) = stack
        .call(Method::DELETE, "/api/v1/instance/wire/1", None)
        .await;
    assert_case(&fx, "instance.delete", s, &b);
    for id in ["wire", "frozen"] {
        let (s, b) = stack
            .call(Method::DELETE, &format!("/api/v1/challenge/{id}"), None)
            .await;
        assert_case(&fx, "challenge.delete", s, &b);
    }

    // ---- NATS -------------------------------------------------------------
    let client = async_nats::connect(stack.nats.url.as_str())
        .await
        .expect("connect");
    let r = nats(
        &client,
        "challenge.create",
        br#"{"id":"n","scenario":"identity","timeout":"600s"}"#,
    )
    .await;
    assert_nats_case(&fx, "challenge.create", &r);
    let r = nats(
        &client,
        "challenge.create",
        br#"{"id":"n","scenario":"identity"}"#,
    )
    .await;
    assert_nats_case(&fx, "error.challenge_already_exists", &r);
    let r = nats(
        &client,
        "challenge.create",
        br#"{"id":"p","scenario":"identity","min":3,"max":2}"#,
    )
    .await;
    assert_nats_case(&fx, "error.challenge_pooler_out_of_bounds", &r);
    let r = nats(&client, "challenge.create", br#"{"id":"#).await;
    assert_nats_case(&fx, "error.malformed_body", &r);
    let r = nats(
        &client,
        "challenge.create",
        br#"{"id":"m","scenario":"localhost:5000/UPPER/case:v1"}"#,
    )
    .await;
    assert_nats_case(&fx, "error.oci_reference_malformed", &r);
    let r = nats(&client, "challenge.get", br#"{"id":"nope"}"#).await;
    assert_nats_case(&fx, "error.challenge_not_found", &r);
    let r = nats(
        &client,
        "challenge.update",
        br#"{"id":"n","updateMask":"bogus"}"#,
    )
    .await;
    assert_nats_case(&fx, "error.challenge_invalid_update_mask", &r);
    let r = nats(
        &client,
        "instance.get",
        br#"{"challengeId":"n","sourceId":"1"}"#,
    )
    .await;
    assert_nats_case(&fx, "error.instance_not_found", &r);
    let r = nats(
        &client,
        "instance.create",
        br#"{"challengeId":"n","sourceId":"1"}"#,
    )
    .await;
    assert_nats_case(&fx, "instance.create", &r);
    let r = nats(
        &client,
        "instance.create",
        br#"{"challengeId":"n","sourceId":"1"}"#,
    )
    .await;
    assert_nats_case(&fx, "error.instance_already_exists", &r);
    let r = nats(
        &client,
        "instance.get",
        br#"{"challengeId":"n","sourceId":"1"}"#,
    )
    .await;
    assert_nats_case(&fx, "instance.get", &r);
    let r = nats(&client, "instance.list", br#"{"sourceId":"1"}"#).await;
    assert_nats_case(&fx, "instance.query", &r);
    let r = nats(&client, "challenge.get", br#"{"id":"n"}"#).await;
    assert_nats_case(&fx, "challenge.get", &r);
    let r = nats(&client, "challenge.list", b"{}").await;
    assert_nats_case(&fx, "challenge.query", &r);
    let r = nats(
        &client,
        "instance.renew",
        br#"{"challengeId":"n","sourceId":"1"}"#,
    )
    .await;
    assert_nats_case(&fx, "instance.renew", &r);
    let r = nats(
        &client,
        "challenge.update",
        br#"{"id":"n","updateMask":"timeout","timeout":"900s"}"#,
    )
    .await;
    assert_nats_case(&fx, "challenge.update", &r);
    let r = nats(
        &client,
        "instance.delete",
        br#"{"challengeId":"n","sourceId":"1"}"#,
    )
    .await;
    assert_nats_case(&fx, "instance.delete", &r);
    let r = nats(&client, "challenge.delete", br#"{"id":"n"}"#).await;
    assert_nats_case(&fx, "challenge.delete", &r);
}

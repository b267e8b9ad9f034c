//! Hostile input on both front doors, REST and the NATS service: each
//! malformed request is refused with a 4xx and a message saying why, and
//! nothing is published or written. Unknown fields stay ignored, as
//! chall-manager's clients rely on.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use support::Stack;

/// One malformed request: REST route and NATS endpoint, the raw body, the
/// status both must answer and a piece of the message.
struct Case {
    what: &'static str,
    method: Method,
    path: &'static str,
    endpoint: &'static str,
    body: Vec<u8>,
    status: u16,
    says: &'static str,
}

fn case(
    what: &'static str,
    method: Method,
    path: &'static str,
    endpoint: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    says: &'static str,
) -> Case {
    Case {
        what,
        method,
        path,
        endpoint,
        body: body.into(),
        status,
        says,
    }
}

fn challenge(body: serde_json::Value) -> Vec<u8> {
    body.to_string().into_bytes()
}

fn corpus() -> Vec<Case> {
    let post = Method::POST;
    let c = "/api/v1/challenge";
    let i = "/api/v1/instance";
    let (cc, ic) = ("challenge.create", "instance.create");
    let nested = format!(
        "{{\"id\":\"deep\",\"scenario\":\"identity\",\"additional\":{}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let nested40 = format!(
        "{{\"id\":\"deep\",\"scenario\":\"identity\",\"additional\":{}{}}}",
        "[".repeat(40),
        "]".repeat(40)
    );
    vec![
        case(
            "traversal in a challenge id",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "../../etc/passwd", "scenario": "identity"})),
            400,
            "must not contain '/'",
        ),
        case(
            "dot-dot challenge id",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "..", "scenario": "identity"})),
            400,
            "'.' or '..'",
        ),
        case(
            "traversal in a scenario",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t1", "scenario": "../../../etc"})),
            400,
            "'..'",
        ),
        case(
            "absolute scenario path",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t2", "scenario": "/etc/passwd"})),
            400,
            "scenario",
        ),
        case(
            "traversal in a source id",
            post.clone(),
            i,
            ic,
            challenge(json!({"challengeId": "x", "sourceId": "../x"})),
            400,
            "must not contain '/'",
        ),
        case(
            "NUL in an id",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "a\u{0}b", "scenario": "identity"})),
            400,
            "control characters",
        ),
        case(
            "escape sequence in a source id",
            post.clone(),
            i,
            ic,
            challenge(json!({"challengeId": "x", "sourceId": "x\u{1b}[31m"})),
            400,
            "control characters",
        ),
        case(
            "non-UTF-8 bytes",
            post.clone(),
            c,
            cc,
            vec![
                b'{', b'"', b'i', b'd', b'"', b':', b'"', 0xff, 0xfe, b'"', b'}',
            ],
            400,
            "not valid JSON",
        ),
        case(
            "truncated JSON",
            post.clone(),
            c,
            cc,
            b"{\"id\": \"c\",".to_vec(),
            400,
            "not valid JSON",
        ),
        case(
            "very deeply nested JSON",
            post.clone(),
            c,
            cc,
            nested.into_bytes(),
            400,
            "recursion limit",
        ),
        case(
            "deeply nested JSON",
            post.clone(),
            c,
            cc,
            nested40.into_bytes(),
            400,
            "deep",
        ),
        case(
            "id of the wrong type",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": true, "scenario": "identity"})),
            400,
            "invalid request",
        ),
        case(
            "timeout of the wrong type",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t3", "scenario": "identity", "timeout": 5})),
            400,
            "invalid request",
        ),
        case(
            "additional of the wrong type",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t4", "scenario": "identity", "additional": {"k": 1}})),
            400,
            "invalid request",
        ),
        case(
            "pool size overflowing int64",
            post.clone(),
            c,
            cc,
            b"{\"id\":\"t5\",\"scenario\":\"identity\",\"min\":99999999999999999999999}".to_vec(),
            400,
            "invalid request",
        ),
        case(
            "negative pool size",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t6", "scenario": "identity", "max": -3})),
            400,
            "max",
        ),
        case(
            "timeout overflowing",
            post.clone(),
            c,
            cc,
            challenge(
                json!({"id": "t7", "scenario": "identity", "timeout": "99999999999999999999s"}),
            ),
            400,
            "invalid request",
        ),
        case(
            "OCI reference with a bad digest",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t8", "scenario": "registry.example:5000/repo@sha256:nothex"})),
            400,
            "scenario",
        ),
        case(
            "OCI reference with whitespace",
            post.clone(),
            c,
            cc,
            challenge(json!({"id": "t9", "scenario": "registry.example/repo:ta g"})),
            400,
            "whitespace",
        ),
        case(
            "an array instead of an object",
            post.clone(),
            c,
            cc,
            b"[]".to_vec(),
            400,
            "JSON object",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_are_refused_on_both_front_doors_and_nothing_is_written() {
    let stack = Stack::start(1).await;
    let nats = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(stack.nats.url.as_str())
        .await
        .expect("nats");

    let mut huge = b"{\"id\":\"c\",\"scenario\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'y', 1024 * 1024 + 10));
    huge.extend(b"\"}");
    let (status, text) = stack
        .call_raw(Method::POST, "/api/v1/challenge", huge)
        .await;
    assert_eq!(status, 400, "huge body: {text}");
    assert!(text.contains("larger than"), "huge body: {text}");

    for case in corpus() {
        let (status, text) = stack
            .call_raw(case.method.clone(), case.path, case.body.clone())
            .await;
        assert_eq!(status, case.status, "REST, {}: {text}", case.what);
        let body: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("REST, {}: not JSON: {text}", case.what));
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(case.says),
            "REST, {}: the message should say {:?}: {text}",
            case.what,
            case.says
        );

        let reply = nats
            .request(
                format!("cm.api.{}", case.endpoint),
                case.body.clone().into(),
            )
            .await
            .unwrap_or_else(|e| panic!("NATS, {}: no answer: {e}", case.what));
        let headers = reply.headers.as_ref().unwrap_or_else(|| {
            panic!(
                "NATS, {}: answered without an error: {:?}",
                case.what, reply.payload
            )
        });
        let code = headers
            .get("Nats-Service-Error-Code")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let error = headers
            .get("Nats-Service-Error")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        assert_eq!(
            code,
            case.status.to_string(),
            "NATS, {}: {error}",
            case.what
        );
        assert!(
            error.contains(case.says),
            "NATS, {}: the error should say {:?}: {error}",
            case.what,
            case.says
        );
    }

    // Unknown fields are ignored, on both doors.
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(
                json!({"id": "lenient", "scenario": "identity", "unknownField": 1,
                        "nested": {"x": [1, 2]}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let reply = nats
        .request(
            "cm.api.challenge.get",
            json!({"id": "lenient", "somethingNew": true})
                .to_string()
                .into(),
        )
        .await
        .expect("NATS get");
    assert!(reply.headers.is_none(), "unknown field refused: {reply:?}");

    // Nothing published but the lenient create; nothing written but its record.
    let js = async_nats::jetstream::new(nats.clone());
    let mut stream = js
        .get_stream(cm_core::queue::COMMANDS_STREAM)
        .await
        .expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut published = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            published.push(format!(
                "{} {}",
                m.subject,
                String::from_utf8_lossy(&m.payload)
            ));
        }
    }
    assert_eq!(
        last, 1,
        "only the lenient create was published: {published:#?}"
    );
    let challenges = stack.store.list_challenges().await.expect("list");
    assert_eq!(challenges.len(), 1, "only the lenient create was written");
    assert_eq!(challenges[0].id, "lenient");
    let other = stack
        .store
        .client()
        .get(
            "/cm/instance/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .expect("etcd");
    assert_eq!(other.count(), 0);
}

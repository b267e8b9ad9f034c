//! Spans over real OTLP (HTTP/protobuf) from the API and a worker process,
//! received by an OTLP endpoint in the test: one trace through the NATS
//! headers, the Pulumi phase spans, the worker's metrics, and no flag anywhere
//! in what was exported.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest,
};
use prost::Message as _;
use reqwest::Method;
use serde_json::json;
use support::Stack;

#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Default, Clone)]
struct Sink {
    spans: Arc<Mutex<Vec<Received>>>,
    metrics: Arc<Mutex<Vec<String>>>,
    raw: Arc<Mutex<Vec<u8>>>,
}

async fn receive_metrics(State(sink): State<Sink>, body: Bytes) -> &'static str {
    sink.raw.lock().expect("raw").extend_from_slice(&body);
    let Ok(request) = ExportMetricsServiceRequest::decode(body) else {
        return "";
    };
    let mut names = sink.metrics.lock().expect("metrics");
    for rm in request.resource_metrics {
        for sm in rm.scope_metrics {
            names.extend(sm.metrics.into_iter().map(|m| m.name));
        }
    }
    ""
}

async fn receive(State(sink): State<Sink>, body: Bytes) -> &'static str {
    sink.raw.lock().expect("raw").extend_from_slice(&body);
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return "";
    };
    let mut spans = sink.spans.lock().expect("spans");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
    }
    ""
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_over_otlp_from_the_api_and_worker_processes() {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .route("/v1/metrics", post(receive_metrics))
        .with_state(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The API runs in this process, exporting over OTLP like the binary does.
    let provider = cm_core::telemetry::otlp_provider_to("cm-api", "http/protobuf", Some(&endpoint))
        .expect("otlp provider");
    let _telemetry = cm_core::telemetry::install("cm-api", Some(provider.clone()));
    let stack = Stack::start_with(
        1,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    )
    .await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/challenge",
            Some(json!({"id": "otlp", "scenario": "identity"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    let (status, instance) = stack
        .call(
            Method::POST,
            "/api/v1/instance",
            Some(json!({"challengeId": "otlp", "sourceId": "s"})),
        )
        .await;
    assert_eq!(status, 200, "{}", stack.worker_logs());
    let flag = instance["flags"][0].as_str().expect("flag").to_owned();
    let _ = provider.force_flush();

    let find = |name: &str| {
        sink.spans
            .lock()
            .expect("spans")
            .iter()
            .find(|s| s.name == name)
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (request, publish, process, up) = loop {
        let _ = provider.force_flush();
        if let (Some(a), Some(b), Some(c), Some(d)) = (
            find("POST /api/v1/instance"),
            find("publish cm.cmd.instance.create"),
            find("process cm.cmd.instance.create"),
            find("up"),
        ) {
            break (a, b, c, d);
        }
        assert!(
            Instant::now() < deadline,
            "spans missing: {:?}\n{}",
            sink.spans
                .lock()
                .expect("spans")
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>(),
            stack.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(process.service.contains("cm-worker"), "{}", process.service);
    assert!(request.service.contains("cm-api"), "{}", request.service);
    for span in [&publish, &process, &up] {
        assert_eq!(
            span.trace_id, request.trace_id,
            "{} is in the request's trace",
            span.name
        );
    }
    assert_eq!(publish.parent_span_id, request.span_id);
    assert_eq!(
        process.parent_span_id, publish.span_id,
        "parent chain through the NATS headers"
    );
    // The worker's metrics arrive over OTLP too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = [
        "cm_commands",
        "cm_command_latency_seconds",
        "cm_pulumi_duration_seconds",
        "cm_lock_wait_seconds",
        "cm_queue_pending",
    ];
    loop {
        let names = sink.metrics.lock().expect("metrics").clone();
        if wanted.iter().all(|w| names.iter().any(|n| n == w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics missing over OTLP: got {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let raw = sink.raw.lock().expect("raw").clone();
    assert!(
        !raw.windows(flag.len()).any(|w| w == flag.as_bytes()),
        "a flag value reached the exported telemetry"
    );
}

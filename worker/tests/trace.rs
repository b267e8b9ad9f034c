//! One trace across API -> NATS -> worker: the worker's consume span is a
//! child of the API's publish span, through the W3C headers of the command.

mod support;

use std::time::Duration;

use opentelemetry_sdk::trace::{InMemorySpanExporterBuilder, SdkTracerProvider, SpanData};
use serde_json::json;

fn find<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        panic!(
            "no span {name:?} in {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_span_is_a_child_of_the_api_publish_span() {
    let exporter = InMemorySpanExporterBuilder::new().build();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = cm_core::telemetry::install("trace-test", Some(provider.clone()));

    let nats = cm_testkit::server::nats();
    let etcd = cm_testkit::server::etcd();
    let (_cache_guard, cache) = cm_testkit::worker_cache();
    let worker_config = support::worker_config(&nats.url, &etcd.url, cache.clone());
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(cm_worker::run(worker_config, async {
        let _ = worker_stopped.await;
    }));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let api_config = support::api_config(&nats.url, &etcd.url);
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(cm_api::run(api_config, listener, async {
        let _ = api_stopped.await;
    }));

    let http = reqwest::Client::new();
    let created = http
        .post(format!("{base}/api/v1/challenge"))
        .json(&json!({"id": "traced", "scenario": "identity"}))
        .send()
        .await
        .expect("create challenge");
    assert_eq!(
        created.status(),
        200,
        "{}",
        created.text().await.unwrap_or_default()
    );
    let instance = http
        .post(format!("{base}/api/v1/instance"))
        .json(&json!({"challengeId": "traced", "sourceId": "s"}))
        .send()
        .await
        .expect("create instance");
    assert_eq!(instance.status(), 200);
    let flag = instance.json::<serde_json::Value>().await.expect("json")["flags"][0]
        .as_str()
        .expect("flag")
        .to_owned();

    // The same process serves the metrics of what just happened.
    let mut text = String::new();
    for _ in 0..100 {
        text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        // The latency is observed at the ack, just after the reply.
        if text.contains("cm_queue_pending{")
            && text.contains("cm_command_latency_seconds_count{kind=\"instance.create\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for expected in [
        "cm_commands_total{kind=\"instance.create\",outcome=\"success\"} 1",
        "cm_commands_total{kind=\"challenge.create\",outcome=\"success\"} 1",
        "cm_command_latency_seconds_count{kind=\"instance.create\"} 1",
        "cm_pulumi_duration_seconds_count{phase=\"up\",outcome=\"success\"} 1",
        "cm_pulumi_duration_seconds_count{phase=\"compile\",outcome=\"success\"}",
        "cm_lock_wait_seconds_count{lock=\"instance\"}",
        "cm_queue_pending{stream=\"CM_COMMANDS\",consumer=\"cm-workers\"} ",
        "cm_queue_oldest_pending_age_seconds{stream=\"CM_COMMANDS\",consumer=\"cm-workers\"} ",
        "cm_dead_letters 0",
    ] {
        assert!(
            text.contains(expected),
            "{expected} missing from /metrics:\n{text}"
        );
    }
    assert!(!text.contains(&flag), "no flag in metrics");

    let _ = stop_api.send(());
    let _ = stop_worker.send(());
    let _ = api.await;
    let _ = worker.await;
    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().expect("spans");

    let request = find(&spans, "POST /api/v1/instance");
    let publish = find(&spans, "publish cm.cmd.instance.create");
    let process = find(&spans, "process cm.cmd.instance.create");
    let handler = find(&spans, "instance.create");
    let trace = request.span_context.trace_id();
    for span in [publish, process, handler] {
        assert_eq!(
            span.span_context.trace_id(),
            trace,
            "{} is in the request's trace",
            span.name
        );
    }
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    assert_eq!(
        process.parent_span_id,
        publish.span_context.span_id(),
        "the consume span continues the publish span from the NATS headers"
    );
    assert_eq!(handler.parent_span_id, process.span_context.span_id());
    assert!(
        spans
            .iter()
            .any(|s| s.name == "lock wait" && s.span_context.trace_id() == trace),
        "lock waits are traced"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.name == "up" && s.span_context.trace_id() == trace),
        "the Pulumi run is traced"
    );
    let dump = format!("{spans:?}");
    assert!(!dump.contains(&flag), "no flag value in any span");
}

//! Trace context across the HTTP edge: a server span (REST or gRPC)
//! continues the caller's W3C trace (`traceparent`, `tracestate` headers or
//! metadata), so a platform's trace runs on through the API, the command and
//! the worker.

use opentelemetry::propagation::Extractor;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the trace context in `headers`, when there is one.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    // Fails only when the span is already closed or has no OpenTelemetry
    // layer (telemetry off): nothing to continue then.
    let _ = span.set_parent(parent);
}

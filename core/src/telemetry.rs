//! Telemetry setup in one call: structured logs via `tracing`, W3C trace
//! context propagation, and OTLP trace export when configured.
//!
//! - Logs: `RUST_LOG` filters (default `info`); `CM_LOG_FORMAT=json` gives
//!   JSON lines on stderr.
//! - Traces: exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_TRACES_EXPORTER` is
//!   not `none`; `OTEL_EXPORTER_OTLP_PROTOCOL` chooses `grpc` (default) or
//!   `http/protobuf`; `OTEL_SERVICE_NAME` overrides the service name; the
//!   SDK reads the other standard `OTEL_*` variables (sampler, batch sizes).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, prelude::*};

/// Keeps telemetry alive; flushes and shuts the exporters down on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
        if let Some(meters) = self.meters.take() {
            let _ = meters.force_flush();
            let _ = meters.shutdown();
        }
    }
}

/// Why OTLP export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Installs logging, propagation and (when configured) OTLP export for `service`.
pub fn init(service: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    if !otlp_configured() {
        return Ok(install(service, None));
    }
    let protocol = otlp_protocol();
    let provider = otlp_provider_to(service, &protocol, None)?;
    let meters = otlp_meter_provider_to(service, &protocol, None)?;
    let mut guard = install(service, Some(provider));
    guard.meters = Some(meters);
    Ok(guard)
}

fn otlp_protocol() -> String {
    std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "grpc".into())
}

/// Pushes this process's metrics (see `metrics`) over OTLP every
/// `OTEL_METRIC_EXPORT_INTERVAL` milliseconds (default 60 s); the Prometheus
/// endpoint serves the same measurements.
pub fn otlp_meter_provider_to(
    service: &'static str,
    protocol: &str,
    endpoint: Option<&str>,
) -> Result<SdkMeterProvider, TelemetryError> {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_otlp::{MetricExporter, WithExportConfig};
    let exporter = match protocol {
        "http/protobuf" => {
            let mut builder = MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(base) = endpoint {
                builder =
                    builder.with_endpoint(format!("{}/v1/metrics", base.trim_end_matches('/')));
            }
            builder.build()
        }
        _ => {
            let mut builder = MetricExporter::builder().with_tonic();
            if let Some(base) = endpoint {
                builder = builder.with_endpoint(base);
            }
            builder.build()
        }
    }
    .map_err(|e| TelemetryError(e.to_string()))?;
    let interval = std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis,
        );
    let reader =
        opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_interval(interval)
        .build();
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let meters = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    crate::metrics::install_otel(&meters.meter("cm"));
    Ok(meters)
}

/// Installs logging and propagation with a given tracer provider (tests use
/// an in-memory exporter). A second call in one process keeps the first setup.
pub fn install(service: &'static str, provider: Option<SdkTracerProvider>) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CM_LOG_FORMAT").is_ok_and(|v| v == "json");
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        // Colours only on a terminal: a log file or a journal gets plain
        // `key=value` text that grep and log shippers read as it is.
        fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed()
    };
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer(service))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .with(filter)
        .try_init();
    TelemetryGuard {
        provider,
        meters: None,
    }
}

fn otlp_configured() -> bool {
    let exporter_off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none");
    let endpoint = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    endpoint && !exporter_off
}

/// An OTLP trace provider for `protocol` (`grpc` or `http/protobuf`); the
/// endpoint comes from `endpoint` when given (an HTTP base URL such as
/// `http://127.0.0.1:4318`), else from the standard `OTEL_*` variables.
pub fn otlp_provider_to(
    service: &'static str,
    protocol: &str,
    endpoint: Option<&str>,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    let exporter = match protocol {
        "http/protobuf" => {
            let mut builder = SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(base) = endpoint {
                builder =
                    builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
            }
            builder.build()
        }
        _ => {
            let mut builder = SpanExporter::builder().with_tonic();
            if let Some(base) = endpoint {
                builder = builder.with_endpoint(base);
            }
            builder.build()
        }
    }
    .map_err(|e| TelemetryError(e.to_string()))?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    // The batch processor runs on the tokio runtime (the exporters' HTTP and
    // gRPC clients need it; the default processor's own thread has none).
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build())
}

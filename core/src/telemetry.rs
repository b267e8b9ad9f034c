//! Telemetry setup in one call: structured logs via `tracing`.
//!
//! Log filtering follows `RUST_LOG` (default `info`); `CM_LOG_FORMAT=json`
//! switches to JSON lines. OTLP export of traces and metrics plugs in here.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Keeps telemetry alive; flushes on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    _private: (),
}

/// Installs the global tracing subscriber for a binary named `service`.
///
/// Safe to call once per process; a second call is a no-op.
pub fn init(service: &'static str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CM_LOG_FORMAT").is_ok_and(|v| v == "json");
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "telemetry initialised");
    }
    TelemetryGuard { _private: () }
}

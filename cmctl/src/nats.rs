//! The JetStream side: connecting to NATS and opening the streams defined in
//! `cm_core::protocol` (`CM_COMMANDS`, `CM_DEAD_LETTERS`). `cmctl` never creates
//! a stream or the workers' consumer: it inspects what the API and workers
//! set up, and a missing stream is reported, not made.

use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind, stream::Stream};

use crate::error::CliError;

/// Connects to the first reachable server of `urls` (comma-separated).
pub async fn connect(
    urls: &str,
    options: &cm_core::nats::NatsOptions,
    timeout: Duration,
) -> Result<jetstream::Context, CliError> {
    // The one connection every binary makes (TLS, user/password, token,
    // nkey, creds); its errors name the URL without credentials.
    let client = cm_core::nats::connect(urls, "cmctl", options)
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))?;
    let mut js = jetstream::new(client);
    js.set_timeout(timeout.min(Duration::from_secs(10)));
    Ok(js)
}

/// The stream `name`; a missing one means no API or worker ever ran here.
pub async fn stream(js: &jetstream::Context, name: &str) -> Result<Stream, CliError> {
    js.get_stream(name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            CliError::NotFound(format!(
                "stream {name} does not exist on this NATS server (has cm-api or cm-worker run against it?)"
            ))
        }
        _ => CliError::nats(&format!("stream {name}"), e),
    })
}

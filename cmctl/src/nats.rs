//! The JetStream side: connecting to NATS and opening the streams defined in
//! `cm_core::queue` (`CM_COMMANDS`, `CM_DEAD_LETTERS`). `cmctl` never creates
//! a stream or the workers' consumer: it inspects what the API and workers
//! set up, and a missing stream is reported, not made.

use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind, stream::Stream};

use crate::error::CliError;

/// Connects to the first reachable server of `urls` (comma-separated).
pub async fn connect(urls: &str, timeout: Duration) -> Result<jetstream::Context, CliError> {
    let shown = without_credentials(urls);
    let client = async_nats::ConnectOptions::new()
        .name("cmctl")
        .connection_timeout(timeout.min(Duration::from_secs(10)))
        .connect(urls)
        .await
        .map_err(|e| CliError::nats(&format!("cannot reach NATS at {shown}"), e))?;
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

/// `urls` with any `user:password@` removed, for messages.
pub fn without_credentials(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &u[..scheme + 3], &u[at + 1..])
            }
            (None, Some(at)) => u[at + 1..].to_owned(),
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_messages() {
        assert_eq!(
            without_credentials("nats://u:secret@a:4222,nats://b:4222,tok@c:4222"),
            "nats://a:4222,nats://b:4222,c:4222"
        );
    }
}

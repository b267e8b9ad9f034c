//! Readiness waits shared by the end-to-end tests and `cm-bench`: an API
//! answering its health check, the workers' consumer drained. Both poll a
//! real signal with a deadline; neither sleeps as a guess.

use std::time::{Duration, Instant};

/// Why a wait could not even look.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the API at {base} was not healthy within {limit:?}")]
    Unhealthy { base: String, limit: Duration },
    #[error("NATS: {0}")]
    Nats(String),
}

/// Waits until the API at `base` answers `GET /healthcheck` with a success,
/// polling every 50 ms for at most `limit`.
pub async fn healthy(http: &reqwest::Client, base: &str, limit: Duration) -> Result<(), WaitError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(r) = http.get(format!("{base}/healthcheck")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Unhealthy {
                base: base.to_owned(),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (polling every `poll`, at most `limit`) until the workers' consumer
/// has nothing pending or unacknowledged; whether it got there.
pub async fn drained(nats_url: &str, poll: Duration, limit: Duration) -> Result<bool, WaitError> {
    let nats = |e: &dyn std::fmt::Display| WaitError::Nats(e.to_string());
    // Comma-separated URLs (a cluster) as the binaries take them.
    let client = cm_core::nats::connect(nats_url, "cm-testkit", &Default::default())
        .await
        .map_err(|e| nats(&e))?;
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + limit;
    // A cluster electing a stream leader answers nothing for a while:
    // asked again until the limit, failing only if it never answered.
    let mut answered = false;
    let mut last_error = None;
    while Instant::now() < deadline {
        let probe = async {
            let mut consumer = js
                .get_stream(cm_core::queue::COMMANDS_STREAM)
                .await
                .map_err(|e| nats(&e))?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    cm_core::queue::WORKERS_CONSUMER,
                )
                .await
                .map_err(|e| nats(&e))?;
            let info = consumer.info().await.map_err(|e| nats(&e))?;
            Ok::<bool, WaitError>(info.num_pending == 0 && info.num_ack_pending == 0)
        };
        match probe.await {
            Ok(true) => return Ok(true),
            Ok(false) => answered = true,
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(poll).await;
    }
    match last_error {
        Some(e) if !answered => Err(e),
        _ => Ok(false),
    }
}

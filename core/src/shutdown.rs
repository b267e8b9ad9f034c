//! Shutdown on SIGINT/SIGTERM: the first signal starts a graceful shutdown,
//! a second one exits at once.

/// Completes on the first SIGINT or SIGTERM; a later signal exits the process.
pub async fn signal() {
    wait_one().await;
    tracing::info!("shutdown requested; a second signal exits at once");
    tokio::spawn(async {
        wait_one().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_one() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

//! Fail-over between etcd members: only members that answer take requests.
//!
//! etcd-client balances requests over every endpoint it was given (tower's
//! power-of-two-choices). A member that is down still gets its share: its
//! connection error surfaces as the *request's* error ("tcp connect error"),
//! so with one member of three down about a third of all reads and writes
//! fail, commands are retried until they are dead-lettered, and the API
//! answers 503. The cluster itself is fine (it has a quorum): the client
//! must stop sending to the dead member.
//!
//! [`watch`] probes each endpoint (a TCP connect, every
//! [`PROBE_INTERVAL`]) and takes an endpoint that does not answer out of the
//! client's balancer, and puts it back once it answers again. The last
//! endpoint in is never taken out. What a TCP probe cannot see (a member that
//! accepts connections but has lost its quorum) is left to etcd itself, which
//! answers such requests with an error the caller retries.

use std::{collections::BTreeSet, time::Duration};

use etcd_client::Client;
use tokio::{net::TcpStream, task::JoinHandle};

/// Time between two probes of every endpoint.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a probe waits for a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// The probing task; stops when dropped.
#[derive(Debug)]
pub struct Watch(JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts probing `endpoints` (as given to `Client::connect`) and keeping
/// `client`'s balancer to the ones that answer. `None` for a single endpoint
/// (nothing to fail over to).
pub fn watch(client: &Client, endpoints: &[String]) -> Option<Watch> {
    if endpoints.len() < 2 {
        return None;
    }
    let client = client.clone();
    let endpoints = endpoints.to_vec();
    Some(Watch(tokio::spawn(async move {
        let mut out = BTreeSet::new();
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        loop {
            ticker.tick().await;
            for endpoint in &endpoints {
                let up = answers(endpoint).await;
                let is_out = out.contains(endpoint);
                if !up && !is_out && out.len() + 1 < endpoints.len() {
                    if client.remove_endpoint(endpoint).await.is_ok() {
                        tracing::warn!(%endpoint, "etcd member does not answer; requests go to the others");
                        out.insert(endpoint.clone());
                    }
                } else if up && is_out && client.add_endpoint(endpoint).await.is_ok() {
                    tracing::info!(%endpoint, "etcd member answers again; it takes requests");
                    out.remove(endpoint);
                }
            }
        }
    })))
}

/// Whether a TCP connection to the endpoint's host and port opens.
async fn answers(endpoint: &str) -> bool {
    let Some(authority) = authority(endpoint) else {
        return true; // unparsable: leave it to the client
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(authority)).await,
        Ok(Ok(_))
    )
}

/// `host:port` of `http://host:port/...` (or of a bare `host:port`).
fn authority(endpoint: &str) -> Option<&str> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next()?;
    authority.contains(':').then_some(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_endpoints() {
        assert_eq!(authority("http://127.0.0.1:2379"), Some("127.0.0.1:2379"));
        assert_eq!(
            authority("https://etcd-0.etcd:2379/"),
            Some("etcd-0.etcd:2379")
        );
        assert_eq!(authority("127.0.0.1:2379"), Some("127.0.0.1:2379"));
        assert_eq!(authority("http://etcd"), None);
    }

    #[tokio::test]
    async fn a_closed_port_does_not_answer_and_an_open_one_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = format!("http://{}", listener.local_addr().expect("addr"));
        assert!(answers(&open).await);
        drop(listener);
        assert!(!answers(&open).await);
    }
}

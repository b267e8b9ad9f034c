//! What can go wrong in a `cmctl` run, and the exit code each failure gives.
//!
//! The scheme (also printed by `cmctl --help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | usage error, or the request was refused as invalid (HTTP 400, 401, 403, 422, ...) |
//! | 2 | not found (HTTP 404, an absent dead letter) |
//! | 3 | conflict with the current state (HTTP 409 already exists, 429 quota reached, a replay inside the de-duplication window) |
//! | 4 | server error or unreachable (HTTP 5xx except 504, connection refused, NATS unavailable) |
//! | 5 | timed out (HTTP 504: the command still runs; `--timeout` elapsed) |

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  usage error, or the request was refused as invalid (HTTP 400, 401, 403, 422, ...)
  2  not found (HTTP 404, no such dead letter)
  3  conflict with the current state (HTTP 409 already exists, 429 quota reached,
     a replay inside the queue's de-duplication window)
  4  server error or unreachable (HTTP 5xx, connection refused, NATS unavailable)
  5  timed out (HTTP 504: the command is still running; --timeout elapsed)";

/// A failed run: one line for stderr and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags or values, caught before anything is sent.
    #[error("{0}")]
    Usage(String),
    /// The API answered an error status; `message` is the API's own.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The API or NATS could not be reached or failed.
    #[error("{0}")]
    Unavailable(String),
    /// No answer in time.
    #[error("{0}")]
    TimedOut(String),
}

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 1,
            Self::NotFound(_) => 2,
            Self::Conflict(_) => 3,
            Self::Unavailable(_) => 4,
            Self::TimedOut(_) => 5,
            Self::Api { status, .. } => match *status {
                404 => 2,
                409 | 429 => 3,
                408 | 504 => 5,
                500..=599 => 4,
                _ => 1,
            },
        }
    }

    /// The same failure (same exit code) with another message.
    pub fn retitled(self, message: String) -> Self {
        match self {
            Self::Usage(_) => Self::Usage(message),
            Self::NotFound(_) => Self::NotFound(message),
            Self::Conflict(_) => Self::Conflict(message),
            Self::Unavailable(_) => Self::Unavailable(message),
            Self::TimedOut(_) => Self::TimedOut(message),
            Self::Api { status, .. } => Self::Api { status, message },
        }
    }

    /// NATS failures: the server or JetStream is unavailable.
    pub fn nats(context: &str, e: impl std::fmt::Display) -> Self {
        Self::Unavailable(format!("{context}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_documented_codes() {
        let api = |status| {
            CliError::Api {
                status,
                message: String::new(),
            }
            .exit_code()
        };
        assert_eq!(api(400), 1);
        assert_eq!(api(403), 1);
        assert_eq!(api(404), 2);
        assert_eq!(api(409), 3);
        assert_eq!(api(429), 3);
        assert_eq!(api(500), 4);
        assert_eq!(api(503), 4);
        assert_eq!(api(504), 5);
    }
}

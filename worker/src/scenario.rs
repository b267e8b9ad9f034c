//! The `scenario` subcommand's logic: one stack of a scenario deployed,
//! updated or destroyed directly through the Pulumi driver, without the
//! queue or the store, its state kept in a local file between runs.
//!
//! Owns: the state file's use (read if present, written after `up`,
//! removed after `destroy`) and what a run reports. Must not know: flags,
//! the queue, etcd.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use cm_core::Identity;

use crate::pulumi::{Driver, DriverError, StackState};

/// Why a direct scenario run failed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a state file: {source}", path.display())]
    NotAState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state file holds an invalid identity: {0}")]
    Identity(String),
    #[error("{} does not exist: nothing to destroy", .0.display())]
    NothingToDestroy(PathBuf),
}

/// What `up` deployed.
#[derive(Debug)]
pub struct UpReport {
    pub identity: Identity,
    pub connection_info: String,
    pub flags: Vec<String>,
}

impl UpReport {
    /// The lines printed, flags hidden unless `show_flags`.
    pub fn render(&self, show_flags: bool) -> String {
        let flags = if show_flags {
            self.flags.join(", ")
        } else {
            format!("{} (hidden; --show-flags)", self.flags.len())
        };
        format!(
            "identity:        {}\nconnection_info: {}\nflags:           {flags}",
            self.identity, self.connection_info
        )
    }
}

/// Deploys (or updates in place) one stack of the scenario in `dir`: its
/// identity is `identity`, else the one in `state_file`, else a new one.
pub async fn up(
    driver: &Driver,
    dir: &Path,
    identity: Option<Identity>,
    additional: BTreeMap<String, String>,
    state_file: &Path,
) -> Result<UpReport, ScenarioError> {
    let previous = read_state(state_file).await?;
    let identity = match (identity, &previous) {
        (Some(id), _) => id,
        (None, Some(p)) => p
            .stack
            .parse()
            .map_err(|_| ScenarioError::Identity(p.stack.clone()))?,
        (None, None) => Identity::random(),
    };
    let scenario = driver.prepare(dir).await?;
    let deployment = driver
        .up(&scenario, &identity, &additional, previous.as_ref())
        .await?;
    let json = serde_json::to_vec_pretty(&deployment.state).map_err(|source| {
        ScenarioError::NotAState {
            path: state_file.to_owned(),
            source,
        }
    })?;
    tokio::fs::write(state_file, json)
        .await
        .map_err(|source| ScenarioError::Io {
            path: state_file.to_owned(),
            source,
        })?;
    Ok(UpReport {
        identity,
        connection_info: deployment.outputs.connection_info,
        flags: deployment.outputs.flags,
    })
}

/// Destroys the stack recorded in `state_file`, then removes the file;
/// the destroyed stack's name.
pub async fn destroy(
    driver: &Driver,
    dir: &Path,
    state_file: &Path,
) -> Result<String, ScenarioError> {
    let Some(state) = read_state(state_file).await? else {
        return Err(ScenarioError::NothingToDestroy(state_file.to_owned()));
    };
    let scenario = driver.prepare(dir).await?;
    driver.destroy(&scenario, &state).await?;
    tokio::fs::remove_file(state_file).await.ok();
    Ok(state.stack)
}

/// The state in `path`, `None` when there is no such file.
pub async fn read_state(path: &Path) -> Result<Option<StackState>, ScenarioError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| ScenarioError::NotAState {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ScenarioError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `key=value` (a non-empty key), for `--additional`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_state_file_is_no_state_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert!(read_state(&path).await.expect("absent").is_none());
        std::fs::write(&path, b"{not json").expect("write");
        let err = read_state(&path).await.expect_err("not a state");
        assert!(matches!(err, ScenarioError::NotAState { .. }), "{err}");
        assert!(err.to_string().contains("is not a state file"), "{err}");
    }

    #[test]
    fn additional_values_are_key_value() {
        assert_eq!(
            parse_key_value("a=b=c"),
            Ok(("a".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }

    #[test]
    fn flags_are_hidden_unless_asked() {
        let report = UpReport {
            identity: Identity::random(),
            connection_info: "nc 127.0.0.1 1".into(),
            flags: vec!["FLAG{a}".into()],
        };
        assert!(
            report
                .render(false)
                .ends_with("flags:           1 (hidden; --show-flags)")
        );
        assert!(!report.render(false).contains("FLAG{a}"));
        assert!(report.render(true).ends_with("flags:           FLAG{a}"));
    }
}

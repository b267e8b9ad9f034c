//! A scratch workspace for one Pulumi operation: a temporary directory laid
//! out as the CLI's local file backend expects, written directly instead of
//! through `pulumi stack init`, `config set` and `stack import` runs.
//!
//! ```text
//! <tmp>/Pulumi.yaml                          project: name, go runtime, binary ./main
//! <tmp>/main -> <cache>/.../main             the prebuilt program (symlink)
//! <tmp>/Pulumi.<stack>.yaml                  encryptionsalt + config
//! <tmp>/.pulumi/meta.yaml                    file backend layout version
//! <tmp>/.pulumi/stacks/<project>/<stack>.json  the stack state (checkpoint)
//! ```
//! The directory is removed when the workspace is dropped.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{DriverError, PreparedScenario, StackState};

/// One operation's working directory.
#[derive(Debug)]
pub(crate) struct Workspace {
    dir: tempfile::TempDir,
    project: String,
    stack: String,
    /// The program configuration written into the stack file.
    config: BTreeMap<String, String>,
}

impl Workspace {
    /// Lays out a workspace for `stack` of `scenario` with the given config,
    /// salt and (for an existing stack) checkpoint.
    pub(crate) async fn create(
        scratch_root: &Path,
        scenario: &PreparedScenario,
        stack: &str,
        salt_state: &str,
        config: &BTreeMap<String, String>,
        checkpoint: Option<&Value>,
    ) -> Result<Self, DriverError> {
        tokio::fs::create_dir_all(scratch_root)
            .await
            .map_err(DriverError::io("creating", scratch_root))?;
        let dir = tempfile::Builder::new()
            .prefix("ws-")
            .tempdir_in(scratch_root)
            .map_err(DriverError::io("creating a workspace in", scratch_root))?;
        let ws = Self {
            dir,
            project: scenario.project.clone(),
            stack: stack.to_owned(),
            config: config.clone(),
        };
        let root = ws.path().to_owned();

        let project_file = format!(
            "name: {}\nruntime:\n  name: go\n  options:\n    binary: ./main\n",
            ws.project
        );
        write(&root.join("Pulumi.yaml"), project_file.as_bytes()).await?;
        symlink(&scenario.binary, &root.join("main")).await?;

        let stack_file = StackFile {
            encryptionsalt: salt_state,
            config: config
                .iter()
                .map(|(k, v)| (format!("{}:{k}", ws.project), v.as_str()))
                .collect(),
        };
        let yaml = serde_yaml::to_string(&stack_file)
            .map_err(|e| DriverError::invalid(format!("config cannot be written: {e}")))?;
        write(&root.join(format!("Pulumi.{stack}.yaml")), yaml.as_bytes()).await?;

        write(&root.join(".pulumi/meta.yaml"), b"version: 1\n").await?;
        if let Some(checkpoint) = checkpoint {
            let bytes = serde_json::to_vec(checkpoint).map_err(|e| DriverError::StateCorrupt {
                reason: e.to_string(),
            })?;
            write(&ws.state_path(), &bytes).await?;
        }
        Ok(ws)
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the file backend keeps this stack's checkpoint.
    pub(crate) fn state_path(&self) -> PathBuf {
        self.path()
            .join(".pulumi/stacks")
            .join(&self.project)
            .join(format!("{}.json", self.stack))
    }

    /// Reads the checkpoint back after a run; `None` when the stack has none.
    pub(crate) async fn read_state(
        &self,
        salt_state: &str,
    ) -> Result<Option<StackState>, DriverError> {
        let path = self.state_path();
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DriverError::io("reading", path)(e)),
        };
        let checkpoint: Value =
            serde_json::from_slice(&bytes).map_err(|e| DriverError::StateCorrupt {
                reason: format!("the CLI left a checkpoint that is not JSON: {e}"),
            })?;
        Ok(Some(StackState {
            project: self.project.clone(),
            stack: self.stack.clone(),
            encryption_salt: salt_state.to_owned(),
            checkpoint,
            config: self.config.clone(),
            mid_up: false,
        }))
    }
}

#[derive(serde::Serialize)]
struct StackFile<'a> {
    encryptionsalt: &'a str,
    config: BTreeMap<String, &'a str>,
}

async fn write(path: &Path, bytes: &[u8]) -> Result<(), DriverError> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(DriverError::io("creating", parent))?;
    }
    tokio::fs::write(path, bytes)
        .await
        .map_err(DriverError::io("writing", path))
}

async fn symlink(target: &Path, link: &Path) -> Result<(), DriverError> {
    tokio::fs::symlink(target, link)
        .await
        .map_err(DriverError::io("linking the program into", link))
}

//! The `--oci-*` and scenario-size flags the API, the worker and the operator
//! CLI share; each flattens [`OciArgs`] into its own clap parser.

use std::path::PathBuf;

use super::{
    ClientConfig, Credentials,
    auth::{DockerConfigError, read_docker_config},
};
use crate::{Secret, archive::Limits};

/// How registries are reached, and how large a scenario may be.
#[derive(Debug, Clone, clap::Args)]
pub struct OciArgs {
    /// Registries (`host:port`, comma-separated) reached over plain HTTP
    /// instead of HTTPS. None by default: `localhost` is not implicitly insecure.
    #[arg(long, env = "CM_OCI_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub oci_insecure_registries: Vec<String>,

    /// Username offered to every registry that asks for credentials (as
    /// chall-manager's OCI_USERNAME); a docker config.json entry wins.
    #[arg(long, env = "CM_OCI_USERNAME")]
    pub oci_username: Option<String>,

    /// Password going with --oci-username.
    #[arg(long, env = "CM_OCI_PASSWORD", hide_env_values = true)]
    pub oci_password: Option<Secret<String>>,

    /// A docker `config.json` whose `auths` give credentials per registry.
    #[arg(long, env = "CM_OCI_DOCKER_CONFIG")]
    pub oci_docker_config: Option<PathBuf>,

    /// Largest file (or OCI layer) of a scenario, in bytes.
    #[arg(long, env = "CM_SCENARIO_MAX_FILE_SIZE", default_value_t = Limits::default().max_file)]
    pub scenario_max_file_size: u64,

    /// Largest scenario, all files together, in bytes.
    #[arg(long, env = "CM_SCENARIO_MAX_TOTAL_SIZE", default_value_t = Limits::default().max_total)]
    pub scenario_max_total_size: u64,
}

impl Default for OciArgs {
    fn default() -> Self {
        Self {
            oci_insecure_registries: Vec::new(),
            oci_username: None,
            oci_password: None,
            oci_docker_config: None,
            scenario_max_file_size: Limits::default().max_file,
            scenario_max_total_size: Limits::default().max_total,
        }
    }
}

impl OciArgs {
    /// The client configuration (reads the docker config.json when named).
    pub fn client_config(&self) -> Result<ClientConfig, DockerConfigError> {
        let per_registry = match &self.oci_docker_config {
            Some(path) => read_docker_config(path)?,
            None => Default::default(),
        };
        let credentials = self.oci_username.as_ref().map(|username| Credentials {
            username: username.clone(),
            password: self
                .oci_password
                .clone()
                .unwrap_or_else(|| Secret::new(String::new())),
        });
        Ok(ClientConfig {
            insecure_registries: self
                .oci_insecure_registries
                .iter()
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty())
                .collect(),
            credentials,
            per_registry,
            limits: self.limits(),
        })
    }

    /// The scenario size bounds.
    pub fn limits(&self) -> Limits {
        Limits {
            max_file: self.scenario_max_file_size,
            max_total: self.scenario_max_total_size,
            ..Limits::default()
        }
    }
}

//! Command-line/environment options every binary shares: where NATS and etcd
//! are, and how to authenticate to them and verify them (TLS).
//!
//! Each binary flattens [`ConnectArgs`] into its own clap parser, then calls
//! [`ConnectArgs::connection`], which checks the combination of flags and
//! reads the secret and certificate files, so a misconfiguration stops the
//! binary before it connects anywhere. The resulting [`Connection`] is the
//! one part of every binary's runtime configuration that says where NATS
//! and etcd are, and the one place that connects to them.
//! Secrets are [`Secret`]s: `--help` hides their environment values and no
//! `Debug` print shows them.

use std::path::{Path, PathBuf};

use crate::{
    Secret,
    nats::{NatsAuth, NatsOptions, NatsTls},
    store::{EtcdTls, StoreOptions},
};

/// Where the queue and the store are, and the credentials to use them.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// NATS server URL(s), comma-separated. `tls://` requires TLS. Do not put
    /// credentials in the URL: use the flags below.
    #[arg(long, env = "CM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// etcd endpoints, comma-separated (`https://` with --etcd-ca).
    #[arg(
        long,
        env = "CM_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// Prefix of every key this system writes in etcd.
    #[arg(long, env = "CM_ETCD_ROOT", default_value = "/cm")]
    pub etcd_root: String,

    /// Replicas of the JetStream streams and of the scenario bucket, applied
    /// when they are created: 1 on a single nats-server, 3 on a 3-node
    /// cluster (each survives the loss of one node). At most 5.
    #[arg(long, env = "CM_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// NATS authentication (one method) and TLS.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "NATS authentication and TLS")]
pub struct NatsArgs {
    /// NATS user name (with --nats-password or --nats-password-file).
    #[arg(long, env = "CM_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password of --nats-user.
    #[arg(long, env = "CM_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret<String>>,

    /// File holding the NATS password (first line).
    #[arg(long, env = "CM_NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<PathBuf>,

    /// NATS authorization token.
    #[arg(long, env = "CM_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret<String>>,

    /// File holding the NATS authorization token (first line).
    #[arg(long, env = "CM_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,

    /// File holding an nkey seed (`SU...`) whose public key the server lists.
    #[arg(long, env = "CM_NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,

    /// NATS `.creds` file (user JWT and nkey seed, operator mode).
    #[arg(long, env = "CM_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,

    /// CA bundle (PEM) that the NATS server certificate must chain to.
    #[arg(long, env = "CM_NATS_CA")]
    pub nats_ca: Option<PathBuf>,

    /// Client certificate (PEM) for NATS mutual TLS (with --nats-key).
    #[arg(long, env = "CM_NATS_CERT")]
    pub nats_cert: Option<PathBuf>,

    /// Private key (PEM) of --nats-cert.
    #[arg(long, env = "CM_NATS_KEY")]
    pub nats_key: Option<PathBuf>,

    /// Refuse to connect to a NATS server without TLS.
    #[arg(long, env = "CM_NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
}

/// etcd authentication and TLS.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "etcd authentication and TLS")]
pub struct EtcdArgs {
    /// etcd's space quota in bytes, as its `--quota-backend-bytes` sets it
    /// (etcd before 3.6 does not report it): the health check and the
    /// `cm_etcd_db_quota_bytes` gauge hold the database size against it.
    /// Default: etcd's own, 2 GiB.
    #[arg(long, env = "CM_ETCD_QUOTA_BYTES")]
    pub etcd_quota_bytes: Option<i64>,

    /// CA bundle (PEM) that the etcd server certificate must chain to
    /// (needed for `https://` endpoints).
    #[arg(long, env = "CM_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd mutual TLS (`--client-cert-auth`),
    /// with --etcd-key.
    #[arg(long, env = "CM_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "CM_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user (with --etcd-password or --etcd-password-file); the auth
    /// token is renewed by itself when etcd expires it.
    #[arg(long, env = "CM_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// etcd password of --etcd-user.
    #[arg(long, env = "CM_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<Secret<String>>,

    /// File holding the etcd password (first line).
    #[arg(long, env = "CM_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

/// Where a process serves its Prometheus `/metrics` apart from its main
/// port: an address, or `off` (any case) for nowhere. One parser for the
/// `--metrics-listen` flag of every binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.trim().eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        value
            .trim()
            .parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|_| format!("{value:?} is not an address (host:port) or `off`"))
    }
}

/// A combination of flags that cannot work, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Invalid(String),
}

/// Where the queue and the store are, how to reach them, and the queue's
/// settings: built once from [`ConnectArgs`] and embedded by the API's, the
/// worker's and the janitor's configurations.
#[derive(Debug, Clone)]
pub struct Connection {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// NATS authentication and TLS.
    pub nats: NatsOptions,
    /// etcd endpoints.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key this system writes in etcd.
    pub etcd_root: String,
    /// etcd authentication, TLS and quota.
    pub store: StoreOptions,
    /// Streams, consumer and retry settings.
    pub queue: crate::protocol::QueueConfig,
}

impl Connection {
    /// No authentication, no TLS, root `/cm`, the queue's defaults: the
    /// loopback servers of tests and the local stack.
    pub fn plain(nats_url: &str, etcd_endpoints: &[String]) -> Self {
        Self {
            nats_url: nats_url.to_owned(),
            nats: NatsOptions::default(),
            etcd_endpoints: etcd_endpoints.to_vec(),
            etcd_root: "/cm".into(),
            store: StoreOptions::default(),
            queue: crate::protocol::QueueConfig::default(),
        }
    }

    /// Connects to NATS as `name` (the client name the server shows).
    pub async fn nats(&self, name: &str) -> Result<async_nats::Client, crate::nats::NatsError> {
        crate::nats::connect(&self.nats_url, name, &self.nats).await
    }

    /// Connects to etcd under this deployment's root.
    pub async fn store(&self) -> Result<crate::store::Store, crate::store::StoreError> {
        crate::store::Store::connect(&self.etcd_endpoints, &self.etcd_root, &self.store).await
    }
}

impl ConnectArgs {
    /// Checks the flags, reads the files they name, and returns the
    /// connection they describe.
    pub fn connection(&self) -> Result<Connection, ConfigError> {
        Ok(Connection {
            nats_url: self.nats_url.clone(),
            nats: self.nats_options()?,
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_root: self.etcd_root.clone(),
            store: self.store_options()?,
            queue: self.queue_config(),
        })
    }

    /// The queue's defaults with this deployment's stream replicas.
    pub fn queue_config(&self) -> crate::protocol::QueueConfig {
        crate::protocol::QueueConfig {
            replicas: usize::from(self.stream_replicas),
            ..Default::default()
        }
    }

    /// The NATS authentication and TLS these flags ask for.
    pub fn nats_options(&self) -> Result<NatsOptions, ConfigError> {
        self.nats.options()
    }

    /// The etcd authentication and TLS these flags ask for.
    pub fn store_options(&self) -> Result<StoreOptions, ConfigError> {
        self.etcd.options(&self.etcd_endpoints)
    }
}

impl NatsArgs {
    /// Checks the flags and reads the secret files.
    pub fn options(&self) -> Result<NatsOptions, ConfigError> {
        let password = either(
            "--nats-password",
            "--nats-password-file",
            &self.nats_password,
            &self.nats_password_file,
        )?;
        let token = either(
            "--nats-token",
            "--nats-token-file",
            &self.nats_token,
            &self.nats_token_file,
        )?;
        let mut methods = Vec::new();
        if self.nats_user.is_some() || password.is_some() {
            methods.push("--nats-user/--nats-password");
        }
        if token.is_some() {
            methods.push("--nats-token");
        }
        if self.nats_nkey_seed_file.is_some() {
            methods.push("--nats-nkey-seed-file");
        }
        if self.nats_creds_file.is_some() {
            methods.push("--nats-creds-file");
        }
        if methods.len() > 1 {
            return Err(ConfigError::Invalid(format!(
                "give one NATS authentication method, not {}",
                methods.join(" and ")
            )));
        }
        let auth = match (&self.nats_user, password) {
            (Some(user), Some(password)) => NatsAuth::UserPassword {
                user: user.clone(),
                password,
            },
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "--nats-user needs --nats-password or --nats-password-file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--nats-password needs --nats-user".into(),
                ));
            }
            (None, None) => match (token, &self.nats_nkey_seed_file, &self.nats_creds_file) {
                (Some(token), _, _) => NatsAuth::Token(token),
                (None, Some(path), _) => {
                    NatsAuth::NkeySeed(read_secret("--nats-nkey-seed-file", path)?)
                }
                (None, None, Some(path)) => {
                    readable("--nats-creds-file", path)?;
                    NatsAuth::CredsFile(path.clone())
                }
                (None, None, None) => NatsAuth::None,
            },
        };
        let client_cert = pair("--nats-cert", &self.nats_cert, "--nats-key", &self.nats_key)?;
        if let Some(ca) = &self.nats_ca {
            readable("--nats-ca", ca)?;
        }
        if let Some((cert, key)) = &client_cert {
            readable("--nats-cert", cert)?;
            readable("--nats-key", key)?;
        }
        Ok(NatsOptions {
            auth,
            tls: NatsTls {
                ca: self.nats_ca.clone(),
                client_cert,
                required: self.nats_tls_required,
            },
        })
    }
}

impl EtcdArgs {
    /// Checks the flags against the `endpoints` and reads the files.
    pub fn options(&self, endpoints: &[String]) -> Result<StoreOptions, ConfigError> {
        let password = either(
            "--etcd-password",
            "--etcd-password-file",
            &self.etcd_password,
            &self.etcd_password_file,
        )?;
        let user = match (&self.etcd_user, password) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "--etcd-user needs --etcd-password or --etcd-password-file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--etcd-password needs --etcd-user".into(),
                ));
            }
        };
        let identity = pair("--etcd-cert", &self.etcd_cert, "--etcd-key", &self.etcd_key)?;
        let https = endpoints.iter().any(|e| e.starts_with("https://"));
        let tls = if self.etcd_ca.is_some() || identity.is_some() {
            if let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "etcd TLS is configured but the endpoint {plain} is http://; use https://"
                )));
            }
            let ca_pem = match &self.etcd_ca {
                Some(path) => Some(read_file("--etcd-ca", path)?),
                None => None,
            };
            let identity = match identity {
                Some((cert, key)) => Some((
                    read_file("--etcd-cert", &cert)?,
                    Secret::new(read_file("--etcd-key", &key)?),
                )),
                None => None,
            };
            Some(EtcdTls { ca_pem, identity })
        } else if https {
            return Err(ConfigError::Invalid(
                "an https:// etcd endpoint needs --etcd-ca (the CA its certificate chains to)"
                    .into(),
            ));
        } else {
            None
        };
        Ok(StoreOptions {
            user,
            tls,
            quota_bytes: self.etcd_quota_bytes,
        })
    }
}

/// A secret given inline or by file, not both.
fn either(
    flag: &'static str,
    file_flag: &'static str,
    inline: &Option<Secret<String>>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret<String>>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "give {flag} or {file_flag}, not both"
        ))),
        (Some(value), None) if value.expose().is_empty() => {
            Err(ConfigError::Invalid(format!("{flag} is empty")))
        }
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => read_secret(file_flag, path).map(Some),
        (None, None) => Ok(None),
    }
}

/// Both flags of a certificate/key pair, or neither.
fn pair(
    a_flag: &str,
    a: &Option<PathBuf>,
    b_flag: &str,
    b: &Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a.clone(), b.clone()))),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid(format!(
            "{a_flag} and {b_flag} go together"
        ))),
    }
}

pub fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    read_file(what, path).map(drop)
}

/// The first line of a secret file (`what` names it in errors), trimmed.
pub fn read_secret(what: &'static str, path: &Path) -> Result<Secret<String>, ConfigError> {
    let bytes = read_file(what, path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::Invalid(format!("{what} {} is not UTF-8 text", path.display()))
    })?;
    let first = text.lines().next().unwrap_or_default().trim().to_owned();
    if first.is_empty() {
        return Err(ConfigError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(first))
}

#[cfg(test)]
mod tests {

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        assert_eq!("off".parse::<MetricsListen>(), Ok(MetricsListen(None)));
        assert_eq!("OFF".parse::<MetricsListen>(), Ok(MetricsListen(None)));
        assert_eq!(
            "127.0.0.1:9464".parse::<MetricsListen>(),
            Ok(MetricsListen(Some(([127, 0, 0, 1], 9464).into())))
        );
        for bad in ["", "9464", "localhost:9464", "127.0.0.1", "of"] {
            let err = bad.parse::<MetricsListen>().expect_err(bad);
            assert!(err.contains("`off`"), "{bad}: {err}");
        }
    }

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    fn parse(args: &[&str]) -> ConnectArgs {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses").connect
    }

    #[test]
    fn no_flags_means_no_credentials() {
        let c = parse(&[]);
        assert!(matches!(c.nats_options().expect("ok").auth, NatsAuth::None));
        let store = c.store_options().expect("ok");
        assert!(store.user.is_none() && store.tls.is_none());
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2-from-file\n").expect("write");
        let c = parse(&[
            "--nats-user",
            "cm",
            "--nats-password-file",
            pw.to_str().expect("utf8"),
            "--etcd-user",
            "cm",
            "--etcd-password",
            "etcd-secret-pw",
        ]);
        let nats = c.nats_options().expect("ok");
        match &nats.auth {
            NatsAuth::UserPassword { user, password } => {
                assert_eq!(user, "cm");
                assert_eq!(password.expose(), "hunter2-from-file");
            }
            other => panic!("unexpected {other:?}"),
        }
        let store = c.store_options().expect("ok");
        let printed = format!("{c:?} {nats:?} {store:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("etcd-secret-pw"), "{printed}");
    }

    #[test]
    fn bad_combinations_are_refused() {
        let err = |args: &[&str]| {
            let c = parse(args);
            match (c.nats_options(), c.store_options()) {
                (Err(e), _) | (_, Err(e)) => e.to_string(),
                _ => panic!("accepted {args:?}"),
            }
        };
        assert!(err(&["--nats-user", "cm"]).contains("--nats-password"));
        assert!(err(&["--nats-password", "x"]).contains("--nats-user"));
        assert!(
            err(&[
                "--nats-user",
                "u",
                "--nats-password",
                "p",
                "--nats-token",
                "t"
            ])
            .contains("one NATS authentication method")
        );
        assert!(err(&["--nats-cert", "/c"]).contains("go together"));
        assert!(err(&["--nats-nkey-seed-file", "/nonexistent/seed"]).contains("/nonexistent/seed"));
        assert!(err(&["--etcd-user", "root"]).contains("--etcd-password"));
        assert!(err(&["--etcd-endpoints", "https://127.0.0.1:2379"]).contains("--etcd-ca"));
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        assert!(
            err(&["--etcd-ca", ca.to_str().expect("utf8")]).contains("use https://"),
            "TLS with the default http:// endpoint"
        );
    }
}

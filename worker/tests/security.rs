//! Authentication and TLS everywhere, against real servers started that way:
//! certificates generated here (rcgen), `nats-server` with TLS, client
//! certificates (`verify: true`), users with the documented subject
//! permissions and an nkey, `etcd` with TLS, `--client-cert-auth`, auth
//! enabled and 2-second auth tokens. The API runs from its real flags
//! (HTTPS, client certificates and bearer tokens), a worker process from its
//! real flags and environment. Then: the happy path, what is refused (and
//! that a refusal publishes and writes nothing), binaries that exit with a
//! clear error on bad credentials, the passphrase rule, and that a scenario
//! program sees none of the worker's credentials.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use cm_core::{
    Secret,
    nats::{NatsAuth, NatsError, NatsOptions, NatsTls},
    store::{EtcdTls, Store, StoreOptions},
};
use cm_testkit::{
    pki::Pki,
    server::{self, Server},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    },
};

/// Simple etcd auth tokens expire after this many idle seconds.
const ETCD_TOKEN_TTL: u32 = 2;

/// Subject permissions, as README's Security section documents them.
const API_PERMISSIONS: &str = r#"{
  publish: ["cm.cmd.>", "$JS.API.>", "_INBOX.>"]
  subscribe: ["cm.api.>", "$SRV.>", "_INBOX.>", "_CM_REPLY.>"]
}"#;
const WORKER_PERMISSIONS: &str = r#"{
  publish: ["cm.cmd.>", "cm.evt.>", "cm.dlq.>", "$JS.API.>", "$JS.ACK.CM_COMMANDS.>", "_CM_REPLY.>", "$O.cm-stack-states.>"]
  subscribe: ["_INBOX.>"]
}"#;
const JANITOR_PERMISSIONS: &str = r#"{
  publish: ["cm.cmd.>", "$JS.API.>", "$O.cm-stack-states.>"]
  subscribe: ["_INBOX.>"]
}"#;
const PLATFORM_PERMISSIONS: &str = r#"{
  publish: ["cm.api.>"]
  subscribe: ["_INBOX.>"]
}"#;

fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The secured servers and every credential of the test.
struct Secure {
    pki: Pki,
    nats: Server,
    etcd: Server,
    worker_password: String,
    janitor_password: String,
    platform_password: String,
    admin_password: String,
    api_seed_file: PathBuf,
    etcd_password: String,
    etcd_password_file: PathBuf,
    api_token: String,
    api_token_file: PathBuf,
}

impl Secure {
    async fn start() -> Self {
        let pki = Pki::generate();
        let dir = pki.dir().to_owned();
        let api_key = nkeys::KeyPair::new_user();
        let api_seed_file = dir.join("api.nk");
        std::fs::write(&api_seed_file, api_key.seed().expect("seed")).expect("write seed");
        let (worker_password, janitor_password, platform_password, admin_password) = (
            random_secret(),
            random_secret(),
            random_secret(),
            random_secret(),
        );
        let config = format!(
            r#"
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca}"
  verify: true
  timeout: 5
}}
authorization {{
  users: [
    {{ nkey: "{api}", permissions: {API_PERMISSIONS} }}
    {{ user: "cm-worker", password: "{worker_password}", permissions: {WORKER_PERMISSIONS} }}
    {{ user: "cm-janitor", password: "{janitor_password}", permissions: {JANITOR_PERMISSIONS} }}
    {{ user: "platform", password: "{platform_password}", permissions: {PLATFORM_PERMISSIONS} }}
    {{ user: "admin", password: "{admin_password}" }}
  ]
}}
"#,
            cert = path_str(&pki.server_cert),
            key = path_str(&pki.server_key),
            ca = path_str(&pki.ca),
            api = api_key.public_key(),
        );
        let nats = server::nats_configured(&config, true);
        let etcd = server::etcd_tls(&pki, true, ETCD_TOKEN_TTL);
        let etcd_password = random_secret();
        enable_etcd_auth(&etcd.url, &pki, &etcd_password).await;
        let etcd_password_file = dir.join("etcd-password");
        std::fs::write(&etcd_password_file, format!("{etcd_password}\n")).expect("write");
        let api_token = random_secret();
        let api_token_file = dir.join("api-tokens");
        std::fs::write(
            &api_token_file,
            format!(
                "# tokens of the platform\n{api_token}\n\nother-token-{}\n",
                random_secret()
            ),
        )
        .expect("write");
        Self {
            pki,
            nats,
            etcd,
            worker_password,
            janitor_password,
            platform_password,
            admin_password,
            api_seed_file,
            etcd_password,
            etcd_password_file,
            api_token,
            api_token_file,
        }
    }

    fn nats_tls(&self) -> NatsTls {
        NatsTls {
            ca: Some(self.pki.ca.clone()),
            client_cert: Some((self.pki.client_cert.clone(), self.pki.client_key.clone())),
            required: true,
        }
    }

    async fn nats_as(&self, user: &str, password: &str) -> Result<async_nats::Client, NatsError> {
        let options = NatsOptions {
            auth: NatsAuth::UserPassword {
                user: user.into(),
                password: Secret::new(password.into()),
            },
            tls: self.nats_tls(),
        };
        cm_core::nats::connect(&self.nats.url, "test", &options).await
    }

    async fn admin_nats(&self) -> async_nats::Client {
        self.nats_as("admin", &self.admin_password)
            .await
            .expect("admin connects")
    }

    fn store_options(&self) -> StoreOptions {
        StoreOptions {
            user: Some(("cm".into(), Secret::new(self.etcd_password.clone()))),
            tls: Some(EtcdTls {
                ca_pem: Some(std::fs::read(&self.pki.ca).expect("ca")),
                identity: Some((
                    std::fs::read(&self.pki.client_cert).expect("cert"),
                    Secret::new(std::fs::read(&self.pki.client_key).expect("key")),
                )),
            }),
            quota_bytes: None,
        }
    }

    async fn store(&self) -> Store {
        Store::connect(
            std::slice::from_ref(&self.etcd.url),
            "/cm",
            &self.store_options(),
        )
        .await
        .expect("store as cm")
    }

    /// `--nats-*` and `--etcd-*` flags with certificates, without credentials.
    fn tls_flags(&self) -> Vec<String> {
        [
            "--nats-url",
            &self.nats.url,
            "--nats-ca",
            &path_str(&self.pki.ca),
            "--nats-cert",
            &path_str(&self.pki.client_cert),
            "--nats-key",
            &path_str(&self.pki.client_key),
            "--nats-tls-required",
            "--etcd-endpoints",
            &self.etcd.url,
            "--etcd-ca",
            &path_str(&self.pki.ca),
            "--etcd-cert",
            &path_str(&self.pki.client_cert),
            "--etcd-key",
            &path_str(&self.pki.client_key),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// The API's configuration from its real command line.
    fn api_cli(&self) -> cm_api::cli::Cli {
        let mut args = vec!["cm-api".to_owned()];
        args.extend(self.tls_flags());
        args.extend(
            [
                "--nats-nkey-seed-file",
                &path_str(&self.api_seed_file),
                "--etcd-user",
                "cm",
                "--etcd-password-file",
                &path_str(&self.etcd_password_file),
                "--auth-token-file",
                &path_str(&self.api_token_file),
                "--tls-cert",
                &path_str(&self.pki.server_cert),
                "--tls-key",
                &path_str(&self.pki.server_key),
                "--tls-client-ca",
                &path_str(&self.pki.ca),
                "--result-timeout",
                "120s",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        cm_api::cli::Cli::try_parse_from(args).expect("API flags parse")
    }

    /// A `cm-worker run` command with the given NATS password, the etcd
    /// password and the passphrase in its environment (plus canaries), and
    /// the TLS flags but those named in `without` (each with its value).
    fn worker_command(&self, nats_password: &str, cache: &Path, without: &[&str]) -> Command {
        let mut flags = Vec::new();
        let mut tls = self.tls_flags().into_iter();
        while let Some(flag) = tls.next() {
            if without.contains(&flag.as_str()) {
                tls.next();
            } else {
                flags.push(flag);
            }
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cm-worker"));
        cmd.arg("run")
            .args(flags)
            .args(["--nats-user", "cm-worker", "--etcd-user", "cm"])
            .args(["--metrics-listen", "off", "--ack-wait", "10s"])
            .arg("--scenarios-dir")
            .arg(cm_testkit::workspace_root().join("examples"))
            .env("CM_NATS_PASSWORD", nats_password)
            .env("CM_ETCD_PASSWORD", &self.etcd_password)
            .env("PULUMI_CONFIG_PASSPHRASE", "security-test-passphrase")
            .env("CM_AUTH_TOKEN", &self.api_token)
            .env("CM_CANARY_SECRET", "canary")
            .env("AWS_SECRET_ACCESS_KEY", "canary")
            .env("CM_PULUMI", cm_testkit::pulumi())
            .env("CM_WORKER_CACHE_DIR", cache)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }
}

/// Turns etcd's authentication on: `root`, and a user `cm` whose role may
/// read and write under `/cm` only. (etcd takes a request that carries no
/// token as coming from the user named by its client certificate's CN; the
/// test certificate's CN, `cm-client`, is no user, so it grants nothing.)
async fn enable_etcd_auth(url: &str, pki: &Pki, password: &str) {
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(
            std::fs::read(&pki.ca).expect("ca"),
        ))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&pki.client_cert).expect("cert"),
            std::fs::read(&pki.client_key).expect("key"),
        ));
    let mut client = etcd_client::Client::connect(
        [url],
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .expect("etcd over TLS");
    client
        .user_add("root", random_secret(), None)
        .await
        .expect("add root");
    client
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    client.role_add("cm").await.expect("add role");
    client
        .role_grant_permission(
            "cm",
            etcd_client::Permission::read_write("/cm").with_prefix(),
        )
        .await
        .expect("grant /cm");
    client.user_add("cm", password, None).await.expect("add cm");
    client.user_grant_role("cm", "cm").await.expect("grant cm");
    client.auth_enable().await.expect("auth enable");
}

/// A rustls client trusting the test CA, with or without a certificate.
fn tls_client(pki: &Pki, cert: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca).expect("ca") {
        roots.add(c.expect("ca pem")).expect("add ca");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
    let config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("cert")
                    .map(|c| c.expect("cert pem"))
                    .collect(),
                PrivateKeyDer::from_pem_file(key).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// What an HTTPS request got: the status, the headers and the JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: String,
    body: Value,
}

/// One HTTP/1.1 request over TLS. `Err` when no HTTP answer came (e.g. the
/// handshake was refused).
async fn https(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    let sent = async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body.as_bytes()).await?;
        tls.flush().await
    };
    sent.await.map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {headers}"))?;
    let payload = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_owned()
    };
    Ok(Answer {
        status,
        headers: headers.to_owned(),
        body: serde_json::from_str(&payload).unwrap_or(Value::String(payload)),
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The last sequence of the commands stream: it grows with every publish.
async fn commands_published(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream(cm_core::queue::COMMANDS_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .last_sequence
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits for `child` to exit (at most `limit`); its status and stderr.
fn wait_exit(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            return (status, stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("still running after {limit:?} (a hang, not an exit):\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_stack_end_to_end() {
    let secure = Secure::start().await;
    let admin = secure.admin_nats().await;
    let js = async_nats::jetstream::new(admin.clone());
    let store = secure.store().await;

    // The API, from its real flags: HTTPS, client certificates, tokens,
    // nkey to NATS, password and certificate to etcd.
    let cli = secure.api_cli();
    let config = cli.config().expect("API config");
    assert!(!format!("{config:?}").contains(&secure.api_token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(cm_api::run(config, listener, async {
        let _ = stopped.await;
    }));

    // One worker process, credentials in its environment.
    let (_cache_guard, cache) = cm_testkit::worker_cache();
    let logs = tempfile::tempdir().expect("tempdir");
    let log_path = logs.path().join("worker.log");
    let mut worker = secure.worker_command(&secure.worker_password, &cache, &[]);
    worker
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"));
    let _worker = KillOnDrop(worker.spawn().expect("spawn cm-worker"));

    let with_cert = tls_client(
        &secure.pki,
        Some((&secure.pki.client_cert, &secure.pki.client_key)),
    );
    let token = Some(secure.api_token.as_str());

    // /healthcheck is open (with a client certificate: mTLS still applies).
    let mut healthy = false;
    for _ in 0..200 {
        if let Ok(a) = https(with_cert.clone(), addr, "GET", "/healthcheck", None, None).await
            && a.status == 200
        {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "API not healthy");

    // Wait for the worker to ensure the streams and its consumer.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(mut stream) = js.get_stream(cm_core::queue::COMMANDS_STREAM).await
                && stream
                    .info()
                    .await
                    .is_ok_and(|i| i.state.consumer_count > 0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("worker never consumed:\n{}", read_log(&log_path)));

    // Without a token, with a wrong one: 401 in the API's error shape, and
    // nothing published or written.
    let published = commands_published(&js).await;
    let sneaky = json!({"id": "sneaky", "scenario": "env-names"});
    for bad in [None, Some("not-the-token-0123456789")] {
        let a = https(
            with_cert.clone(),
            addr,
            "POST",
            "/api/v1/challenge",
            bad,
            Some(&sneaky),
        )
        .await
        .expect("an HTTP answer");
        assert_eq!(a.status, 401, "{a:?}");
        assert_eq!(a.body["code"], 16, "{a:?}");
        assert!(a.body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(a.body["details"], json!([]));
        assert!(
            a.headers
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{a:?}"
        );
    }
    let a = https(
        with_cert.clone(),
        addr,
        "GET",
        "/api/v1/challenge/sneaky",
        None,
        None,
    )
    .await
    .expect("answer");
    assert_eq!(a.status, 401, "reads need the token too: {a:?}");
    let a = https(with_cert.clone(), addr, "GET", "/metrics", None, None)
        .await
        .expect("answer");
    assert_eq!(a.status, 401, "/metrics is behind the same auth: {a:?}");
    assert_eq!(
        commands_published(&js).await,
        published,
        "a refused request published a command"
    );
    assert!(
        store.get_challenge("sneaky").await.expect("read").is_none(),
        "a refused request wrote to etcd"
    );

    // Without a client certificate, or with one from another CA: refused
    // during the handshake, no HTTP answer at all.
    let no_cert = tls_client(&secure.pki, None);
    let rogue = tls_client(
        &secure.pki,
        Some((&secure.pki.rogue_cert, &secure.pki.rogue_key)),
    );
    for client in [no_cert, rogue] {
        let refused = https(client, addr, "GET", "/healthcheck", token, None).await;
        assert!(
            refused.is_err(),
            "served without a valid client certificate: {refused:?}"
        );
    }

    // The happy path: a challenge and an instance through HTTPS + token.
    let a = https(
        with_cert.clone(),
        addr,
        "POST",
        "/api/v1/challenge",
        token,
        Some(&json!({"id": "env", "scenario": "env-names", "timeout": "600s"})),
    )
    .await
    .expect("answer");
    assert_eq!(a.status, 200, "{a:?}\n{}", read_log(&log_path));
    let a = https(
        with_cert.clone(),
        addr,
        "POST",
        "/api/v1/instance",
        token,
        Some(&json!({"challengeId": "env", "sourceId": "team-1"})),
    )
    .await
    .expect("answer");
    assert_eq!(a.status, 200, "{a:?}\n{}", read_log(&log_path));

    // The scenario program's environment: none of the worker's credentials,
    // no CM_* variable of the worker, no passphrase.
    let names: Vec<&str> = a.body["connectionInfo"]
        .as_str()
        .expect("connectionInfo")
        .split(',')
        .collect();
    assert!(names.contains(&"PULUMI_PROJECT"), "{names:?}");
    for leaked in [
        "CM_NATS_PASSWORD",
        "CM_ETCD_PASSWORD",
        "CM_AUTH_TOKEN",
        "CM_CANARY_SECRET",
        "AWS_SECRET_ACCESS_KEY",
        "PULUMI_CONFIG_PASSPHRASE",
        "PULUMI_CONFIG_PASSPHRASE_FILE",
        "CM_PULUMI",
        "CM_WORKER_CACHE_DIR",
        "RUST_LOG",
    ] {
        assert!(
            !names.contains(&leaked),
            "{leaked} reached the scenario: {names:?}"
        );
    }
    let cm_vars: Vec<&&str> = names.iter().filter(|n| n.starts_with("CM_")).collect();
    assert!(
        cm_vars
            .iter()
            .all(|n| ["CM_PROJECT", "CM_PULUMI_GO_BINARY"].contains(n)),
        "worker variables reached the scenario: {cm_vars:?}"
    );
    assert!(
        names.contains(&"CM_PROJECT"),
        "chall-manager's CM_PROJECT is set"
    );

    // The record is there for whoever holds the etcd credentials.
    assert!(
        store
            .get_instance("env", "team-1")
            .await
            .expect("read")
            .is_some()
    );

    // etcd auth tokens expire while everything idles; the API and the worker
    // authenticate again by themselves.
    tokio::time::sleep(Duration::from_secs(u64::from(ETCD_TOKEN_TTL) * 3)).await;
    let a = https(
        with_cert.clone(),
        addr,
        "POST",
        "/api/v1/instance",
        token,
        Some(&json!({"challengeId": "env", "sourceId": "team-2"})),
    )
    .await
    .expect("answer");
    assert_eq!(
        a.status,
        200,
        "after token expiry: {a:?}\n{}",
        read_log(&log_path)
    );
    let a = https(with_cert.clone(), addr, "GET", "/metrics", token, None)
        .await
        .expect("answer");
    assert_eq!(a.status, 200);
    assert!(
        a.body
            .as_str()
            .is_some_and(|m| m.contains("# TYPE challenges gauge")),
        "{a:?}"
    );

    // The NATS front door with a platform user limited to `cm.api.>`: its
    // requests are served, a direct command publish is denied by NATS.
    let platform = secure
        .nats_as("platform", &secure.platform_password)
        .await
        .expect("platform connects");
    let reply = platform
        .request(
            "cm.api.challenge.get",
            json!({"id": "env"}).to_string().into(),
        )
        .await
        .expect("service answers the platform");
    let got: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(got["id"], "env", "{got}");
    let published = commands_published(&js).await;
    platform
        .publish("cm.cmd.challenge.delete.env", "forged".into())
        .await
        .expect("publish call");
    platform.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        commands_published(&js).await,
        published,
        "NATS let the platform user publish a command"
    );

    // Secrets never reached the worker's log.
    let log = read_log(&log_path);
    for secret in [
        &secure.worker_password,
        &secure.etcd_password,
        &secure.api_token,
        &"security-test-passphrase".to_owned(),
    ] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret is in the worker's log"
        );
    }
    assert!(!log.contains("invalid auth token"), "{log}");

    let _ = stop.send(());
    api.await.expect("API task").expect("API ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_end_the_binaries_with_a_clear_error() {
    let secure = Secure::start().await;
    let (_cache_guard, cache) = cm_testkit::worker_cache();
    let limit = Duration::from_secs(30);
    let run = |cmd: &mut Command| {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        wait_exit(child, limit)
    };

    // Wrong NATS password.
    let wrong = random_secret();
    let (status, stderr) = run(&mut secure.worker_command(&wrong, &cache, &[]));
    assert!(!status.success());
    assert!(
        stderr.contains("refused the credentials") && stderr.contains("--nats-password"),
        "{stderr}"
    );
    assert!(!stderr.contains(&wrong), "the password is in the error");

    // No client certificate for NATS (the server verifies clients).
    let (status, stderr) = run(&mut secure.worker_command(
        &secure.worker_password,
        &cache,
        &["--nats-cert", "--nats-key"],
    ));
    assert!(!status.success());
    assert!(stderr.contains("NATS"), "{stderr}");
    assert!(
        stderr.to_ascii_lowercase().contains("certificate"),
        "the error names the missing certificate: {stderr}"
    );

    // etcd: no client certificate, then a wrong password.
    let (status, stderr) = run(&mut secure.worker_command(
        &secure.worker_password,
        &cache,
        &["--etcd-cert", "--etcd-key"],
    ));
    assert!(!status.success());
    assert!(stderr.contains("cannot use etcd at https://"), "{stderr}");
    assert!(
        stderr.contains("--etcd-cert/--etcd-key"),
        "the error names the client certificate: {stderr}"
    );

    let mut cmd = secure.worker_command(&secure.worker_password, &cache, &[]);
    let wrong_etcd = random_secret();
    cmd.env("CM_ETCD_PASSWORD", &wrong_etcd);
    let (status, stderr) = run(&mut cmd);
    assert!(!status.success());
    assert!(
        stderr.contains("cannot use etcd") && stderr.contains("authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains(&wrong_etcd));

    // The API with an nkey the server does not know: an error, at once.
    let mut cli = secure.api_cli();
    let unknown = secure.pki.dir().join("unknown.nk");
    std::fs::write(&unknown, nkeys::KeyPair::new_user().seed().expect("seed")).expect("write");
    cli.connect.nats.nats_nkey_seed_file = Some(unknown);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ran = tokio::time::timeout(
        limit,
        cm_api::run(
            cli.config().expect("config"),
            listener,
            std::future::pending(),
        ),
    )
    .await
    .expect("the API gave up at once");
    let e = ran.expect_err("unknown nkey refused");
    assert!(e.to_string().contains("--nats-nkey-seed-file"), "{e}");

    // The janitor with a wrong password gives up instead of retrying forever.
    let janitor = cm_janitor::JanitorConfig {
        connection: cm_core::config::Connection {
            nats_url: secure.nats.url.clone(),
            nats: NatsOptions {
                auth: NatsAuth::UserPassword {
                    user: "cm-janitor".into(),
                    password: Secret::new(random_secret()),
                },
                tls: secure.nats_tls(),
            },
            etcd_endpoints: vec![secure.etcd.url.clone()],
            etcd_root: "/cm".into(),
            store: secure.store_options(),
            queue: Default::default(),
        },
        interval: Duration::from_secs(1),
        once: true,
        batch: 10,
        metrics_listen: None,
        state_sweep: None,
        orphan_sweep: None,
        pool_review: None,
    };
    let ran = tokio::time::timeout(
        limit,
        cm_janitor::run(janitor.clone(), std::future::pending()),
    )
    .await
    .expect("the janitor gave up at once");
    assert!(ran.is_err());
    // ...and with the right one, it ticks.
    let janitor = cm_janitor::JanitorConfig {
        connection: cm_core::config::Connection {
            nats: NatsOptions {
                auth: NatsAuth::UserPassword {
                    user: "cm-janitor".into(),
                    password: Secret::new(secure.janitor_password.clone()),
                },
                tls: secure.nats_tls(),
            },
            ..janitor.connection.clone()
        },
        ..janitor
    };
    tokio::time::timeout(limit, cm_janitor::run(janitor, std::future::pending()))
        .await
        .expect("janitor tick")
        .expect("janitor with its permissions");
}

#[test]
fn the_worker_refuses_to_start_without_a_passphrase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let base = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cm-worker"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .args([
                "run",
                "--nats-url",
                "nats://127.0.0.1:1",
                "--metrics-listen",
                "off",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let run = |mut cmd: Command| wait_exit(cmd.spawn().expect("spawn"), Duration::from_secs(20));

    // Nothing configured; an empty CM_PULUMI_PASSPHRASE; an empty file.
    let mut empty_env = base();
    empty_env.env("CM_PULUMI_PASSPHRASE", "");
    let mut empty_file = base();
    empty_file.arg("--pulumi-passphrase-file").arg(&empty);
    let mut empty_pulumi_file = base();
    empty_pulumi_file.env("PULUMI_CONFIG_PASSPHRASE_FILE", &empty);
    for (cmd, expected) in [
        (base(), "no Pulumi passphrase configured"),
        (empty_env, "no Pulumi passphrase configured"),
        (empty_file, "is empty"),
        (empty_pulumi_file, "is empty"),
    ] {
        let (status, stderr) = run(cmd);
        assert!(!status.success());
        assert!(stderr.contains(expected), "{stderr}");
    }

    // With --dev, or with a passphrase file, the passphrase is accepted and
    // the worker goes on (to fail on the NATS server that is not there).
    let file = dir.path().join("passphrase");
    std::fs::write(&file, "a-long-passphrase\n").expect("write");
    let mut dev = base();
    dev.arg("--dev");
    let mut with_file = base();
    with_file.arg("--pulumi-passphrase-file").arg(&file);
    let mut pulumi_var = base();
    pulumi_var.env("PULUMI_CONFIG_PASSPHRASE", "a-long-passphrase");
    for cmd in [dev, with_file, pulumi_var] {
        let (status, stderr) = run(cmd);
        assert!(!status.success());
        assert!(
            !stderr.contains("no Pulumi passphrase") && !stderr.contains("is empty"),
            "{stderr}"
        );
        assert!(
            stderr.contains("cannot connect to NATS") || stderr.contains("pulumi"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_token_authentication() {
    let token = random_secret();
    let nats = server::nats_configured(&format!("authorization {{ token: \"{token}\" }}"), false);
    let with = |t: &str| NatsOptions {
        auth: NatsAuth::Token(Secret::new(t.to_owned())),
        tls: NatsTls::default(),
    };
    let client = cm_core::nats::connect(&nats.url, "t", &with(&token))
        .await
        .expect("token accepted");
    client.flush().await.expect("flush");
    let started = Instant::now();
    let e = cm_core::nats::connect(&nats.url, "t", &with("wrong-token-0123456789"))
        .await
        .expect_err("wrong token refused");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusal took {:?}",
        started.elapsed()
    );
    assert!(
        e.is_permanent() && e.to_string().contains("--nats-token"),
        "{e}"
    );
    let e = cm_core::nats::connect(&nats.url, "t", &NatsOptions::default())
        .await
        .expect_err("no credentials refused");
    assert!(
        e.to_string().contains("the server wants credentials"),
        "{e}"
    );
    // TLS required, plain-text server: refused.
    let required = NatsOptions {
        tls: NatsTls {
            required: true,
            ..NatsTls::default()
        },
        ..with(&token)
    };
    let e = cm_core::nats::connect(&nats.url, "t", &required)
        .await
        .expect_err("TLS required");
    assert!(e.is_permanent(), "{e}");
}

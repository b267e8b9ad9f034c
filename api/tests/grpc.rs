//! chall-manager's gRPC API against the real stack: a tonic client generated
//! from our `api.v1` protos (chall-manager's names and field numbers) drives
//! every method of `ChallengeStore` and `InstanceManager` on the API's one
//! listener, with real nats-server, etcd, an in-process worker and the real
//! Pulumi CLI. Errors are checked as statuses (code, message, `google.rpc`
//! details decoded from `grpc-status-details-bin`) against what REST answers
//! for the same case; streams are read to their end. Also: bearer tokens in
//! metadata, the open health service, reflection, and the server span
//! continuing the caller's `traceparent`.

use std::{path::PathBuf, sync::OnceLock, time::Duration};

use cm_api::auth::ApiAuth;
use cm_core::Secret;
use cm_schemas::{
    api::v1::{
        challenge::{self as pbc, challenge_store_client::ChallengeStoreClient as Challenges},
        instance::{self as pbi, instance_manager_client::InstanceManagerClient as Instances},
    },
    pbjson_types::{Duration as PbDuration, Empty},
    tonic::{self, Code, Request, Status, transport::Channel},
    wkt::FieldMask,
};
use cm_testkit::server::{self, Server};
use tonic_types::{ErrorDetail, StatusExt};

const TOKEN: &str = "grpc-test-token-0123456789";

/// A compiled-scenario cache shared by every test of this binary.
fn shared_cache() -> PathBuf {
    static CACHE: OnceLock<(Option<tempfile::TempDir>, PathBuf)> = OnceLock::new();
    CACHE.get_or_init(cm_testkit::worker_cache).1.clone()
}

struct Stack {
    _nats: Server,
    _etcd: Server,
    /// `http://127.0.0.1:<port>`: REST and gRPC alike.
    url: String,
    /// Plain HTTP/2 to the API (none when it serves TLS).
    channel: Option<Channel>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stack {
    /// nats + etcd + the API (configured by `configure`) + a worker when
    /// `worker` is set.
    async fn start(worker: bool, configure: impl FnOnce(&mut cm_api::ApiConfig)) -> Self {
        let nats = server::nats();
        let etcd = server::etcd();
        let mut stop = Vec::new();
        let mut tasks = Vec::new();
        if worker {
            let config = cm_worker::WorkerConfig {
                connection: cm_core::config::Connection::plain(
                    &nats.url,
                    std::slice::from_ref(&etcd.url),
                ),
                concurrency: 4,
                pulumi_runs: 0,
                scenarios_dir: cm_testkit::workspace_root().join("examples"),
                oci: Default::default(),
                driver: cm_worker::pulumi::DriverConfig {
                    pulumi: cm_testkit::pulumi(),
                    go: cm_testkit::go(),
                    cache_dir: shared_cache(),
                    passphrase: Secret::new("grpc-test-passphrase".into()),
                    niceness: cm_worker::pulumi::DEFAULT_NICENESS,
                },
                lock_timeout: Duration::from_secs(60),
                quota: Default::default(),
                lease_ttl: 10,
                checkpoint_interval: std::time::Duration::ZERO,
                shutdown_grace: Duration::from_secs(5),
                metrics_listen: None,
                pools: Default::default(),
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop.push(tx);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = cm_worker::run(config, async {
                    let _ = rx.await;
                })
                .await
                {
                    panic!("worker failed: {e}");
                }
            }));
        }
        let mut config = cm_api::ApiConfig {
            connection: cm_core::config::Connection::plain(
                &nats.url,
                std::slice::from_ref(&etcd.url),
            ),
            result_timeout: Duration::from_secs(120),
            nats_service: false,
            oci: Default::default(),
            max_upload: cm_api::DEFAULT_MAX_UPLOAD,
            auth: ApiAuth::open(),
            tls: None,
            metrics_listen: None,
        };
        configure(&mut config);
        let tls = config.tls.is_some();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stop.push(tx);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = cm_api::run(config, listener, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("API failed: {e}");
            }
        }));
        let mut channel = None;
        if !tls {
            cm_testkit::wait::healthy(&reqwest::Client::new(), &url, Duration::from_secs(10))
                .await
                .expect("API healthy");
            channel = Some(
                Channel::from_shared(url.clone())
                    .expect("url")
                    .connect()
                    .await
                    .expect("gRPC connects (HTTP/2 without TLS)"),
            );
        }
        Self {
            _nats: nats,
            _etcd: etcd,
            url,
            channel,
            stop,
            tasks,
        }
    }

    fn channel(&self) -> Channel {
        self.channel.clone().expect("a plain-HTTP/2 API")
    }

    fn challenges(&self) -> Challenges<Channel> {
        Challenges::new(self.channel())
    }

    fn instances(&self) -> Instances<Channel> {
        Instances::new(self.channel())
    }

    /// REST's answer to `GET path` (HTTP/1.1 on the same port): status, body.
    async fn rest_get(&self, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new().get(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("REST answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    async fn stop(mut self) {
        for tx in self.stop.drain(..).rev() {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..).rev() {
            let _ = task.await;
        }
    }
}

/// The `ErrorInfo` reason of a status, and its other detail kinds in order.
fn reason_and_kinds(status: &Status) -> (String, Vec<&'static str>) {
    let details = status.check_error_details_vec().expect("details decode");
    let mut reason = String::new();
    let kinds = details
        .iter()
        .map(|d| match d {
            ErrorDetail::ErrorInfo(i) => {
                assert!(i.domain.starts_with("github.com/ctfer-io/chall-manager"));
                reason = i.reason.clone();
                "ErrorInfo"
            }
            ErrorDetail::ResourceInfo(_) => "ResourceInfo",
            ErrorDetail::PreconditionFailure(_) => "PreconditionFailure",
            ErrorDetail::BadRequest(_) => "BadRequest",
            ErrorDetail::Help(_) => "Help",
            _ => "other",
        })
        .collect();
    (reason, kinds)
}

/// `status` is `code` with `reason`, and says what REST says for the same
/// case (`rest`: its error body): code, message, the same detail types.
fn assert_status(status: &Status, code: Code, reason: &str, rest: Option<&serde_json::Value>) {
    assert_eq!(status.code(), code, "{status:?}");
    let (got, kinds) = reason_and_kinds(status);
    assert_eq!(got, reason, "{status:?}");
    if let Some(rest) = rest {
        assert_eq!(rest["code"], code as i32, "REST: {rest}");
        assert_eq!(rest["message"], status.message(), "REST: {rest}");
        let rest_kinds: Vec<String> = rest["details"]
            .as_array()
            .expect("details")
            .iter()
            .map(|d| {
                d["@type"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("type.googleapis.com/google.rpc.")
                    .to_owned()
            })
            .collect();
        assert_eq!(rest_kinds, kinds, "the same details as REST");
    }
}

async fn collect<T>(mut stream: tonic::Streaming<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(item) = stream.message().await.expect("stream item") {
        out.push(item);
    }
    out
}

fn secs(s: i64) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: s,
        nanos: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_with_its_errors_and_streams() {
    let stack = Stack::start(true, |_| {}).await;
    let mut challenges = stack.challenges();
    let mut instances = stack.instances();

    // ---- challenges ---------------------------------------------------------
    let missing = challenges
        .retrieve_challenge(pbc::RetrieveChallengeRequest { id: "nope".into() })
        .await
        .expect_err("no such challenge");
    let (_, rest) = stack.rest_get("/api/v1/challenge/nope", None).await;
    assert_status(&missing, Code::NotFound, "CHALLENGE_NOT_FOUND", Some(&rest));
    let details = missing.get_error_details();
    assert_eq!(
        details.resource_info().map(|r| r.resource_name.as_str()),
        Some("nope")
    );

    let mut additional = std::collections::HashMap::new();
    additional.insert("k".to_owned(), "v".to_owned());
    let created = challenges
        .create_challenge(pbc::CreateChallengeRequest {
            id: "g1".into(),
            scenario: "identity".into(),
            timeout: secs(600),
            additional: additional.clone(),
            ..Default::default()
        })
        .await
        .expect("create challenge")
        .into_inner();
    assert_eq!(created.id, "g1");
    assert_eq!(created.scenario, "identity");
    assert_eq!(created.timeout, secs(600));
    assert_eq!(created.additional, additional);
    assert!(created.instances.is_empty());
    // The same record, read by REST (HTTP/1.1 on the same port).
    let (status, rest) = stack.rest_get("/api/v1/challenge/g1", None).await;
    assert_eq!(status, 200);
    assert_eq!(rest["timeout"], "600s");
    // And by REST over HTTP/2 (the gRPC connection, without gRPC's
    // content type).
    let over_h2 = tower::ServiceExt::oneshot(
        stack.channel(),
        http::Request::get(format!("{}/api/v1/challenge/g1", stack.url))
            .body(tonic::body::Body::default())
            .expect("request"),
    )
    .await
    .expect("REST over HTTP/2");
    assert_eq!(over_h2.status(), 200);
    assert_eq!(over_h2.version(), http::Version::HTTP_2);
    assert_eq!(
        over_h2.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );

    let again = challenges
        .create_challenge(pbc::CreateChallengeRequest {
            id: "g1".into(),
            scenario: "identity".into(),
            ..Default::default()
        })
        .await
        .expect_err("already exists");
    assert_status(
        &again,
        Code::AlreadyExists,
        "CHALLENGE_ALREADY_EXISTS",
        None,
    );
    assert_eq!(
        reason_and_kinds(&again).1,
        ["ErrorInfo", "ResourceInfo"],
        "chall-manager's details"
    );

    let out_of_bounds = challenges
        .create_challenge(pbc::CreateChallengeRequest {
            id: "g9".into(),
            scenario: "identity".into(),
            min: -1,
            ..Default::default()
        })
        .await
        .expect_err("negative pool");
    assert_status(
        &out_of_bounds,
        Code::InvalidArgument,
        "CHALLENGE_POOLER_OUT_OF_BOUNDS",
        None,
    );
    let violations = out_of_bounds.get_error_details();
    let fields: Vec<&str> = violations
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["min"]);

    let retrieved = challenges
        .retrieve_challenge(pbc::RetrieveChallengeRequest { id: "g1".into() })
        .await
        .expect("retrieve")
        .into_inner();
    assert_eq!(retrieved, created);

    // Only `timeout` is in the mask: the additional map is kept.
    let updated = challenges
        .update_challenge(pbc::UpdateChallengeRequest {
            id: "g1".into(),
            timeout: secs(1200),
            update_mask: Some(FieldMask {
                paths: vec!["timeout".into()],
            }),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.timeout, secs(1200));
    assert_eq!(updated.additional, additional);

    let bad_mask = challenges
        .update_challenge(pbc::UpdateChallengeRequest {
            id: "g1".into(),
            update_mask: Some(FieldMask {
                paths: vec!["nope".into()],
            }),
            ..Default::default()
        })
        .await
        .expect_err("unknown mask path");
    assert_status(
        &bad_mask,
        Code::InvalidArgument,
        "CHALLENGE_INVALID_UPDATE_MASK",
        None,
    );
    assert_eq!(
        reason_and_kinds(&bad_mask).1,
        ["ErrorInfo", "BadRequest", "Help"]
    );

    // A challenge without timeout, for the renewal refusal.
    challenges
        .create_challenge(pbc::CreateChallengeRequest {
            id: "g2".into(),
            scenario: "identity".into(),
            ..Default::default()
        })
        .await
        .expect("create g2");
    let listed = collect(
        challenges
            .query_challenge(Empty {})
            .await
            .expect("query")
            .into_inner(),
    )
    .await;
    let mut ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["g1", "g2"], "one message per challenge");

    // ---- instances ----------------------------------------------------------
    let instance = instances
        .create_instance(pbi::CreateInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
            ..Default::default()
        })
        .await
        .expect("create instance")
        .into_inner();
    assert_eq!(
        (instance.challenge_id.as_str(), instance.source_id.as_str()),
        ("g1", "s1")
    );
    assert!(!instance.connection_info.is_empty());
    assert_eq!(instance.flags.len(), 1, "{instance:?}");
    assert_eq!(instance.flag.as_ref(), instance.flags.first());
    assert!(instance.since.is_some() && instance.until.is_some());

    let twice = instances
        .create_instance(pbi::CreateInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
            ..Default::default()
        })
        .await
        .expect_err("one instance per source");
    assert_status(&twice, Code::AlreadyExists, "INSTANCE_ALREADY_EXISTS", None);

    let retrieved = instances
        .retrieve_instance(pbi::RetrieveInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
        })
        .await
        .expect("retrieve instance")
        .into_inner();
    assert_eq!(retrieved.since, instance.since);
    assert_eq!(retrieved.flags, instance.flags);

    let of_s1 = collect(
        instances
            .query_instance(pbi::QueryInstanceRequest {
                source_id: "s1".into(),
            })
            .await
            .expect("query instances")
            .into_inner(),
    )
    .await;
    assert_eq!(of_s1.len(), 1);
    assert_eq!(of_s1[0].challenge_id, "g1");
    let of_nobody = collect(
        instances
            .query_instance(pbi::QueryInstanceRequest::default())
            .await
            .expect("query without source")
            .into_inner(),
    )
    .await;
    assert!(of_nobody.is_empty(), "no source: an empty stream");
    // Retrieving the challenge lists its instance.
    let with_instance = challenges
        .retrieve_challenge(pbc::RetrieveChallengeRequest { id: "g1".into() })
        .await
        .expect("retrieve")
        .into_inner();
    assert_eq!(with_instance.instances.len(), 1);

    let renewed = instances
        .renew_instance(pbi::RenewInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
        })
        .await
        .expect("renew")
        .into_inner();
    let seconds = |t: &Option<cm_schemas::wkt::Timestamp>| t.as_ref().map_or(0, |t| t.seconds);
    assert!(seconds(&renewed.last_renew) >= seconds(&instance.last_renew));
    // The update raised the timeout to 1200 s: renewing applies it.
    assert!(
        seconds(&renewed.until) >= seconds(&renewed.last_renew) + 1199,
        "{renewed:?}"
    );

    instances
        .create_instance(pbi::CreateInstanceRequest {
            challenge_id: "g2".into(),
            source_id: "s1".into(),
            ..Default::default()
        })
        .await
        .expect("create g2 instance");
    let refused = instances
        .renew_instance(pbi::RenewInstanceRequest {
            challenge_id: "g2".into(),
            source_id: "s1".into(),
        })
        .await
        .expect_err("no timeout: no renewal");
    assert_status(
        &refused,
        Code::FailedPrecondition,
        "CHALLENGE_NO_RENEWAL",
        None,
    );
    assert_eq!(
        reason_and_kinds(&refused).1,
        ["ErrorInfo", "PreconditionFailure"]
    );

    instances
        .delete_instance(pbi::DeleteInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
            force: false,
        })
        .await
        .expect("delete instance");
    let gone = instances
        .retrieve_instance(pbi::RetrieveInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
        })
        .await
        .expect_err("deleted");
    let (_, rest) = stack.rest_get("/api/v1/instance/g1/s1", None).await;
    assert_status(&gone, Code::NotFound, "INSTANCE_NOT_FOUND", Some(&rest));
    let gone = instances
        .delete_instance(pbi::DeleteInstanceRequest {
            challenge_id: "g1".into(),
            source_id: "s1".into(),
            force: false,
        })
        .await
        .expect_err("already deleted");
    assert_status(&gone, Code::NotFound, "INSTANCE_NOT_FOUND", None);

    // Deleting a challenge deletes its instances.
    for id in ["g1", "g2"] {
        challenges
            .delete_challenge(pbc::DeleteChallengeRequest { id: id.into() })
            .await
            .expect("delete challenge");
    }
    let none = collect(
        challenges
            .query_challenge(Empty {})
            .await
            .expect("query")
            .into_inner(),
    )
    .await;
    assert!(none.is_empty(), "{none:?}");
    let gone = challenges
        .delete_challenge(pbc::DeleteChallengeRequest { id: "g1".into() })
        .await
        .expect_err("deleted");
    assert_status(&gone, Code::NotFound, "CHALLENGE_NOT_FOUND", None);
    let of_s1 = collect(
        instances
            .query_instance(pbi::QueryInstanceRequest {
                source_id: "s1".into(),
            })
            .await
            .expect("query")
            .into_inner(),
    )
    .await;
    assert!(of_s1.is_empty());

    // Invalid ids are refused before anything is published.
    let invalid = instances
        .create_instance(pbi::CreateInstanceRequest {
            challenge_id: "a/b".into(),
            source_id: "s".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid id");
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_every_service_but_health() {
    let stack = Stack::start(false, |c| {
        c.auth = ApiAuth::tokens([&Secret::new(TOKEN.to_owned())]).expect("token");
    })
    .await;
    let with = |token: Option<&str>| {
        let mut request = Request::new(pbc::RetrieveChallengeRequest { id: "nope".into() });
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("metadata"),
            );
        }
        request
    };
    let mut challenges = stack.challenges();
    let (_, rest) = stack.rest_get("/api/v1/challenge/nope", None).await;
    for token in [None, Some("wrong-token-0123456789")] {
        let refused = challenges
            .retrieve_challenge(with(token))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(rest["code"], 16);
        if token.is_none() {
            assert_eq!(refused.message(), rest["message"], "REST's message");
        }
    }
    let refused = stack
        .instances()
        .query_instance(pbi::QueryInstanceRequest {
            source_id: "s".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
    // The token lets the call through to the store.
    let missing = challenges
        .retrieve_challenge(with(Some(TOKEN)))
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // Health is open, like /healthcheck; it reads the store.
    let mut health = tonic_health::pb::health_client::HealthClient::new(stack.channel());
    for service in [
        "",
        "api.v1.challenge.ChallengeStore",
        "api.v1.instance.InstanceManager",
    ] {
        let mut serving = false;
        for _ in 0..50 {
            let answer = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if answer.is_ok_and(|a| a.into_inner().status == 1) {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(serving, "{service:?} is SERVING");
    }

    // Reflection needs the token, then lists the services.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let list = || {
        futures::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let mut reflection = ServerReflectionClient::new(stack.channel());
    let refused = match reflection.server_reflection_info(list()).await {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("refused without token"),
    };
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut request = Request::new(list());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("metadata"),
    );
    let mut answers = reflection
        .server_reflection_info(request)
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(services)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = services.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "api.v1.challenge.ChallengeStore",
        "api.v1.instance.InstanceManager",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_continues_the_callers_trace_and_a_slow_write_names_its_operation() {
    use opentelemetry::trace::TraceId;
    use opentelemetry_sdk::trace::{InMemorySpanExporterBuilder, SdkTracerProvider};
    let exporter = InMemorySpanExporterBuilder::new().build();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = cm_core::telemetry::install("grpc-trace-test", Some(provider.clone()));

    // No worker: a write waits out the (short) result timeout.
    let stack = Stack::start(false, |c| c.result_timeout = Duration::from_millis(500)).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut request = Request::new(pbc::CreateChallengeRequest {
        id: "slow".into(),
        scenario: "identity".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().expect("metadata"),
    );
    let slow = stack
        .challenges()
        .create_challenge(request)
        .await
        .expect_err("no worker answers");
    assert_eq!(slow.code(), Code::DeadlineExceeded, "{slow:?}");
    assert!(
        slow.message().contains("/api/v1/operation/"),
        "names the operation to poll: {}",
        slow.message()
    );
    // REST's request span continues a `traceparent` header the same way.
    let rest_parent = "a0f067aa0ba902b7";
    let answer = reqwest::Client::new()
        .get(format!("{}/api/v1/challenge/nope", stack.url))
        .header("traceparent", format!("00-{trace}-{rest_parent}-01"))
        .send()
        .await
        .expect("REST");
    assert_eq!(answer.status(), 404);
    stack.stop().await;

    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().expect("spans");
    // Other tests of this binary run meanwhile (their spans are exported
    // too): the spans of this one are those in the caller's trace.
    let trace = TraceId::from_hex(trace).expect("hex");
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.span_context.trace_id() == trace)
            .unwrap_or_else(|| {
                panic!(
                    "no span {name:?} in the caller's trace: {:?}",
                    spans
                        .iter()
                        .map(|s| (&s.name, s.span_context.trace_id()))
                        .collect::<Vec<_>>()
                )
            })
    };
    let call = find("api.v1.challenge.ChallengeStore/CreateChallenge");
    assert_eq!(call.parent_span_id.to_string(), parent);
    assert!(
        call.attributes
            .iter()
            .any(|kv| kv.key.as_str() == "rpc.grpc.status_code" && kv.value.as_str() == "4"),
        "{:?}",
        call.attributes
    );
    let publish = find("publish cm.cmd.challenge.create");
    assert_eq!(publish.parent_span_id, call.span_context.span_id());
    let rest = find("GET /api/v1/challenge/{id}");
    assert_eq!(rest.parent_span_id.to_string(), rest_parent);
}

/// A gRPC channel over TLS to `addr` (ALPN `h2`), with `client` as TLS
/// configuration.
async fn tls_channel(
    addr: std::net::SocketAddr,
    mut client: tokio_rustls::rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    client.alpn_protocols = vec![b"h2".to_vec()];
    let client = std::sync::Arc::new(client);
    let connector = tower::service_fn(move |_: http::Uri| {
        let client = client.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_static("http://127.0.0.1")
        .connect_with_connector(connector)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_grpc_and_refuses_a_client_without_certificate() {
    use tokio_rustls::rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let pki = cm_testkit::pki::Pki::generate();
    let tls = cm_api::tls::server_config(&pki.server_cert, &pki.server_key, Some(&pki.ca))
        .expect("server TLS");
    let stack = Stack::start(false, |c| c.tls = Some(tls)).await;
    let addr: std::net::SocketAddr = stack
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let client = |with_cert: bool| {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca).expect("ca") {
            roots.add(c.expect("ca pem")).expect("add ca");
        }
        let builder = ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        if with_cert {
            builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&pki.client_cert)
                        .expect("cert")
                        .map(|c| c.expect("cert pem"))
                        .collect(),
                    PrivateKeyDer::from_pem_file(&pki.client_key).expect("key"),
                )
                .expect("client cert")
        } else {
            builder.with_no_client_auth()
        }
    };

    // Without a certificate: no call gets through (the handshake, or the
    // first read after it under TLS 1.3, fails).
    let refused = match tls_channel(addr, client(false)).await {
        Err(_) => true,
        Ok(channel) => Challenges::new(channel)
            .retrieve_challenge(pbc::RetrieveChallengeRequest { id: "x".into() })
            .await
            .is_err_and(|s| s.code() != Code::NotFound),
    };
    assert!(refused, "a client without certificate is refused");

    // With one: the call reaches the store (HTTP/2 negotiated by ALPN).
    let channel = tls_channel(addr, client(true))
        .await
        .expect("mTLS connects");
    let missing = Challenges::new(channel)
        .retrieve_challenge(pbc::RetrieveChallengeRequest { id: "x".into() })
        .await
        .expect_err("no such challenge");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(reason_and_kinds(&missing).0, "CHALLENGE_NOT_FOUND");
    stack.stop().await;
}

//! The gRPC front door: chall-manager's `api.v1.challenge.ChallengeStore` and
//! `api.v1.instance.InstanceManager`, served on the REST listener (see
//! [`crate::front_door`]), plus the standard health service
//! (`grpc.health.v1.Health`) and server reflection (`grpc.reflection.v1`,
//! `v1alpha`) so `grpcurl` and Kubernetes gRPC probes work.
//!
//! Each method converts chall-manager's message (its field numbers) into
//! ours and calls the same [`App`] operation as REST and NATS: the same
//! validation, the same command submission, the same reads. Writes always
//! wait for the worker's result (a gRPC answer is the resource itself, there
//! is no `202`); past the result timeout they answer `DEADLINE_EXCEEDED`
//! naming the operation. Errors are [`crate::error::grpc_status`]: the code,
//! message and `google.rpc` details REST sends, as a binary
//! `google.rpc.Status` in `grpc-status-details-bin`.
//!
//! Authentication is REST's: the bearer token in the `authorization`
//! metadata (checked before the call is decoded), mutual TLS at the
//! handshake. The health service alone stays open, like `/healthcheck`.
//! Every call runs in a server span named `package.Service/Method` that
//! continues the caller's `traceparent`.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use cm_core::DomainError;
use cm_schemas::{
    api::v1::{
        challenge::{
            self as pb_challenge,
            challenge_store_server::{ChallengeStore, ChallengeStoreServer},
        },
        instance::{
            self as pb_instance,
            instance_manager_server::{InstanceManager, InstanceManagerServer},
        },
    },
    v1::{self, Code, Requester},
};
use futures::stream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, server::NamedService};
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};

use crate::{
    auth::ApiAuth,
    error::grpc_status,
    ops::{App, Mode},
};

/// The gRPC service names, as health checks and reflection list them.
pub const SERVICES: [&str; 2] = [
    <ChallengeStoreServer<Grpc> as NamedService>::NAME,
    <InstanceManagerServer<Grpc> as NamedService>::NAME,
];

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// How often the health service re-reads the store's health.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The gRPC services of [`App`].
#[derive(Debug, Clone)]
pub struct Grpc(pub App);

/// A server stream of already-read items.
pub type ItemStream<T> = stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

/// The gRPC routes (challenge, instance, health and reflection services),
/// behind `auth` but for health, each call in its server span.
pub fn router(app: App, auth: ApiAuth, health: HealthServer<impl Health>) -> axum::Router {
    // Our protos, health's, and google.rpc's error details (so a client
    // can decode the details of a status by reflection).
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cm_schemas::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = described().build_v1();
    let reflection_v1alpha = described().build_v1alpha();
    let mut routes = tonic::service::Routes::new(ChallengeStoreServer::new(Grpc(app.clone())))
        .add_service(InstanceManagerServer::new(Grpc(app)))
        .add_service(health);
    // A descriptor set that does not parse is a build defect: serve without
    // reflection rather than not at all.
    match (reflection_v1, reflection_v1alpha) {
        (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "gRPC reflection unavailable");
        }
    }
    routes
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(auth, require_token))
        .layer(
            tower_http::trace::TraceLayer::new_for_grpc()
                .make_span_with(server_span)
                .on_response(|res: &Response, _: Duration, span: &tracing::Span| {
                    // Trailers-only answers (errors) carry the status here.
                    if let Some(code) = res.headers().get("grpc-status") {
                        span.record("rpc.grpc.status_code", code.to_str().unwrap_or("?"));
                    }
                })
                .on_eos(
                    |trailers: Option<&http::HeaderMap>, _: Duration, span: &tracing::Span| {
                        if let Some(code) = trailers.and_then(|t| t.get("grpc-status")) {
                            span.record("rpc.grpc.status_code", code.to_str().unwrap_or("?"));
                        }
                    },
                )
                .on_failure(()),
        )
}

/// `true` for a gRPC request (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The server span of a call: `package.Service/Method`, continuing the
/// caller's W3C trace context (`traceparent`, `tracestate`).
fn server_span(req: &http::Request<Body>) -> tracing::Span {
    let path = req.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc request",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(&span, req.headers());
    span
}

/// REST's token check, answered as a gRPC `UNAUTHENTICATED` status with
/// REST's details; the health service is let through.
async fn require_token(State(auth): State<ApiAuth>, request: Request, next: Next) -> Response {
    if request.uri().path().starts_with(HEALTH_PREFIX) {
        return next.run(request).await;
    }
    match auth.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(why) => {
            tracing::info!(reason = why, "gRPC call refused: unauthenticated");
            grpc_status(&DomainError::new(Code::Unauthenticated, why))
                .into_http::<Body>()
                .into_response()
        }
    }
}

/// Keeps the health service's answers current: every service `SERVING`
/// while the store answers, `NOT_SERVING` otherwise, until `shutdown`.
pub async fn report_health(app: App, reporter: HealthReporter, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let status = if app.store_healthy().await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in std::iter::once("").chain(SERVICES) {
            reporter.set_service_status(service, status).await;
        }
    }
}

/// Who asks: the gRPC front door, with the caller's `idempotency-key`
/// metadata (the REST header's twin; checked where it is used).
fn who(metadata: &tonic::metadata::MetadataMap) -> Requester {
    Requester {
        principal: String::new(),
        via: "grpc".into(),
        idempotency_key: metadata
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
    }
}

fn fail(e: DomainError) -> Status {
    grpc_status(&e)
}

fn items<T, U>(list: Vec<T>, convert: fn(T) -> U) -> tonic::Response<ItemStream<U>> {
    let items: Vec<Result<U, Status>> = list.into_iter().map(|v| Ok(convert(v))).collect();
    tonic::Response::new(stream::iter(items))
}

#[tonic::async_trait]
impl ChallengeStore for Grpc {
    async fn create_challenge(
        &self,
        request: tonic::Request<pb_challenge::CreateChallengeRequest>,
    ) -> Result<tonic::Response<pb_challenge::Challenge>, Status> {
        let who = who(request.metadata());
        let req = create_request(request.into_inner());
        let done = self
            .0
            .create_challenge(req, who, Mode::Wait)
            .await
            .and_then(|r| r.done())
            .map_err(fail)?;
        Ok(tonic::Response::new(challenge(done)))
    }

    async fn retrieve_challenge(
        &self,
        request: tonic::Request<pb_challenge::RetrieveChallengeRequest>,
    ) -> Result<tonic::Response<pb_challenge::Challenge>, Status> {
        let found = self
            .0
            .get_challenge(&request.get_ref().id)
            .await
            .map_err(fail)?;
        Ok(tonic::Response::new(challenge(found)))
    }

    type QueryChallengeStream = ItemStream<pb_challenge::Challenge>;

    async fn query_challenge(
        &self,
        _: tonic::Request<pbjson_types::Empty>,
    ) -> Result<tonic::Response<Self::QueryChallengeStream>, Status> {
        Ok(items(
            self.0.list_challenges().await.map_err(fail)?,
            challenge,
        ))
    }

    async fn update_challenge(
        &self,
        request: tonic::Request<pb_challenge::UpdateChallengeRequest>,
    ) -> Result<tonic::Response<pb_challenge::Challenge>, Status> {
        let who = who(request.metadata());
        let req = update_request(request.into_inner());
        let done = self
            .0
            .update_challenge(req, who, Mode::Wait)
            .await
            .and_then(|r| r.done())
            .map_err(fail)?;
        Ok(tonic::Response::new(challenge(done)))
    }

    async fn delete_challenge(
        &self,
        request: tonic::Request<pb_challenge::DeleteChallengeRequest>,
    ) -> Result<tonic::Response<pbjson_types::Empty>, Status> {
        let who = who(request.metadata());
        self.0
            .delete_challenge(request.into_inner().id, who, Mode::Wait)
            .await
            .and_then(|r| r.done())
            .map_err(fail)?;
        Ok(tonic::Response::new(pbjson_types::Empty {}))
    }
}

#[tonic::async_trait]
impl InstanceManager for Grpc {
    async fn create_instance(
        &self,
        request: tonic::Request<pb_instance::CreateInstanceRequest>,
    ) -> Result<tonic::Response<pb_instance::Instance>, Status> {
        let who = who(request.metadata());
        let r = request.into_inner();
        let req = v1::CreateInstanceRequest {
            challenge_id: r.challenge_id,
            source_id: r.source_id,
            additional: r.additional,
        };
        let done = self
            .0
            .create_instance(req, who, Mode::Wait)
            .await
            .and_then(|r| r.done())
            .map_err(fail)?;
        Ok(tonic::Response::new(instance(done)))
    }

    async fn retrieve_instance(
        &self,
        request: tonic::Request<pb_instance::RetrieveInstanceRequest>,
    ) -> Result<tonic::Response<pb_instance::Instance>, Status> {
        let r = request.get_ref();
        let found = self
            .0
            .get_instance(&r.challenge_id, &r.source_id)
            .await
            .map_err(fail)?;
        Ok(tonic::Response::new(instance(found)))
    }

    type QueryInstanceStream = ItemStream<pb_instance::Instance>;

    async fn query_instance(
        &self,
        request: tonic::Request<pb_instance::QueryInstanceRequest>,
    ) -> Result<tonic::Response<Self::QueryInstanceStream>, Status> {
        let list = self
            .0
            .list_instances(&request.get_ref().source_id)
            .await
            .map_err(fail)?;
        Ok(items(list, instance))
    }

    async fn renew_instance(
        &self,
        request: tonic::Request<pb_instance::RenewInstanceRequest>,
    ) -> Result<tonic::Response<pb_instance::Instance>, Status> {
        let who = who(request.metadata());
        let r = request.into_inner();
        let done = self
            .0
            .renew_instance(r.challenge_id, r.source_id, who, Mode::Wait)
            .await
            .and_then(|r| r.done())
            .map_err(fail)?;
        Ok(tonic::Response::new(instance(done)))
    }

    async fn delete_instance(
        &self,
        request: tonic::Request<pb_instance::DeleteInstanceRequest>,
    ) -> Result<tonic::Response<pbjson_types::Empty>, Status> {
        let who = who(request.metadata());
        let r = request.into_inner();
        let req = v1::DeleteInstanceRequest {
            challenge_id: r.challenge_id,
            source_id: r.source_id,
            force: r.force,
        };
        self.0
            .delete_instance(req, who, Mode::Wait)
            .await
            .and_then(|r| r.done())
            .map_err(fail)?;
        Ok(tonic::Response::new(pbjson_types::Empty {}))
    }
}

// ---- chall-manager's messages <-> ours (same fields, other numbers) --------

fn create_request(r: pb_challenge::CreateChallengeRequest) -> v1::CreateChallengeRequest {
    v1::CreateChallengeRequest {
        id: r.id,
        scenario: r.scenario,
        timeout: r.timeout,
        until: r.until,
        additional: r.additional,
        min: r.min,
        max: r.max,
        update_strategy: None,
        max_per_source: r.max_per_source,
        pool: r.pool,
    }
}

/// chall-manager's `min` and `max` have no presence: the update mask says
/// whether they are set. Without a mask (or an empty one), the mask is made
/// of the fields the message sets (non-zero numbers, a non-empty map), as
/// REST makes it of the JSON members present.
fn update_request(r: pb_challenge::UpdateChallengeRequest) -> v1::UpdateChallengeRequest {
    let paths = match r.update_mask {
        Some(mask) if !mask.paths.is_empty() => mask.paths,
        _ => [
            ("scenario", r.scenario.is_some()),
            ("timeout", r.timeout.is_some()),
            ("until", r.until.is_some()),
            ("additional", !r.additional.is_empty()),
            ("min", r.min != 0),
            ("max", r.max != 0),
            ("max_per_source", r.max_per_source.is_some()),
            ("pool", r.pool.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(path, _)| path.to_owned())
        .collect(),
    };
    let named = |field: &str| paths.iter().any(|p| p == field);
    v1::UpdateChallengeRequest {
        min: named("min").then_some(r.min),
        max: named("max").then_some(r.max),
        id: r.id,
        scenario: r.scenario,
        timeout: r.timeout,
        until: r.until,
        update_strategy: r.update_strategy,
        additional: r.additional,
        max_per_source: r.max_per_source,
        pool: r.pool,
        update_mask: Some(cm_schemas::wkt::FieldMask { paths }),
    }
}

fn challenge(c: v1::Challenge) -> pb_challenge::Challenge {
    pb_challenge::Challenge {
        id: c.id,
        scenario: c.scenario,
        timeout: c.timeout,
        until: c.until,
        instances: c.instances.into_iter().map(instance).collect(),
        additional: c.additional,
        min: c.min,
        max: c.max,
        max_per_source: c.max_per_source,
        pool: c.pool,
    }
}

fn instance(i: v1::Instance) -> pb_instance::Instance {
    pb_instance::Instance {
        challenge_id: i.challenge_id,
        source_id: i.source_id,
        since: i.since,
        last_renew: i.last_renew,
        until: i.until,
        connection_info: i.connection_info,
        flag: i.flag,
        additional: i.additional,
        flags: i.flags,
    }
}

/// Routes each request of the shared listener: gRPC (by content type) to
/// the gRPC router, anything else to REST.
#[derive(Debug, Clone)]
pub struct ByContentType {
    pub rest: axum::Router,
    pub grpc: axum::Router,
}

impl tower::Service<Request> for ByContentType {
    type Response = Response;
    type Error = Infallible;
    type Future = <axum::Router as tower::Service<Request>>::Future;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Routers are always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if is_grpc(&request) {
            self.grpc.call(request)
        } else {
            self.rest.call(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_without_mask_names_what_it_sets() {
        let req = update_request(pb_challenge::UpdateChallengeRequest {
            id: "c".into(),
            min: 2,
            scenario: Some("s".into()),
            ..Default::default()
        });
        let paths = req.update_mask.expect("mask").paths;
        assert_eq!(paths, ["scenario", "min"]);
        assert_eq!(req.min, Some(2));
        assert_eq!(req.max, None);
    }

    #[test]
    fn a_masked_zero_is_set() {
        let req = update_request(pb_challenge::UpdateChallengeRequest {
            id: "c".into(),
            update_mask: Some(cm_schemas::wkt::FieldMask {
                paths: vec!["max".into()],
            }),
            min: 3,
            ..Default::default()
        });
        assert_eq!(req.max, Some(0), "the mask names max: 0 is the value");
        assert_eq!(req.min, None, "min is not in the mask");
    }
}

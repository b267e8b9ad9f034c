//! The REST front door: chall-manager's `/api/v1/challenge` and
//! `/api/v1/instance` routes (grpc-gateway JSON), plus
//! `/api/v1/operation/{id}` and `/healthcheck`.
//!
//! Every route but `/healthcheck` requires the API's credentials (see
//! [`crate::auth`]); `/healthcheck` stays open for load balancers and probes
//! and says only whether etcd answers.
//!
//! Writes wait for the worker's result; with `Prefer: respond-async` they
//! answer `202 Accepted` with the operation to poll. A write that outlives the
//! result timeout answers `504` naming that operation. A write with an
//! `Idempotency-Key` header is the same command as every retry with that key
//! (see `submit`): one effect, one answer.

use axum::{
    Router,
    body::Body,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use cm_core::DomainError;
use cm_schemas::v1::{
    CreateChallengeRequest, CreateInstanceRequest, DeleteInstanceRequest, Requester,
    UpdateChallengeRequest,
};
use serde::{Deserialize, Serialize};

use crate::{
    auth::{ApiAuth, require_token},
    error::ApiError,
    json::{MAX_BODY, ProtoJson, to_value, to_values, top_level_fields},
    ops::{App, Mode, Reply, still_running},
};

/// The REST router. Every route but `/healthcheck` sits behind `auth`;
/// `/metrics` is served too when `metrics` is set (behind `auth` as well).
pub fn router(app: App, auth: ApiAuth, metrics: bool) -> Router {
    let mut protected = Router::new()
        .route(
            "/api/v1/challenge",
            get(list_challenges).post(create_challenge),
        )
        .route(
            "/api/v1/challenge/{id}",
            get(get_challenge)
                .patch(update_challenge)
                .delete(delete_challenge),
        )
        .route(
            "/api/v1/instance",
            get(list_instances).post(create_instance),
        )
        .route(
            "/api/v1/instance/{challenge_id}/{source_id}",
            get(get_instance)
                .patch(renew_instance)
                .delete(delete_instance),
        )
        .route(
            "/api/v1/instance/{challenge_id}/{source_id}/reset",
            axum::routing::post(reset_instance),
        )
        .route("/api/v1/operation/{id}", get(get_operation))
        .route(
            "/api/v1/scenario",
            axum::routing::post(upload_scenario)
                .layer(DefaultBodyLimit::max(app.scenarios.max_upload)),
        );
    if metrics {
        protected = protected.merge(cm_core::metrics::router());
    }
    // The token check runs before any extractor: an unauthenticated request
    // is answered 401 before its body is read, so nothing is published.
    let protected = protected.layer(axum::middleware::from_fn_with_state(auth, require_token));
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<Body>| {
                    let route = req
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("unmatched", |p| p.as_str())
                        .to_owned();
                    let span = tracing::info_span!(
                        "request",
                        otel.name = %format!("{} {route}", req.method()),
                        otel.kind = "server",
                        http.request.method = %req.method(),
                        http.route = %route,
                    );
                    crate::telemetry::continue_trace(&span, req.headers());
                    span
                },
            ),
        )
        .with_state(app)
}

fn requester(headers: &HeaderMap) -> Requester {
    Requester {
        principal: String::new(),
        via: "rest".into(),
        // Checked where it is used (`ops`): a malformed key is a 400.
        idempotency_key: headers
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
    }
}

fn mode(headers: &HeaderMap) -> Mode {
    Mode::from_prefer(
        headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(_) => ApiError(DomainError::internal_error()).into_response(),
    }
}

fn reply(reply: Reply<serde_json::Value>, mode: Mode) -> Response {
    match reply {
        Reply::Done(value) => json_response(StatusCode::OK, &value),
        Reply::Accepted { operation_id } if mode == Mode::Async => {
            let mut resp = json_response(
                StatusCode::ACCEPTED,
                &serde_json::json!({"operationId": operation_id, "state": "PENDING"}),
            );
            if let Ok(location) =
                HeaderValue::from_str(&format!("/api/v1/operation/{operation_id}"))
            {
                resp.headers_mut().insert(header::LOCATION, location);
            }
            resp
        }
        Reply::Accepted { operation_id } => ApiError(still_running(&operation_id)).into_response(),
    }
}

/// One `{"result": ...}` JSON object per line, as grpc-gateway streams.
fn stream_lines<T: Serialize>(items: &[T]) -> Response {
    let mut body = Vec::new();
    for item in items {
        if serde_json::to_writer(&mut body, &serde_json::json!({ "result": item })).is_err() {
            return ApiError(DomainError::internal_error()).into_response();
        }
        body.push(b'\n');
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// 200 while the store answers and has room; 503 when etcd is away or has
/// raised its NOSPACE alarm (it refuses every write: see the runbook,
/// `CmEtcdOutOfSpace`). The body reports etcd's size against its quota
/// (`null` when etcd does not tell this API's user).
async fn healthcheck(State(app): State<App>) -> Response {
    if !app.store_healthy().await {
        return ApiError(DomainError::unavailable("the store is unavailable")).into_response();
    }
    let space = app.store_space().await;
    if let Some(space) = space.as_ref().filter(|s| s.out_of_space()) {
        return ApiError(DomainError::unavailable(format!(
            "etcd is out of space (NOSPACE alarm, {} of {} bytes): it refuses every write; \
             compact, defragment and disarm it (runbook: CmEtcdOutOfSpace)",
            space.db_size, space.quota
        )))
        .into_response();
    }
    let etcd = space.map(|space| {
        serde_json::json!({
            "dbSizeBytes": space.db_size,
            "dbSizeInUseBytes": space.db_size_in_use,
            "quotaBytes": space.quota,
            "alarms": space.alarms,
        })
    });
    json_response(
        StatusCode::OK,
        &serde_json::json!({"status": "ok", "etcd": etcd}),
    )
}

async fn create_challenge(
    State(app): State<App>,
    headers: HeaderMap,
    ProtoJson(req, _): ProtoJson<CreateChallengeRequest>,
) -> Result<Response, ApiError> {
    let mode = mode(&headers);
    Ok(reply(
        app.create_challenge(req, requester(&headers), mode)
            .await?
            .into_json()?,
        mode,
    ))
}

async fn get_challenge(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &to_value(&app.get_challenge(&id).await?)?,
    ))
}

async fn list_challenges(State(app): State<App>) -> Result<Response, ApiError> {
    Ok(stream_lines(&to_values(&app.list_challenges().await?)?))
}

/// JSON member names of `UpdateChallengeRequest` and their proto paths.
const UPDATE_FIELDS: [(&str, &str); 8] = [
    ("scenario", "scenario"),
    ("timeout", "timeout"),
    ("until", "until"),
    ("additional", "additional"),
    ("min", "min"),
    ("max", "max"),
    ("maxPerSource", "max_per_source"),
    ("pool", "pool"),
];

async fn update_challenge(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ProtoJson(mut req, body): ProtoJson<UpdateChallengeRequest>,
) -> Result<Response, ApiError> {
    req.id = id;
    // A missing update mask is filled from the body's members (grpc-gateway
    // does so when the body is one field; chall-manager's `body: "*"` route
    // does not, so this only accepts more).
    if req.update_mask.as_ref().is_none_or(|m| m.paths.is_empty()) {
        let present = top_level_fields(&body);
        let paths = UPDATE_FIELDS
            .iter()
            .filter(|(json, proto)| present.iter().any(|p| p == json || p == proto))
            .map(|(_, proto)| (*proto).to_owned())
            .collect();
        req.update_mask = Some(cm_schemas::wkt::FieldMask { paths });
    }
    let mode = mode(&headers);
    Ok(reply(
        app.update_challenge(req, requester(&headers), mode)
            .await?
            .into_json()?,
        mode,
    ))
}

async fn delete_challenge(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mode = mode(&headers);
    let done = app.delete_challenge(id, requester(&headers), mode).await?;
    Ok(reply(done.into_empty(), mode))
}

async fn create_instance(
    State(app): State<App>,
    headers: HeaderMap,
    ProtoJson(req, _): ProtoJson<CreateInstanceRequest>,
) -> Result<Response, ApiError> {
    let mode = mode(&headers);
    Ok(reply(
        app.create_instance(req, requester(&headers), mode)
            .await?
            .into_json()?,
        mode,
    ))
}

async fn get_instance(
    State(app): State<App>,
    Path((cid, sid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &to_value(&app.get_instance(&cid, &sid).await?)?,
    ))
}

#[derive(Debug, Deserialize)]
struct InstanceQuery {
    #[serde(rename = "sourceId", alias = "source_id")]
    source_id: Option<String>,
}

async fn list_instances(
    State(app): State<App>,
    Query(q): Query<InstanceQuery>,
) -> Result<Response, ApiError> {
    // No sourceId: chall-manager queries source "" and streams nothing.
    let sid = q.source_id.unwrap_or_default();
    Ok(stream_lines(&to_values(&app.list_instances(&sid).await?)?))
}

async fn renew_instance(
    State(app): State<App>,
    Path((cid, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mode = mode(&headers);
    Ok(reply(
        app.renew_instance(cid, sid, requester(&headers), mode)
            .await?
            .into_json()?,
        mode,
    ))
}

async fn reset_instance(
    State(app): State<App>,
    Path((cid, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mode = mode(&headers);
    Ok(reply(
        app.reset_instance(cid, sid, requester(&headers), mode)
            .await?
            .into_json()?,
        mode,
    ))
}

/// `?force=true`: see `DeleteInstanceRequest.force`.
#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_instance(
    State(app): State<App>,
    Path((cid, sid)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mode = mode(&headers);
    let req = DeleteInstanceRequest {
        challenge_id: cid,
        source_id: sid,
        force: q.force,
    };
    let done = app.delete_instance(req, requester(&headers), mode).await?;
    Ok(reply(done.into_empty(), mode))
}

/// `POST /api/v1/scenario`: the body is a tar or tar.gz of a scenario
/// directory; answers `{"scenario": "nats-object:sha256:<hex>"}`.
async fn upload_scenario(
    State(app): State<App>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        ApiError(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            DomainError::invalid(format!(
                "the scenario archive is larger than {} bytes",
                app.scenarios.max_upload
            ))
        } else {
            DomainError::invalid(format!("cannot read the request body: {e}"))
        })
    })?;
    Ok(json_response(
        StatusCode::OK,
        &app.upload_scenario(body).await?,
    ))
}

async fn get_operation(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &to_value(&app.operation(&id).await?)?,
    ))
}

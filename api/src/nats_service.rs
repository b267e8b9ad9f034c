//! The NATS front door: the same operations as REST, as a NATS service
//! (discoverable with `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`), for platforms
//! that publish NATS requests.
//!
//! Endpoints (group `cm.api`), request and response bodies are the REST JSON:
//! `challenge.create|get|list|update|delete`, `instance.create|get|list|renew|delete`,
//! `operation.get`, `scenario.upload` (the body is the tar(.gz) itself, so
//! within the server's `max_payload`). `get`/`delete` take `{"id"}` or `{"challengeId","sourceId"}`,
//! `instance.list` takes `{"sourceId"}`; lists answer a JSON array. A request
//! with the header `Prefer: respond-async` is answered once accepted; one
//! with `Idempotency-Key` is the same command as every other request with
//! that key (see `submit`).
//! Errors are service errors: code = the HTTP status REST would answer,
//! description = the same message (headers `Nats-Service-Error-Code`,
//! `Nats-Service-Error`), and the body is REST's error JSON
//! (`{"code", "message", "details"}`).

use async_nats::service::{Request, ServiceExt};
use bytes::Bytes;
use cm_core::DomainError;
use cm_schemas::v1::{
    CreateChallengeRequest, CreateInstanceRequest, DeleteChallengeRequest, DeleteInstanceRequest,
    QueryInstanceRequest, RenewInstanceRequest, Requester, ResetInstanceRequest,
    RetrieveChallengeRequest, RetrieveInstanceRequest, UpdateChallengeRequest,
};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{error_body, service_error_headers},
    json::{parse, to_value, to_values},
    ops::{App, Mode, Reply},
};

/// The service's name in `$SRV` discovery.
pub const SERVICE_NAME: &str = "cm";

const ENDPOINTS: [&str; 13] = [
    "challenge.create",
    "challenge.get",
    "challenge.list",
    "challenge.update",
    "challenge.delete",
    "instance.create",
    "instance.get",
    "instance.list",
    "instance.renew",
    "instance.delete",
    "instance.reset",
    "operation.get",
    "scenario.upload",
];

/// Serves the NATS service until `shutdown`.
pub async fn serve(
    app: App,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let service = nats
        .service_builder()
        .description("On-demand CTF challenge instances (chall-manager compatible)")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let group = service.group("cm.api");
    let mut endpoints = Vec::new();
    for name in ENDPOINTS {
        endpoints.push((name, group.endpoint(name).await?));
    }
    let mut merged = futures::stream::select_all(
        endpoints
            .into_iter()
            .map(|(name, ep)| ep.map(move |req| (name, req)).boxed()),
    );
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            n = merged.next() => n,
        };
        let Some((name, request)) = next else { break };
        let app = app.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!("nats request", otel.name = %format!("cm.api.{name}"), otel.kind = "server");
            let _ = tracing::Instrument::instrument(handle(app, name, request), span).await;
        });
    }
    let _ = service.stop().await;
    Ok(())
}

async fn handle(app: App, name: &str, request: Request) {
    let mode = Mode::from_prefer(
        request
            .message
            .headers
            .as_ref()
            .map(|h| h.get_all("Prefer"))
            .into_iter()
            .flatten()
            .map(|v| v.as_str()),
    );
    let key = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get("Idempotency-Key"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let result = dispatch(&app, name, &request.message.payload, mode, &key).await;
    // An error goes out with the service error headers and REST's error body
    // (async-nats's own error reply has an empty body).
    let sent = match result {
        Ok(body) => request.respond(Ok(body)).await,
        Err(e) => {
            let body = serde_json::to_vec(&error_body(&e)).unwrap_or_default();
            request
                .respond_with_headers(Ok(Bytes::from(body)), service_error_headers(&e))
                .await
        }
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "NATS response not sent");
    }
}

fn who(idempotency_key: &str) -> Requester {
    Requester {
        principal: String::new(),
        via: "nats".into(),
        idempotency_key: idempotency_key.to_owned(),
    }
}

fn to_bytes<T: Serialize>(value: &T) -> Result<Bytes, DomainError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|_| DomainError::internal_error())
}

/// A write's answer: its result; under `Prefer: respond-async`, the
/// accepted operation; to a caller that waited past the result timeout, the
/// same "still running" error (504, `DEADLINE_EXCEEDED`) REST and gRPC give,
/// never a body that could be read as a success.
fn answer(reply: Reply<serde_json::Value>, mode: Mode) -> Result<Bytes, DomainError> {
    match reply {
        Reply::Done(v) => to_bytes(&v),
        Reply::Accepted { operation_id } if mode == Mode::Async => {
            to_bytes(&serde_json::json!({"operationId": operation_id, "state": "PENDING"}))
        }
        Reply::Accepted { operation_id } => Err(crate::ops::still_running(&operation_id)),
    }
}

async fn dispatch(
    app: &App,
    name: &str,
    body: &[u8],
    mode: Mode,
    key: &str,
) -> Result<Bytes, DomainError> {
    let reply = |r: Reply<serde_json::Value>| answer(r, mode);
    match name {
        "challenge.create" => reply(
            app.create_challenge(parse::<CreateChallengeRequest>(body)?, who(key), mode)
                .await?
                .into_json()?,
        ),
        "challenge.get" => to_bytes(&to_value(
            &app.get_challenge(&parse::<RetrieveChallengeRequest>(body)?.id)
                .await?,
        )?),
        "challenge.list" => to_bytes(&to_values(&app.list_challenges().await?)?),
        "challenge.update" => reply(
            app.update_challenge(parse::<UpdateChallengeRequest>(body)?, who(key), mode)
                .await?
                .into_json()?,
        ),
        "challenge.delete" => {
            let req = parse::<DeleteChallengeRequest>(body)?;
            reply(
                app.delete_challenge(req.id, who(key), mode)
                    .await?
                    .into_empty(),
            )
        }
        "instance.create" => reply(
            app.create_instance(parse::<CreateInstanceRequest>(body)?, who(key), mode)
                .await?
                .into_json()?,
        ),
        "instance.get" => {
            let req = parse::<RetrieveInstanceRequest>(body)?;
            to_bytes(&to_value(
                &app.get_instance(&req.challenge_id, &req.source_id).await?,
            )?)
        }
        "instance.list" => to_bytes(&to_values(
            &app.list_instances(&parse::<QueryInstanceRequest>(body)?.source_id)
                .await?,
        )?),
        "instance.renew" => {
            let req = parse::<RenewInstanceRequest>(body)?;
            reply(
                app.renew_instance(req.challenge_id, req.source_id, who(key), mode)
                    .await?
                    .into_json()?,
            )
        }
        "instance.delete" => {
            let req = parse::<DeleteInstanceRequest>(body)?;
            reply(app.delete_instance(req, who(key), mode).await?.into_empty())
        }
        "instance.reset" => {
            let req = parse::<ResetInstanceRequest>(body)?;
            reply(
                app.reset_instance(req.challenge_id, req.source_id, who(key), mode)
                    .await?
                    .into_json()?,
            )
        }
        // The body is the archive itself (within the server's max_payload).
        "scenario.upload" => to_bytes(&app.upload_scenario(Bytes::copy_from_slice(body)).await?),
        "operation.get" => {
            #[derive(serde::Deserialize)]
            struct ById {
                id: String,
            }
            let req: ById = parse(body)?;
            to_bytes(&to_value(&app.operation(&req.id).await?)?)
        }
        other => Err(DomainError::new(
            cm_schemas::v1::Code::Unimplemented,
            format!("unknown endpoint {other}"),
        )),
    }
}

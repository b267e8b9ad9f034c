//! The one place domain errors become REST responses and NATS service errors.
//!
//! Status codes follow grpc-gateway's mapping of gRPC codes, and the body is
//! grpc-gateway's error shape, `{"code", "message", "details"}`, so clients of
//! chall-manager read our errors as they read its own. `details` holds the
//! `google.rpc` messages chall-manager (>= v0.6.5, `pkg/errors` and
//! `api/v1/common/checks.go`) attaches for the same case: an `ErrorInfo`
//! (reason, its domain `github.com/ctfer-io/chall-manager`, or `.../OCI` for
//! registry answers, and metadata), then a `ResourceInfo`,
//! `PreconditionFailure`, `Help` and/or `BadRequest` as it does. Every
//! internal error carries `INTERNAL_ERROR`. Messages are ours.
//!
//! The NATS front door sends the same body with its service error headers.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use cm_core::{DomainError, error::reasons};
use cm_schemas::v1::Code;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use tonic_types::{
    BadRequest, ErrorDetail, ErrorInfo, FieldViolation, Help, HelpLink, PreconditionFailure,
    PreconditionViolation, ResourceInfo, StatusExt,
};

/// chall-manager's error domain (`pkg/errors.Domain`).
pub const DOMAIN: &str = "github.com/ctfer-io/chall-manager";
/// Its domain for registry answers (`api/v1/common/scenario.go`).
pub const DOMAIN_OCI: &str = "github.com/ctfer-io/chall-manager/OCI";

const TYPE_PREFIX: &str = "type.googleapis.com/google.rpc.";

/// A domain error on its way to a client.
#[derive(Debug)]
pub struct ApiError(pub DomainError);

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        Self(e)
    }
}

impl From<cm_core::store::StoreError> for ApiError {
    fn from(e: cm_core::store::StoreError) -> Self {
        tracing::warn!(error = %e, "store error");
        Self(e.into())
    }
}

/// grpc-gateway's `HTTPStatusFromCode`.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The error body: `{"code", "message", "details"}` (`google.rpc.Status`
/// as protojson prints it, unpopulated fields included).
pub fn error_body(e: &DomainError) -> Value {
    json!({
        "code": e.code() as i32,
        "message": e.message(),
        "details": details(e),
    })
}

/// The `google.rpc` details of `e` as chall-manager attaches them, in its
/// order: the one mapping, rendered as JSON by [`details`] (REST, NATS) and
/// as binary `google.rpc.Status` details by [`grpc_status`].
pub fn rpc_details(e: &DomainError) -> Vec<ErrorDetail> {
    let Some(r) = e.reason_info().filter(|r| !r.reason.is_empty()) else {
        return if e.code() == Code::Internal {
            vec![error_info(reasons::INTERNAL_ERROR, DOMAIN, [])]
        } else {
            Vec::new()
        };
    };
    let meta = |k: &str| r.metadata.get(k).map_or("", String::as_str);
    let domain = match r.reason.as_str() {
        reasons::OCI_INTERACTION | reasons::OCI_REFERENCE_NOT_FOUND => DOMAIN_OCI,
        _ => DOMAIN,
    };
    let mut out = vec![error_info(
        &r.reason,
        domain,
        r.metadata.iter().map(|(k, v)| (k.clone(), v.clone())),
    )];
    let instance = || format!("{}/{}", meta("challenge_id"), meta("source_id"));
    let bad_request = (!r.field_violations.is_empty()).then(|| {
        ErrorDetail::BadRequest(BadRequest::new(
            r.field_violations
                .iter()
                .map(|v| FieldViolation {
                    field: v.field.clone(),
                    description: v.description.clone(),
                    reason: v.reason.clone(),
                    localized_message: None,
                })
                .collect::<Vec<_>>(),
        ))
    });
    match r.reason.as_str() {
        reasons::CHALLENGE_NOT_FOUND => out.push(resource_info(
            "Challenge",
            meta("id"),
            "No challenge with this ID was found.",
        )),
        reasons::CHALLENGE_ALREADY_EXISTS => out.push(resource_info(
            "Challenge",
            meta("id"),
            "A challenge with this ID already exists.",
        )),
        reasons::INSTANCE_NOT_FOUND => out.push(resource_info(
            "Instance",
            &instance(),
            "No instance with this ID was found.",
        )),
        reasons::INSTANCE_ALREADY_EXISTS => out.push(resource_info(
            "Instance",
            &instance(),
            "An instance with this ID already exists.",
        )),
        reasons::CHALLENGE_EXPIRED => out.push(precondition_failure(
            "EXPIRATION",
            "Challenge",
            "Challenge has expired so can no longer process instance requests.",
        )),
        reasons::CHALLENGE_NO_RENEWAL => out.push(precondition_failure(
            "RENEWAL",
            "Challenge",
            "Challenge has no timeout thus cannot be renewed.",
        )),
        reasons::INSTANCE_EXPIRED => out.push(precondition_failure(
            "EXPIRATION",
            "Instance",
            "Instance has expired so can no longer process renewal request.",
        )),
        reasons::SCENARIO_NON_MATCHING_SPECIFICATION => {
            out.push(resource_info(
                "Scenario",
                meta("reference"),
                "A Pulumi program acting as a challenge instance deployment scenario.",
            ));
            out.push(help(&[
                (
                    "Definition of a Scenario.",
                    "https://ctfer.io/docs/chall-manager/glossary/#scenario",
                ),
                (
                    "Step-by-step guide to create a Scenario.",
                    "https://ctfer.io/docs/chall-manager/challmaker-guides/create-scenario/",
                ),
            ]));
        }
        reasons::OCI_REFERENCE_MALFORMED => {
            let description = r
                .field_violations
                .first()
                .map_or(e.message(), |v| v.description.as_str());
            out.push(resource_info("Reference", meta("reference"), description));
            out.push(help(&[(
                "OCI Image Format specification GitHub repository.",
                "https://github.com/opencontainers/image-spec",
            )]));
            // chall-manager attaches no BadRequest here.
            return out;
        }
        reasons::CHALLENGE_INVALID_UPDATE_MASK => {
            out.extend(bad_request);
            out.push(help(&[
                (
                    "Protocol Buffers > Well-Known Types > Field mask",
                    "https://protobuf.dev/reference/protobuf/google.protobuf/#field-mask",
                ),
                ("AIP-161 Field masks", "https://google.aip.dev/161"),
            ]));
            return out;
        }
        _ => {}
    }
    out.extend(bad_request);
    out
}

fn error_info(
    reason: &str,
    domain: &str,
    metadata: impl IntoIterator<Item = (String, String)>,
) -> ErrorDetail {
    ErrorDetail::ErrorInfo(ErrorInfo::new(
        reason,
        domain,
        metadata.into_iter().collect::<HashMap<_, _>>(),
    ))
}

fn resource_info(kind: &str, name: &str, description: &str) -> ErrorDetail {
    ErrorDetail::ResourceInfo(ResourceInfo::new(kind, name, "", description))
}

fn precondition_failure(kind: &str, subject: &str, description: &str) -> ErrorDetail {
    ErrorDetail::PreconditionFailure(PreconditionFailure::new(vec![PreconditionViolation::new(
        kind,
        format!("{DOMAIN}/{subject}"),
        description,
    )]))
}

fn help(links: &[(&str, &str)]) -> ErrorDetail {
    ErrorDetail::Help(Help::new(
        links
            .iter()
            .map(|(description, url)| HelpLink::new(*description, *url))
            .collect::<Vec<_>>(),
    ))
}

/// The details of `e` as protojson prints them (`{"@type": ..., ...}`,
/// unpopulated fields included).
pub fn details(e: &DomainError) -> Vec<Value> {
    rpc_details(e).iter().filter_map(detail_json).collect()
}

fn detail_json(d: &ErrorDetail) -> Option<Value> {
    Some(match d {
        ErrorDetail::ErrorInfo(i) => json!({
            "@type": format!("{TYPE_PREFIX}ErrorInfo"),
            "reason": i.reason,
            "domain": i.domain,
            "metadata": i.metadata.iter().collect::<BTreeMap<_, _>>(),
        }),
        ErrorDetail::ResourceInfo(r) => json!({
            "@type": format!("{TYPE_PREFIX}ResourceInfo"),
            "resourceType": r.resource_type,
            "resourceName": r.resource_name,
            "owner": r.owner,
            "description": r.description,
        }),
        ErrorDetail::PreconditionFailure(p) => {
            let violations: Vec<Value> = p
                .violations
                .iter()
                .map(|v| json!({"type": v.r#type, "subject": v.subject, "description": v.description}))
                .collect();
            json!({"@type": format!("{TYPE_PREFIX}PreconditionFailure"), "violations": violations})
        }
        ErrorDetail::Help(h) => {
            let links: Vec<Value> = h
                .links
                .iter()
                .map(|l| json!({"description": l.description, "url": l.url}))
                .collect();
            json!({"@type": format!("{TYPE_PREFIX}Help"), "links": links})
        }
        ErrorDetail::BadRequest(b) => {
            let violations: Vec<Value> = b
                .field_violations
                .iter()
                .map(|v| {
                    json!({
                        "field": v.field,
                        "description": v.description,
                        "reason": v.reason,
                        "localizedMessage": null,
                    })
                })
                .collect();
            json!({"@type": format!("{TYPE_PREFIX}BadRequest"), "fieldViolations": violations})
        }
        // No mapping produces the others.
        _ => return None,
    })
}

/// The gRPC form of an error: the same code and message, and the same
/// details as a binary `google.rpc.Status` (trailer `grpc-status-details-bin`).
pub fn grpc_status(e: &DomainError) -> tonic::Status {
    let code = tonic::Code::from_i32(e.code() as i32);
    tonic::Status::with_error_details_vec(code, e.message(), rpc_details(e))
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        grpc_status(&e.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.0.code());
        (status, Json(error_body(&self.0))).into_response()
    }
}

/// The NATS service form of an error: the HTTP status as code, the message
/// as status text (headers `Nats-Service-Error-Code`, `Nats-Service-Error`).
pub fn service_error(e: &DomainError) -> async_nats::service::error::Error {
    async_nats::service::error::Error {
        status: e.message().replace(['\r', '\n'], " "),
        code: http_status(e.code()).as_u16() as usize,
    }
}

/// The headers of a NATS error reply that also carries [`error_body`].
pub fn service_error_headers(e: &DomainError) -> async_nats::HeaderMap {
    let err = service_error(e);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::service::NATS_SERVICE_ERROR, err.status.as_str());
    headers.insert(
        async_nats::service::NATS_SERVICE_ERROR_CODE,
        err.code.to_string().as_str(),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use cm_core::error::FieldViolation;

    #[test]
    fn details_are_chall_managers() {
        let body = error_body(&DomainError::challenge_not_found("1"));
        assert_eq!(
            body,
            json!({"code": 5, "message": "challenge 1 not found", "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CHALLENGE_NOT_FOUND",
                 "domain": "github.com/ctfer-io/chall-manager", "metadata": {"id": "1"}},
                {"@type": "type.googleapis.com/google.rpc.ResourceInfo", "resourceType": "Challenge",
                 "resourceName": "1", "owner": "", "description": "No challenge with this ID was found."}
            ]})
        );
        let body = error_body(&DomainError::instance_already_exists("1", "2", "taken"));
        assert_eq!(
            body["details"][0]["metadata"],
            json!({"challenge_id": "1", "source_id": "2"})
        );
        assert_eq!(body["details"][1]["resourceName"], "1/2");
        let body = error_body(&DomainError::challenge_no_renewal("1"));
        assert_eq!(body["code"], 9);
        assert_eq!(body["details"][1]["violations"][0]["type"], "RENEWAL");
        // Internal errors say nothing but their reason.
        let body = error_body(&DomainError::internal_error());
        assert_eq!(body["details"][0]["reason"], "INTERNAL_ERROR");
        assert_eq!(body["details"][0]["metadata"], json!({}));
        // Field violations become a BadRequest; OCI reasons their own domain.
        let e = DomainError::new(Code::FailedPrecondition, "away")
            .with_reason(reasons::OCI_INTERACTION, [("reference", "r")])
            .with_violation(FieldViolation::new(
                "scenario",
                reasons::OCI_INTERACTION,
                "away",
            ));
        let body = error_body(&e);
        assert_eq!(body["details"][0]["domain"], DOMAIN_OCI);
        assert_eq!(
            body["details"][1],
            json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                {"field": "scenario", "description": "away", "reason": "OCI_INTERACTION", "localizedMessage": null}
            ]})
        );
        // No reason, no details (grpc-gateway's decoding errors).
        assert_eq!(
            error_body(&DomainError::invalid("bad"))["details"],
            json!([])
        );
    }

    #[test]
    fn grpc_statuses_carry_the_same_details() {
        let e = DomainError::challenge_not_found("1");
        let status = grpc_status(&e);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "challenge 1 not found");
        // The binary google.rpc.Status decodes to what REST prints.
        let decoded = status.check_error_details_vec().expect("decodes");
        assert_eq!(decoded.len(), 2);
        let json: Vec<Value> = decoded.iter().filter_map(detail_json).collect();
        assert_eq!(json, details(&e));
        let internal = grpc_status(&DomainError::internal_error());
        assert_eq!(internal.code(), tonic::Code::Internal);
        assert_eq!(
            internal
                .get_error_details()
                .error_info()
                .map(|i| i.reason.as_str()),
            Some("INTERNAL_ERROR")
        );
        // No reason, no details, as REST.
        let plain = grpc_status(&DomainError::invalid("bad"));
        assert_eq!(plain.code(), tonic::Code::InvalidArgument);
        assert!(plain.check_error_details_vec().expect("decodes").is_empty());
    }

    #[test]
    fn reasons_survive_the_trip_through_the_worker() {
        let e = DomainError::invalid("x")
            .with_reason(reasons::CHALLENGE_POOLER_OUT_OF_BOUNDS, [("min", "-1")])
            .with_violation(FieldViolation::new("min", "MUST_BE_POSITIVE", "d"));
        assert_eq!(DomainError::from_failure(&e.to_failure()), e);
        let plain = DomainError::not_found("y");
        assert_eq!(DomainError::from_failure(&plain.to_failure()), plain);
    }
}

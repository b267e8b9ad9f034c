//! The one place domain errors become REST responses and NATS service errors.
//!
//! Status codes follow grpc-gateway's mapping of gRPC codes, and the body is
//! grpc-gateway's error shape, `{"code", "message", "details"}`, so clients of
//! chall-manager read our errors as they read its own.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use cm_core::DomainError;
use cm_schemas::v1::Code;

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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.0.code);
        let body = serde_json::json!({
            "code": self.0.code as i32,
            "message": self.0.message,
            "details": [],
        });
        (status, Json(body)).into_response()
    }
}

/// The NATS service form of an error: the HTTP status as code, the message
/// as status text.
pub fn service_error(e: &DomainError) -> async_nats::service::error::Error {
    async_nats::service::error::Error {
        status: e.message.replace(['\r', '\n'], " "),
        code: http_status(e.code).as_u16() as usize,
    }
}

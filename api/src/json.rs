//! Lenient protobuf-JSON input, parsed the way grpc-gateway parses it:
//! unknown fields ignored, `null` meaning unset, int64 as a number or a
//! string. Malformed input answers in the API's own error format.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
};
use cm_core::DomainError;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// Deepest JSON nesting accepted (requests are flat; this stops abuse early).
const MAX_DEPTH: usize = 32;

/// Parses a request body into a protobuf message.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DomainError> {
    if bytes.len() > MAX_BODY {
        return Err(DomainError::invalid(format!(
            "request body is larger than {MAX_BODY} bytes"
        )));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DomainError::invalid(
            "request body is empty; a JSON object is expected",
        ));
    }
    let mut value: Value = serde_json::from_slice(bytes)
        .map_err(|e| DomainError::invalid(format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(DomainError::invalid("request body must be a JSON object"));
    }
    if depth(&value) > MAX_DEPTH {
        return Err(DomainError::invalid("request body is nested too deeply"));
    }
    strip_nulls(&mut value);
    serde_json::from_value(value).map_err(|e| DomainError::invalid(format!("invalid request: {e}")))
}

fn depth(value: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// `null` means unset: remove object members whose value is null.
fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            strip_nulls(v);
        }
    }
}

/// The names of the top-level members of a JSON object body (for
/// grpc-gateway's implicit `update_mask` on PATCH).
pub fn top_level_fields(bytes: &[u8]) -> Vec<String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k)
            .collect(),
        _ => Vec::new(),
    }
}

/// Axum extractor for a protobuf-JSON body.
#[derive(Debug)]
pub struct ProtoJson<T>(pub T, pub Bytes);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ProtoJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            ApiError(if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                DomainError::invalid(format!("request body is larger than {MAX_BODY} bytes"))
            } else {
                DomainError::invalid(format!("cannot read the request body: {e}"))
            })
        })?;
        Ok(Self(parse(&bytes)?, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cm_schemas::v1::{CreateChallengeRequest, CreateInstanceRequest};

    #[test]
    fn lenient_like_grpc_gateway() {
        let req: CreateChallengeRequest = parse(
            br#"{"id":"c1","scenario":"identity","timeout":null,"until":null,"min":"2","max":3,
                "updateStrategy":"update_in_place","unknownField":{"x":1}}"#,
        )
        .expect("parses");
        assert_eq!(req.id, "c1");
        assert_eq!((req.min, req.max), (2, 3));
        assert!(req.timeout.is_none());
        let req: CreateChallengeRequest =
            parse(br#"{"id":"c","scenario":"s","timeout":"600s","until":"2030-01-01T00:00:00Z"}"#)
                .expect("parses");
        assert_eq!(req.timeout.map(|d| d.seconds), Some(600));
        assert!(req.until.is_some());
    }

    #[test]
    fn malformed_input_says_what_is_wrong() {
        for (body, expected) in [
            (&b""[..], "empty"),
            (b"{", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"challengeId": 5}"#, "invalid request"),
            (
                br#"{"challengeId":"c","sourceId":"s","additional":"x"}"#,
                "invalid request",
            ),
        ] {
            let err = parse::<CreateInstanceRequest>(body).expect_err("refused");
            assert!(
                err.message.contains(expected),
                "{:?}: {}",
                body,
                err.message
            );
        }
        let deep = format!(
            "{}{}",
            "{\"a\":".repeat(40),
            "1".to_owned() + &"}".repeat(40)
        );
        let err = parse::<CreateInstanceRequest>(deep.as_bytes()).expect_err("too deep");
        assert!(err.message.contains("nested"), "{}", err.message);
    }
}

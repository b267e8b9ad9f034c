//! Protobuf JSON in and out, as chall-manager's grpc-gateway speaks it.
//!
//! In: lenient, the way grpc-gateway parses (protojson with
//! `DiscardUnknown`): unknown fields ignored, `null` meaning unset, int64 as
//! a number or a string, enums by name or number, a `FieldMask` as
//! `"timeout,until"`, a `Timestamp` with `Z` or an offset, a `Duration` as
//! `"1.5s"`. Malformed input answers in the API's own error format.
//!
//! Out: grpc-gateway's default marshaler is protojson with
//! `EmitUnpopulated`: every field is printed, an unset message field as
//! `null` (proto3 `optional` fields, in synthetic oneofs, stay absent when
//! unset). pbjson prints scalars, lists and maps (`emit_fields`);
//! [`to_value`] adds the `null`s, walking the messages' descriptors.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
};
use std::{collections::HashMap, sync::OnceLock};

use cm_core::DomainError;
use prost::Message as _;
use prost_types::{
    DescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};
use serde::{Serialize, de::DeserializeOwned};
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

/// Every message of `cm_schemas` by its full name (`.cm.v1.Challenge`).
fn messages() -> &'static HashMap<String, DescriptorProto> {
    static INDEX: OnceLock<HashMap<String, DescriptorProto>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut index = HashMap::new();
        // The descriptors are compiled into the binary: decoding cannot fail
        // unless the build is broken, and then nothing is filled.
        let Ok(set) = FileDescriptorSet::decode(cm_schemas::FILE_DESCRIPTOR_SET) else {
            tracing::error!("cannot decode the compiled descriptors");
            return index;
        };
        for file in set.file {
            let prefix = format!(".{}", file.package());
            let mut stack: Vec<(String, DescriptorProto)> = file
                .message_type
                .into_iter()
                .map(|m| (prefix.clone(), m))
                .collect();
            while let Some((parent, message)) = stack.pop() {
                let name = format!("{parent}.{}", message.name());
                stack.extend(
                    message
                        .nested_type
                        .iter()
                        .cloned()
                        .map(|m| (name.clone(), m)),
                );
                index.insert(name, message);
            }
        }
        index
    })
}

/// Adds `null` for every unset singular message field of `value`, a
/// message of type `name` (`.cm.v1.Challenge`), and of the messages it holds.
fn fill_unpopulated(value: &mut Value, name: &str) {
    let Some(descriptor) = messages().get(name) else {
        return;
    };
    let Value::Object(map) = value else { return };
    for field in &descriptor.field {
        if field.r#type() != Type::Message {
            continue;
        }
        let json_name = field.json_name();
        let repeated = field.label() == Label::Repeated;
        match map.get_mut(json_name) {
            // In a oneof (a proto3 `optional` one included): absent when unset.
            None if !repeated && field.oneof_index.is_none() => {
                map.insert(json_name.to_owned(), Value::Null);
            }
            Some(Value::Array(items)) if repeated => {
                for item in items {
                    fill_unpopulated(item, field.type_name());
                }
            }
            Some(item @ Value::Object(_)) if !repeated => fill_unpopulated(item, field.type_name()),
            _ => {}
        }
    }
}

/// A message as grpc-gateway prints it (see the module docs).
pub fn to_value<T: Serialize + prost::Name>(message: &T) -> Result<Value, DomainError> {
    let mut value = serde_json::to_value(message).map_err(|e| {
        tracing::error!(error = %e, message = T::NAME, "cannot print a message");
        DomainError::internal_error()
    })?;
    fill_unpopulated(&mut value, &format!(".{}", T::full_name()));
    Ok(value)
}

/// Several messages, each as [`to_value`] prints it.
pub fn to_values<T: Serialize + prost::Name>(messages: &[T]) -> Result<Vec<Value>, DomainError> {
    messages.iter().map(to_value).collect()
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
    fn canonical_json_of_every_well_known_type_is_read() {
        use cm_schemas::v1::{UpdateChallengeRequest, UpdateStrategy};
        // What the CTFd plugin sends on update: the mask as one string.
        let req: UpdateChallengeRequest = parse(
            br#"{"updateMask":"timeout,until,additional,min,max,scenario","timeout":"1.5s",
                "until":"2030-01-01T02:00:00.123456+02:00","min":"1","max":2,
                "additional":{"k":"v"},"scenario":"identity","updateStrategy":"blue_green"}"#,
        )
        .expect("parses");
        let mask = req.update_mask.expect("mask");
        assert_eq!(
            mask.paths,
            ["timeout", "until", "additional", "min", "max", "scenario"]
        );
        let timeout = req.timeout.expect("timeout");
        assert_eq!((timeout.seconds, timeout.nanos), (1, 500_000_000));
        let until = req.until.expect("until");
        assert_eq!(
            until.to_rfc3339().as_deref(),
            Some("2030-01-01T00:00:00.123456Z")
        );
        assert_eq!((req.min, req.max), (Some(1), Some(2)));
        assert_eq!(req.update_strategy, Some(UpdateStrategy::BlueGreen as i32));
        // Enums by number, lowerCamel mask paths, `null` as unset, the
        // legacy object form of a mask.
        let req: UpdateChallengeRequest = parse(
            br#"{"updateMask":"maxPerSource,updateStrategy","updateStrategy":2,"until":null,"timeout":null}"#,
        )
        .expect("parses");
        assert_eq!(
            req.update_mask.expect("mask").paths,
            ["max_per_source", "update_strategy"]
        );
        assert_eq!(req.update_strategy, Some(UpdateStrategy::Recreate as i32));
        assert!(req.until.is_none() && req.timeout.is_none());
        let req: UpdateChallengeRequest =
            parse(br#"{"updateMask":{"paths":["timeout"]}}"#).expect("object mask");
        assert_eq!(req.update_mask.expect("mask").paths, ["timeout"]);
        for bad in [
            &br#"{"until":"2030-01-01"}"#[..],
            br#"{"timeout":"600"}"#,
            br#"{"updateMask":5}"#,
            br#"{"updateStrategy":"sideways"}"#,
        ] {
            assert!(
                parse::<UpdateChallengeRequest>(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn unpopulated_fields_are_printed_like_grpc_gateway() {
        use cm_schemas::{
            v1::{Challenge, Instance},
            wkt::Timestamp,
        };
        let at = Timestamp {
            seconds: 1_796_086_055,
            nanos: 685_921_401,
        };
        let challenge = Challenge {
            id: "c".into(),
            scenario: "identity".into(),
            instances: vec![Instance {
                challenge_id: "c".into(),
                source_id: "s".into(),
                since: Some(at),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = to_value(&challenge).expect("prints");
        assert_eq!(
            v,
            serde_json::json!({
                "id": "c", "scenario": "identity", "timeout": null, "until": null,
                "additional": {}, "min": "0", "max": "0",
                "instances": [{
                    "challengeId": "c", "sourceId": "s",
                    "since": "2026-12-01T00:47:35.685921401Z", "lastRenew": null,
                    "connectionInfo": "", "flags": [], "additional": {}
                }]
            })
        );
        // `until` and `flag` are proto3 optional: absent when unset, printed when set.
        let instance = Instance {
            until: Some(at),
            flag: Some("F".into()),
            ..Default::default()
        };
        let v = to_value(&instance).expect("prints");
        assert_eq!(v["until"], "2026-12-01T00:47:35.685921401Z");
        assert_eq!(v["flag"], "F");
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
                err.message().contains(expected),
                "{:?}: {}",
                body,
                err.message()
            );
        }
        let deep = format!(
            "{}{}",
            "{\"a\":".repeat(40),
            "1".to_owned() + &"}".repeat(40)
        );
        let err = parse::<CreateInstanceRequest>(deep.as_bytes()).expect_err("too deep");
        assert!(err.message().contains("nested"), "{}", err.message());
    }
}

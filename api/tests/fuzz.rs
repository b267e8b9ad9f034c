//! Property-based fuzzing of the API's input layer, bounded by case count
//! (`PROPTEST_CASES` overrides it): arbitrary bytes and arbitrary JSON never
//! panic the parser or the validators, and every refusal is an
//! `InvalidArgument` with a message, which the API turns into a 400.

use cm_api::{json::parse, validate};
use cm_schemas::v1::{Code, CreateChallengeRequest, CreateInstanceRequest, UpdateChallengeRequest};
use proptest::prelude::*;
use serde_json::Value;

/// Arbitrary JSON values, nested up to 48 levels (deeper than accepted).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(48, 256, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Request-shaped objects: the real field names with arbitrary values.
fn request_object() -> impl Strategy<Value = Value> {
    let fields = prop::sample::subsequence(
        vec![
            "id",
            "scenario",
            "timeout",
            "until",
            "additional",
            "min",
            "max",
            "maxPerSource",
            "challengeId",
            "sourceId",
            "updateStrategy",
            "unknown",
        ],
        0..8,
    );
    (fields, prop::collection::vec(json_value(), 8)).prop_map(|(names, values)| {
        Value::Object(
            names
                .into_iter()
                .zip(values)
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    })
}

fn refused_cleanly(code: Code, message: &str) -> bool {
    code == Code::InvalidArgument && !message.is_empty()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = parse::<CreateChallengeRequest>(&bytes) {
            prop_assert!(refused_cleanly(e.code(), e.message()), "{e:?}");
        }
    }

    #[test]
    fn arbitrary_json_parses_or_is_refused_with_a_reason(value in json_value()) {
        let bytes = serde_json::to_vec(&value).expect("encode");
        if let Err(e) = parse::<UpdateChallengeRequest>(&bytes) {
            prop_assert!(refused_cleanly(e.code(), e.message()), "{e:?}");
        }
    }

    #[test]
    fn request_shaped_json_is_validated_without_panics(value in request_object()) {
        let bytes = serde_json::to_vec(&value).expect("encode");
        match parse::<CreateChallengeRequest>(&bytes) {
            Ok(req) => {
                if let Err(e) = validate::create_challenge(&req) {
                    prop_assert!(refused_cleanly(e.code(), e.message()), "{e:?}");
                }
            }
            Err(e) => prop_assert!(refused_cleanly(e.code(), e.message()), "{e:?}"),
        }
        match parse::<CreateInstanceRequest>(&bytes) {
            Ok(req) => {
                if let Err(e) = validate::create_instance(&req) {
                    prop_assert!(refused_cleanly(e.code(), e.message()), "{e:?}");
                }
            }
            Err(e) => prop_assert!(refused_cleanly(e.code(), e.message()), "{e:?}"),
        }
    }

    #[test]
    fn ids_that_pass_validation_are_safe_path_and_subject_tokens(id in "\\PC{0,80}") {
        if validate::instance_key(&id, "team").is_ok() {
            prop_assert!(!id.contains('/') && id != "." && id != "..");
            prop_assert!(!id.chars().any(char::is_control));
        }
        // Empty ids never get this far (validation refuses them).
        prop_assume!(!id.is_empty());
        let token = cm_core::ids::encode(&id);
        prop_assert!(!token.is_empty());
        prop_assert!(!token.contains(['.', '*', '>', ' ', '/']) && !token.chars().any(char::is_whitespace),
            "{token:?} is not a safe NATS subject token / etcd key part");
        prop_assert_eq!(cm_core::ids::decode(&token), Some(id));
    }
}

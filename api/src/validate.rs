//! Request validation: everything the API can refuse before publishing a
//! command, with a message that says what is wrong. Business rules that need
//! the store under a lock (exists, expired, ...) are the worker's.

use std::collections::HashMap;

use cm_core::{
    DomainError,
    error::{FieldViolation, reasons},
    ids,
};
use cm_schemas::v1::{CreateChallengeRequest, CreateInstanceRequest, UpdateChallengeRequest};
use pbjson_types::Duration;

const MAX_ADDITIONAL_ENTRIES: usize = 64;
const MAX_ADDITIONAL_KEY: usize = 128;
const MAX_ADDITIONAL_VALUE: usize = 4096;

/// Checks a scenario reference's syntax: a relative directory, an OCI
/// reference or an uploaded archive's `nats-object:sha256:<hex>`.
pub fn scenario(reference: &str) -> Result<(), DomainError> {
    crate::scenarios::parse(reference).map(|_| ())
}

fn timeout(t: &Option<Duration>) -> Result<(), DomainError> {
    if let Some(t) = t
        && (t.seconds < 0 || t.nanos < 0 || (t.seconds == 0 && t.nanos == 0))
    {
        return Err(DomainError::invalid("timeout must be a positive duration"));
    }
    Ok(())
}

/// The pooler bounds, refused as chall-manager does
/// (`CHALLENGE_POOLER_OUT_OF_BOUNDS`, one field violation per fault).
fn pool(min: i64, max: i64) -> Result<(), DomainError> {
    let mut violations = Vec::new();
    if min < 0 {
        violations.push(FieldViolation::new(
            "min",
            "MUST_BE_POSITIVE",
            "Minimum boundary must be a positive integer.",
        ));
    }
    if max < 0 {
        violations.push(FieldViolation::new(
            "max",
            "MUST_BE_POSITIVE",
            "Maximum boundary must be a positive integer.",
        ));
    }
    if max > 0 && min > max {
        violations.push(FieldViolation::new(
            "min",
            "INVERTED_BOUNDARIES",
            "When an upper bound is defined, minimum cannot exceed maximum.",
        ));
    }
    if violations.is_empty() {
        return Ok(());
    }
    let message = if min < 0 || max < 0 {
        "min and max must not be negative"
    } else {
        "min must not exceed max (max 0 means no cap)"
    };
    let (min, max) = (min.to_string(), max.to_string());
    let mut e = DomainError::invalid(message).with_reason(
        reasons::CHALLENGE_POOLER_OUT_OF_BOUNDS,
        [("min", min.as_str()), ("max", max.as_str())],
    );
    for v in violations {
        e = e.with_violation(v);
    }
    Err(e)
}

fn pool_mode(v: Option<&str>) -> Result<(), DomainError> {
    match v {
        Some(m) if cm_core::pool_demand::PoolMode::parse(m).is_none() => Err(DomainError::invalid(
            format!("pool must be \"static\" or \"adaptive\", got {m:?}"),
        )),
        _ => Ok(()),
    }
}

fn max_per_source(v: Option<i64>) -> Result<(), DomainError> {
    if v.is_some_and(|v| v < 0) {
        return Err(DomainError::invalid("maxPerSource must not be negative"));
    }
    Ok(())
}

/// Checks an `additional` map's size and keys.
pub fn additional(map: &HashMap<String, String>) -> Result<(), DomainError> {
    if map.len() > MAX_ADDITIONAL_ENTRIES {
        return Err(DomainError::invalid(format!(
            "additional has more than {MAX_ADDITIONAL_ENTRIES} entries"
        )));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_ADDITIONAL_KEY || k.chars().any(char::is_control) {
            return Err(DomainError::invalid(format!(
                "additional keys must be 1-{MAX_ADDITIONAL_KEY} bytes without control characters"
            )));
        }
        if v.len() > MAX_ADDITIONAL_VALUE {
            return Err(DomainError::invalid(format!(
                "additional[{k:?}] is longer than {MAX_ADDITIONAL_VALUE} bytes"
            )));
        }
    }
    Ok(())
}

pub fn create_challenge(req: &CreateChallengeRequest) -> Result<(), DomainError> {
    ids::validate("challenge id", &req.id)?;
    scenario(&req.scenario)?;
    timeout(&req.timeout)?;
    pool(req.min, req.max)?;
    max_per_source(req.max_per_source)?;
    pool_mode(req.pool.as_deref())?;
    additional(&req.additional)
}

pub fn update_challenge(req: &UpdateChallengeRequest) -> Result<(), DomainError> {
    ids::validate("challenge id", &req.id)?;
    if let Some(s) = &req.scenario {
        scenario(s)?;
    }
    timeout(&req.timeout)?;
    pool(req.min.unwrap_or(0), req.max.unwrap_or(0))?;
    max_per_source(req.max_per_source)?;
    pool_mode(req.pool.as_deref())?;
    if let Some(mask) = &req.update_mask {
        const KNOWN: [&str; 8] = [
            "scenario",
            "timeout",
            "until",
            "additional",
            "min",
            "max",
            "max_per_source",
            "pool",
        ];
        if let Some(bad) = mask.paths.iter().find(|p| !KNOWN.contains(&p.as_str())) {
            let text = format!(
                "updateMask names {bad:?}, which cannot be updated (known: {})",
                KNOWN.join(", ")
            );
            let paths = mask.to_json_string();
            return Err(DomainError::invalid(text.clone())
                .with_reason(
                    reasons::CHALLENGE_INVALID_UPDATE_MASK,
                    [("update-mask", paths.as_str())],
                )
                .with_violation(FieldViolation::new(
                    "update-mask",
                    "INVALID_UPDATE_MASK",
                    text,
                )));
        }
    }
    additional(&req.additional)
}

pub fn create_instance(req: &CreateInstanceRequest) -> Result<(), DomainError> {
    ids::validate("challenge id", &req.challenge_id)?;
    ids::validate("source id", &req.source_id)?;
    additional(&req.additional)
}

/// Checks a (challenge id, source id) pair from a path.
pub fn instance_key(challenge_id: &str, source_id: &str) -> Result<(), DomainError> {
    ids::validate("challenge id", challenge_id)?;
    ids::validate("source id", source_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_challenges_with_reasons() {
        let base = CreateChallengeRequest {
            id: "c".into(),
            scenario: "identity".into(),
            ..Default::default()
        };
        create_challenge(&base).expect("valid");
        let cases: Vec<(CreateChallengeRequest, &str)> = vec![
            (
                CreateChallengeRequest {
                    id: "".into(),
                    ..base.clone()
                },
                "challenge id must not be empty",
            ),
            (
                CreateChallengeRequest {
                    scenario: "".into(),
                    ..base.clone()
                },
                "scenario must not be empty",
            ),
            (
                CreateChallengeRequest {
                    scenario: "../x".into(),
                    ..base.clone()
                },
                "'..'",
            ),
            (
                CreateChallengeRequest {
                    scenario: "/etc".into(),
                    ..base.clone()
                },
                "'..'",
            ),
            (
                CreateChallengeRequest {
                    min: -1,
                    ..base.clone()
                },
                "negative",
            ),
            (
                CreateChallengeRequest {
                    min: 3,
                    max: 2,
                    ..base.clone()
                },
                "exceed",
            ),
            (
                CreateChallengeRequest {
                    timeout: Some(Duration {
                        seconds: -5,
                        nanos: 0,
                    }),
                    ..base.clone()
                },
                "positive",
            ),
            (
                CreateChallengeRequest {
                    pool: Some("elastic".into()),
                    ..base.clone()
                },
                "pool must be \"static\" or \"adaptive\"",
            ),
        ];
        for mode in ["static", "adaptive"] {
            create_challenge(&CreateChallengeRequest {
                pool: Some(mode.into()),
                ..base.clone()
            })
            .expect(mode);
        }
        for (req, expected) in cases {
            let err = create_challenge(&req).expect_err(expected);
            assert!(
                err.message().contains(expected),
                "{expected}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn update_mask_paths_are_checked() {
        let req = UpdateChallengeRequest {
            id: "c".into(),
            update_mask: Some(cm_schemas::wkt::FieldMask {
                paths: vec!["id".into()],
            }),
            ..Default::default()
        };
        assert!(
            update_challenge(&req)
                .expect_err("id is not updatable")
                .message()
                .contains("updateMask")
        );
    }
}

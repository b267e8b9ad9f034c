//! The domain model as stored in etcd: challenge and instance records, and
//! the time rules that tie them (an instance's `until`).
//!
//! Records are JSON; times and durations use the protobuf well-known types
//! (RFC 3339 / `"600s"` in JSON), so they convert to the API messages as is.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cm_schemas::v1 as api;
use cm_schemas::wkt::Timestamp;
use pbjson_types::Duration as PbDuration;
use serde::{Deserialize, Serialize};

use crate::Identity;

/// A challenge as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChallengeRecord {
    pub id: String,
    /// Scenario reference (a directory name under the workers' scenario root,
    /// or an OCI reference).
    pub scenario: String,
    pub timeout: Option<PbDuration>,
    pub until: Option<Timestamp>,
    #[serde(default)]
    pub additional: BTreeMap<String, String>,
    #[serde(default)]
    pub min: i64,
    #[serde(default)]
    pub max: i64,
    #[serde(default)]
    pub max_per_source: Option<i64>,
    /// How the pool is sized (records written before it existed: static).
    #[serde(default)]
    pub pool: crate::pool_demand::PoolMode,
}

impl ChallengeRecord {
    /// The API message, with the given instances.
    pub fn to_api(&self, instances: Vec<api::Instance>) -> api::Challenge {
        api::Challenge {
            id: self.id.clone(),
            scenario: self.scenario.clone(),
            timeout: self.timeout,
            until: self.until,
            instances,
            additional: self.additional.clone().into_iter().collect(),
            min: self.min,
            max: self.max,
            max_per_source: self.max_per_source,
            // Printed only when it is not chall-manager's behaviour.
            pool: (self.pool != crate::pool_demand::PoolMode::Static)
                .then(|| self.pool.as_str().to_owned()),
        }
    }

    /// Whether the challenge's own `until` has passed at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.until.is_some_and(|u| to_system_time(&u) <= now)
    }

    /// The `until` of an instance (re)started at `now`:
    /// `min(now + timeout, challenge.until)` of those that are set.
    pub fn instance_until(&self, now: SystemTime) -> Option<Timestamp> {
        let by_timeout = self.timeout.as_ref().map(|t| now + to_std_duration(t));
        let by_until = self.until.as_ref().map(to_system_time);
        match (by_timeout, by_until) {
            (Some(a), Some(b)) => Some(to_timestamp(a.min(b))),
            (Some(a), None) => Some(to_timestamp(a)),
            (None, Some(b)) => Some(to_timestamp(b)),
            (None, None) => None,
        }
    }
}

/// Lifecycle of an instance record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Reserved; Pulumi is (or was, if the worker died) deploying it.
    Deploying,
    /// Deployed; outputs are valid.
    Ready,
}

/// An instance as stored (claimed by a source, or pooled when `source_id` is `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub challenge_id: String,
    pub identity: Identity,
    pub source_id: Option<String>,
    pub status: InstanceStatus,
    pub since: Timestamp,
    pub last_renew: Timestamp,
    pub until: Option<Timestamp>,
    #[serde(default)]
    pub connection_info: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub additional: BTreeMap<String, String>,
    /// The command that last wrote this record (idempotency of redeliveries).
    pub command_id: String,
    /// What the stack was last deployed from ([`deployment_fingerprint`]);
    /// absent on records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_from: Option<String>,
}

/// What a stack is deployed from: the challenge's scenario reference and
/// the configuration its program saw, as SHA-256 (hex). A challenge update
/// compares the challenge's with each instance's to know which still run
/// something else, whichever delivery of the update asks.
pub fn deployment_fingerprint(scenario: &str, additional: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut sha = Sha256::new();
    // Length-prefixed: no two different inputs give the same bytes.
    for part in std::iter::once(scenario).chain(
        additional
            .iter()
            .flat_map(|(k, v)| [k.as_str(), v.as_str()]),
    ) {
        sha.update((part.len() as u64).to_be_bytes());
        sha.update(part.as_bytes());
    }
    hex::encode(sha.finalize())
}

impl InstanceRecord {
    /// The API message.
    pub fn to_api(&self) -> api::Instance {
        api::Instance {
            challenge_id: self.challenge_id.clone(),
            source_id: self.source_id.clone().unwrap_or_default(),
            since: Some(self.since),
            last_renew: Some(self.last_renew),
            until: self.until,
            connection_info: self.connection_info.clone(),
            flag: self.flags.first().cloned(),
            additional: self.additional.clone().into_iter().collect(),
            flags: self.flags.clone(),
        }
    }

    /// Whether the instance's `until` has passed at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.until.is_some_and(|u| to_system_time(&u) <= now)
    }
}

/// A `SystemTime` as a protobuf timestamp.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf timestamp as a `SystemTime` (clamped at the epoch).
pub fn to_system_time(t: &Timestamp) -> SystemTime {
    if t.seconds < 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.clamp(0, 999_999_999) as u32)
}

/// A protobuf duration as a std duration (negative clamps to zero).
pub fn to_std_duration(d: &PbDuration) -> Duration {
    if d.seconds < 0 || d.nanos < 0 {
        return Duration::ZERO;
    }
    Duration::new(d.seconds as u64, d.nanos as u32)
}

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    to_timestamp(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(timeout: Option<i64>, until: Option<i64>) -> ChallengeRecord {
        ChallengeRecord {
            id: "c".into(),
            scenario: "s".into(),
            timeout: timeout.map(|s| PbDuration {
                seconds: s,
                nanos: 0,
            }),
            until: until.map(|s| Timestamp {
                seconds: s,
                nanos: 0,
            }),
            additional: BTreeMap::new(),
            min: 0,
            max: 0,
            max_per_source: None,
            pool: Default::default(),
        }
    }

    #[test]
    fn until_is_the_earliest_of_timeout_and_challenge_until() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(challenge(None, None).instance_until(now), None);
        assert_eq!(
            challenge(Some(60), None)
                .instance_until(now)
                .map(|t| t.seconds),
            Some(1_060)
        );
        assert_eq!(
            challenge(None, Some(2_000))
                .instance_until(now)
                .map(|t| t.seconds),
            Some(2_000)
        );
        assert_eq!(
            challenge(Some(600), Some(1_100))
                .instance_until(now)
                .map(|t| t.seconds),
            Some(1_100)
        );
        assert_eq!(
            challenge(Some(60), Some(5_000))
                .instance_until(now)
                .map(|t| t.seconds),
            Some(1_060)
        );
    }

    #[test]
    fn expiry_is_inclusive_of_the_deadline() {
        let c = challenge(None, Some(1_000));
        assert!(!c.is_expired(UNIX_EPOCH + Duration::from_secs(999)));
        assert!(c.is_expired(UNIX_EPOCH + Duration::from_secs(1_000)));
    }
}

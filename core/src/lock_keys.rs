//! Where locks live in etcd: the key prefix of each lock, which every lock
//! holder (`lock`) and the store's claim guard (`store`, which checks that
//! no key exists under an identity's prefix) agree on.
//!
//! Owns: the lock key layout. Must not know: how locks are taken, waited
//! for or released (`lock`), or what the records hold (`store`).

use crate::ids;

/// Lock prefix of a challenge (reader/writer).
pub fn challenge_lock(root: &str, cid: &str) -> String {
    format!("{root}/lock/challenge/{}/", ids::encode(cid))
}

/// Lock prefix of a challenge's pool (writer only: one refill at a time).
pub fn pool_lock(root: &str, cid: &str) -> String {
    format!("{root}/lock/pool/{}/", ids::encode(cid))
}

/// Prefix of the cluster's refill slots (`<prefix><n>`, n below the cap):
/// a pool deploy runs only while it holds one, so refills never take more
/// than the cap of the cluster's Pulumi runs from players' own creates.
pub fn refill_slots(root: &str) -> String {
    format!("{root}/lock/refill-slot/")
}

/// Lock prefix of a source's instance count (writer only; held by creates).
pub fn source_lock(root: &str, sid: &str) -> String {
    format!("{root}/lock/source/{}/", ids::encode(sid))
}

/// Lock prefix of one (challenge, source) instance slot (writer only).
pub fn instance_lock(root: &str, cid: &str, sid: &str) -> String {
    format!(
        "{root}/lock/instance/{}/{}/",
        ids::encode(cid),
        ids::encode(sid)
    )
}

/// Lock prefix of one deployed identity (writer only): every transition of
/// that instance takes it (claim from the pool, update, refill's destroy,
/// reset, delete, expiry), so one identity never has two Pulumi runs or two
/// owners at once. A claim without Pulumi does not take it; it checks in its
/// transaction that no key exists under it (see `Store::claim_pooled`).
pub fn identity_lock(root: &str, cid: &str, identity: &crate::Identity) -> String {
    format!("{root}/lock/identity/{}/{identity}/", ids::encode(cid))
}

//! The shared library of the api, worker and janitor: the domain model, the
//! etcd store and locks, the wire protocol and the telemetry setup.
//!
//! # Layout
//! - [`archive`]: scenario file rules (safe paths, links, sizes) and tar(.gz).
//! - [`config`]: the NATS/etcd options every binary shares (addresses,
//!   credentials, TLS files).
//! - [`error`]: [`DomainError`], one case per domain situation, with a
//!   client-safe message and its wire form.
//! - [`ids`]: validation of user ids and their encoding into subjects and keys.
//! - [`identity`]: the random 16-hex-character names of deployed infrastructure.
//! - [`metrics`]: the metric names and the `/metrics` endpoint.
//! - [`nats`]: connecting to NATS with authentication and TLS.
//! - [`model`]: challenge and instance records, the `until` rules.
//! - [`store`]: the etcd store (revision-guarded transactions).
//! - [`etcd_endpoints`]: requests kept off etcd members that do not answer.
//! - [`lock`]: leases and reader/writer locks on etcd.
//! - [`lock_keys`]: where each lock lives in etcd (shared with the store's claim guard).
//! - [`oci`]: scenarios in OCI registries (chall-manager's layout): pull, inspect, push.
//! - [`scenario_ref`]: what a challenge's `scenario` names (directory, OCI, upload).
//! - [`scenario_store`]: uploaded scenario archives in the JetStream object store.
//! - [`protocol`]: every wire contract (command envelope, reply routing,
//!   operation records, events, dead letters, streams); [`queue`] is its
//!   former name, kept for the test suites and the bench.
//! - [`secret`]: a wrapper that keeps secrets (passphrases, tokens) out of logs.
//! - [`shutdown`]: SIGINT/SIGTERM handling (graceful, then immediate).
//! - [`stack_store`]: Pulumi stack states in the JetStream object store.
//! - [`telemetry`]: logging/tracing setup, one function returning a guard.
//! - [`tools`]: finding `pulumi` and `go`, with the setup hint when missing.

pub mod archive;
pub mod config;
pub mod error;
pub mod etcd_endpoints;
pub mod identity;
pub mod ids;
pub mod lock;
pub mod lock_keys;
pub mod metrics;
pub mod model;
pub mod nats;
pub mod object_read;
pub mod oci;
pub mod pool_demand;
pub mod protocol;
pub mod scenario_ref;
pub mod scenario_store;
pub mod secret;
pub mod shutdown;
pub mod stack_store;
pub mod store;
pub mod telemetry;
pub mod tools;

pub use error::DomainError;
pub use identity::Identity;
/// The former name of [`protocol`].
pub use protocol as queue;
pub use secret::Secret;

//! The shared library of the api, worker and janitor: the domain model, the
//! etcd store and the telemetry setup.
//!
//! # Layout
//! - [`identity`]: the random 16-hex-character names of deployed infrastructure.
//! - [`secret`]: a wrapper that keeps secrets (passphrases, tokens) out of logs.
//! - [`telemetry`]: logging/tracing setup, one function returning a guard.
//! - [`tools`]: finding `pulumi` and `go`, with the setup hint when missing.

pub mod identity;
pub mod secret;
pub mod telemetry;
pub mod tools;

pub use identity::Identity;
pub use secret::Secret;

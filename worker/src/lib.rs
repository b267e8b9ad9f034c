//! The worker: consumes commands from JetStream, takes etcd locks, runs
//! Pulumi and writes records and results back.
//!
//! # Layout
//! - [`pulumi`]: the Pulumi driver (scratch workspaces, compile cache,
//!   outputs and secrets), the only place that runs the CLI.

pub mod pulumi;

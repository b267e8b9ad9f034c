//! Test support: finds the real tools and starts real servers for a test.
//!
//! A test that needs a tool which is missing **panics** with the setup
//! command; nothing here skips. Servers listen on loopback ports chosen by the
//! OS (read back from the server, never guessed), keep their data in a
//! per-test temporary directory, and are killed when dropped.
//!
//! # Layout
//! - [`pulumi`], [`go`]: the real Pulumi CLI and Go toolchain.
//! - [`plugin`]: the project's own provider plugins (`providers/`), built.
//! - [`server`]: `nats-server` (JetStream on) and `etcd` processes, plain or
//!   with TLS and authentication.
//! - [`cluster`]: a nats-server cluster with JetStream and an etcd cluster,
//!   members killed and started again one by one.
//! - [`pki`]: a CA, server and client certificates generated per test.
//! - [`registry`]: a real OCI registry (`docker-registry`), optionally with
//!   htpasswd authentication.
//! - [`wait`]: an API healthy, the workers' queue drained.
//! - [`workspace_root`], [`example`]: paths into this repository.

pub mod cluster;
pub mod pki;
pub mod plugin;
pub mod registry;
pub mod server;
pub mod wait;

use std::path::PathBuf;

use cm_core::tools;

pub use plugin::provider_plugin;

/// The real `pulumi` CLI; panics with the setup command when it is missing.
pub fn pulumi() -> PathBuf {
    match tools::find_pulumi(None) {
        Ok(p) => p,
        Err(e) => panic!("this test needs the real Pulumi CLI: {e}"),
    }
}

/// The real Go toolchain; panics with the setup command when it is missing.
pub fn go() -> PathBuf {
    match tools::find_go(None) {
        Ok(p) => p,
        Err(e) => panic!("this test needs Go: {e}"),
    }
}

/// The repository root (the Cargo workspace).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// `examples/<name>`, checked to exist.
pub fn example(name: &str) -> PathBuf {
    let dir = workspace_root().join("examples").join(name);
    assert!(
        dir.join("Pulumi.yaml").is_file(),
        "example scenario {} is missing",
        dir.display()
    );
    dir
}

/// A per-test cache directory for the worker (compiled scenarios, scratch).
///
/// Compiled scenarios are shared between the tests of one run through
/// `CM_TEST_CACHE_DIR` when set, so each example is compiled once.
pub fn worker_cache() -> (Option<tempfile::TempDir>, PathBuf) {
    if let Some(dir) = std::env::var_os("CM_TEST_CACHE_DIR") {
        return (None, PathBuf::from(dir));
    }
    let dir = tempfile::Builder::new()
        .prefix("cm-test-cache-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
    let path = dir.path().to_owned();
    (Some(dir), path)
}

//! The project's own Pulumi provider plugins (`providers/<name>/`, Go
//! modules), as `scripts/install-providers.sh` builds them: the binary
//! `pulumi-resource-<name>` beside `pulumi`, with a `.sha256` stamp holding
//! the digest of the sources it was built from.
//!
//! A test that deploys a scenario using such a provider calls
//! [`provider_plugin`] first, so that a missing or stale build fails with the
//! command to run instead of a Pulumi error deep in a worker log.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The built plugin `pulumi-resource-<name>` beside the test's `pulumi`;
/// panics with the install command when it is missing or was built from
/// other sources than `providers/<name>`.
pub fn provider_plugin(name: &str) -> PathBuf {
    let pulumi = crate::pulumi();
    let bin_dir = pulumi.parent().map(Path::to_path_buf).unwrap_or_default();
    let binary = bin_dir.join(format!("pulumi-resource-{name}"));
    let hint = "run `scripts/install-providers.sh` (or `scripts/dev.sh install`)";
    if !binary.is_file() {
        panic!(
            "this test needs the provider plugin {} (built from providers/{name}) beside {}: {hint}",
            binary.display(),
            pulumi.display()
        );
    }
    let sources = crate::workspace_root().join("providers").join(name);
    let want = source_digest(&sources)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", sources.display()));
    let stamp = binary.with_file_name(format!("pulumi-resource-{name}.sha256"));
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if have.trim() != want {
        panic!(
            "the provider plugin {} is stale (stamp {} does not match providers/{name}): {hint}",
            binary.display(),
            stamp.display()
        );
    }
    binary
}

/// The digest `scripts/install-providers.sh` stamps: SHA-256 over the lines
/// `<sha256 of file>  ./<path>` of the module's Go sources (tests excluded),
/// `go.mod` and `go.sum`, sorted by path bytewise.
pub fn source_digest(dir: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    collect(dir, Path::new("."), &mut files)?;
    files.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    let mut listing = Sha256::new();
    for rel in files {
        let content = std::fs::read(dir.join(&rel))?;
        let line = format!(
            "{}  {}\n",
            hex::encode(Sha256::digest(&content)),
            rel.display()
        );
        listing.update(line.as_bytes());
    }
    Ok(hex::encode(listing.finalize()))
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let rel = rel.join(entry.file_name());
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() {
            collect(root, &rel, out)?;
        } else if kind.is_file()
            && ((name.ends_with(".go") && !name.ends_with("_test.go"))
                || name == "go.mod"
                || name == "go.sum")
        {
            out.push(rel);
        }
    }
    Ok(())
}

//! OCI references: `registry[:port]/repository[:tag][@sha256:<hex>]`.
//!
//! The registry is always named (there is no implicit `docker.io`): a
//! reference's first segment holds a `.` or a `:`, or is `localhost`. That is
//! also how a scenario reference is told apart from a directory name. The
//! grammar is the distribution project's: repository components of lowercase
//! letters and digits joined by `.`, `_`, `__` or dashes, tags of up to 128
//! word characters, dots and dashes, sha256 digests only.

use std::fmt;

/// A parsed OCI reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `path/to/repo`.
    pub repository: String,
    /// The tag, if named.
    pub tag: Option<String>,
    /// `sha256:<hex>`, if named; it wins over the tag when pulling.
    pub digest: Option<String>,
}

/// Why a string is not an OCI reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("{0:?} names no registry (expected registry/repository[:tag][@sha256:digest])")]
    NoRegistry(String),
    #[error("registry {0:?} is not a valid host[:port]")]
    BadRegistry(String),
    #[error(
        "repository {0:?} is invalid (lowercase letters, digits and '.', '_', '-' separators, '/' between components)"
    )]
    BadRepository(String),
    #[error(
        "tag {0:?} is invalid (1-128 letters, digits, '_', '.', '-', not starting with '.' or '-')"
    )]
    BadTag(String),
    #[error("digest {0:?} is invalid (expected sha256: and 64 lowercase hex digits)")]
    BadDigest(String),
    #[error("reference is longer than 512 bytes")]
    TooLong,
}

/// Whether `s` is meant as an OCI reference (rather than a directory):
/// it has a `/` and its first segment looks like a registry host.
pub fn looks_like_reference(s: &str) -> bool {
    match s.split_once('/') {
        Some((first, _)) => first.contains(['.', ':']) || first == "localhost",
        None => false,
    }
}

impl Reference {
    /// Parses a reference.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.len() > 512 {
            return Err(ReferenceError::TooLong);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                if !is_digest(digest) {
                    return Err(ReferenceError::BadDigest(digest.to_owned()));
                }
                (rest, Some(digest.to_owned()))
            }
            None => (s, None),
        };
        let Some((registry, path)) = rest.split_once('/') else {
            return Err(ReferenceError::NoRegistry(s.to_owned()));
        };
        if !(registry.contains(['.', ':']) || registry == "localhost") {
            return Err(ReferenceError::NoRegistry(s.to_owned()));
        }
        if !is_registry(registry) {
            return Err(ReferenceError::BadRegistry(registry.to_owned()));
        }
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&path[..i], Some(path[i + 1..].to_owned()))
            }
            None => (path, None),
        };
        if !is_repository(repository) || registry.len() + 1 + repository.len() > 255 {
            return Err(ReferenceError::BadRepository(repository.to_owned()));
        }
        if let Some(tag) = &tag
            && !is_tag(tag)
        {
            return Err(ReferenceError::BadTag(tag.clone()));
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when
    /// named, else the tag, else `latest`.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The tag to push under (`latest` when none is named).
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `sha256:` and 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn is_registry(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    port_ok && host_ok
}

fn is_repository(s: &str) -> bool {
    !s.is_empty() && s.split('/').all(is_path_component)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or any number of "-".
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_tags_digests_and_both() {
        let r = Reference::parse("registry.example.org/ctf/web-1:v1").expect("tag");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.tag.as_deref(),
                r.digest.as_deref()
            ),
            ("registry.example.org", "ctf/web-1", Some("v1"), None)
        );
        assert_eq!(r.manifest_reference(), "v1");

        let r = Reference::parse(&format!("localhost:5000/a/b@{D}")).expect("digest");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b")
        );
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (None, Some(D)));
        assert_eq!(r.manifest_reference(), D);

        let s = format!("127.0.0.1:5000/scenario:latest@{D}");
        let r = Reference::parse(&s).expect("both");
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref()),
            (Some("latest"), Some(D))
        );
        assert_eq!(r.manifest_reference(), D, "the digest wins");
        assert_eq!(r.to_string(), s);

        let r = Reference::parse("localhost/x").expect("no tag");
        assert_eq!(
            (r.tag_or_latest(), r.manifest_reference()),
            ("latest", "latest")
        );
    }

    #[test]
    fn refuses_malformed_references_with_reasons() {
        for (bad, why) in [
            ("identity", "names no registry"),
            ("ctf/identity:v1", "names no registry"),
            ("registry.io/UPPER:v1", "repository"),
            ("registry.io/a//b", "repository"),
            ("registry.io/a..b", "repository"),
            ("registry.io/", "repository"),
            ("registry.io/a:", "tag"),
            ("registry.io/a:-x", "tag"),
            ("registry.io/a@sha256:abc", "digest"),
            ("registry.io/a@md5:0123", "digest"),
            ("reg_istry.io/a", "registry"),
            ("registry.io:99999x/a", "registry"),
        ] {
            let err = Reference::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tells_references_from_directories() {
        assert!(looks_like_reference("localhost:5000/x:v1"));
        assert!(looks_like_reference("localhost/x"));
        assert!(looks_like_reference("ghcr.io/ctfer-io/s:v1"));
        assert!(!looks_like_reference("identity"));
        assert!(!looks_like_reference("examples/identity"));
        assert!(!looks_like_reference("a:b"));
    }
}

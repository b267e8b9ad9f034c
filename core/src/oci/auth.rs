//! Registry credentials and the distribution auth handshake.
//!
//! A request goes out anonymously first. On `401` the registry's
//! `WWW-Authenticate` challenge says how to authenticate: `Basic` (send the
//! configured credentials) or `Bearer realm=...,service=...,scope=...` (ask
//! the realm for a token, with the credentials when there are any, and send
//! the token). The resulting `Authorization` value is remembered per
//! registry, repository and access, so later requests go through at once.
//!
//! Credentials come from `--oci-username`/`--oci-password` (offered to every
//! registry, as chall-manager's `OCI_USERNAME`/`OCI_PASSWORD` are) or from a
//! docker `config.json` (`auths`, per registry; wins for its registries).

use std::{collections::HashMap, path::Path};

use base64::Engine;
use serde::Deserialize;

use crate::Secret;

/// A username and password for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret<String>,
}

impl Credentials {
    /// The `Authorization: Basic` value.
    pub(crate) fn basic(&self) -> Secret<String> {
        let raw = format!("{}:{}", self.username, self.password.expose());
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }
}

/// Why a docker `config.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a docker config.json: {reason}")]
    Parse { path: String, reason: String },
}

/// Reads the `auths` of a docker `config.json`: registry -> credentials.
pub fn read_docker_config(path: &Path) -> Result<HashMap<String, Credentials>, DockerConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| DockerConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_docker_config(&text).map_err(|reason| DockerConfigError::Parse {
        path: shown,
        reason,
    })
}

fn parse_docker_config(text: &[u8]) -> Result<HashMap<String, Credentials>, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    // Errors name no value: the file holds secrets.
    let file: File = serde_json::from_slice(text).map_err(|e| format!("line {}", e.line()))?;
    let mut out = HashMap::new();
    for (key, entry) in file.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let creds = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| format!("the auth of {host} is not base64 of user:password"))?;
                let (user, pass) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("the auth of {host} is not user:password"))?;
                Credentials {
                    username: user.to_owned(),
                    password: Secret::new(pass.to_owned()),
                }
            }
            (_, Some(username), Some(password)) => Credentials {
                username,
                password: Secret::new(password),
            },
            _ => continue,
        };
        out.insert(host, creds);
    }
    Ok(out)
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="...",service="...",scope="..."`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="value", key=value` pairs; quoted values may hold commas.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge("Basic realm=\"registry\""),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate x"), None);
        assert_eq!(
            parse_challenge("Bearer service=\"x\""),
            None,
            "a realm is required"
        );
    }

    #[test]
    fn docker_config_gives_per_registry_credentials() {
        let auth = base64::engine::general_purpose::STANDARD.encode("ann:s3cret:with-colon");
        let text = format!(
            r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{auth}"}},
               "other.example":{{"username":"bob","password":"pw"}},"empty.example":{{}}}}}}"#
        );
        let creds = parse_docker_config(text.as_bytes()).expect("parses");
        let ann = &creds["reg.example:5000"];
        assert_eq!(
            (ann.username.as_str(), ann.password.expose().as_str()),
            ("ann", "s3cret:with-colon")
        );
        assert_eq!(creds["other.example"].username, "bob");
        assert!(!creds.contains_key("empty.example"));
        let err = parse_docker_config(br#"{"auths":{"x":{"auth":"!!"}}}"#).expect_err("bad");
        assert!(!err.contains("!!"), "errors must not echo secrets: {err}");
    }
}

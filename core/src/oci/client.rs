//! A small client of the OCI distribution API (`/v2/...`) on `reqwest`:
//! manifests and blobs, pulled with every digest verified and every size
//! bounded, and pushed monolithically.
//!
//! HTTPS by default; plain HTTP only for the registries configured as
//! insecure (`localhost` is not implicitly insecure). Authentication follows
//! [`super::auth`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use sha2::{Digest, Sha256};

use super::{
    OciError, Reference,
    auth::{self, Challenge, Credentials},
    manifest::{self, Descriptor, Manifest},
};
use crate::{Secret, archive::Limits};

/// How the client reaches registries.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Credentials offered to every registry (unless `per_registry` has its own).
    pub credentials: Option<Credentials>,
    /// Credentials per registry (from a docker `config.json`).
    pub per_registry: HashMap<String, Credentials>,
    /// Size bounds on pulled scenarios.
    pub limits: Limits,
}

impl ClientConfig {
    fn credentials_for(&self, registry: &str) -> Option<&Credentials> {
        self.per_registry
            .get(registry)
            .or(self.credentials.as_ref())
    }

    fn is_insecure(&self, registry: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|r| r.trim().eq_ignore_ascii_case(registry))
    }
}

/// (registry, repository, actions) an `Authorization` value is good for.
type AuthKey = (String, String, &'static str);

/// A distribution API client. Cheap to clone (shared connection pool and
/// token cache).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    /// `Authorization` values by (registry, repository, actions).
    auth: Arc<Mutex<HashMap<AuthKey, Secret<String>>>>,
}

/// Access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
}

impl Access {
    fn actions(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "pull,push",
        }
    }
}

impl Client {
    /// A client with `config`.
    pub fn new(config: ClientConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("ctf-instancer/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            http,
            config: Arc::new(config),
            auth: Arc::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn scheme(&self, registry: &str) -> &'static str {
        if self.config.is_insecure(registry) {
            "http"
        } else {
            "https"
        }
    }

    /// `<scheme>://<registry>/v2/<repository>/<path>`.
    fn url(&self, r: &Reference, path: &str) -> String {
        format!(
            "{}://{}/v2/{}/{path}",
            self.scheme(&r.registry),
            r.registry,
            r.repository
        )
    }

    /// Sends a request built by `build`, authenticating when the registry
    /// asks to, once.
    pub(crate) async fn send(
        &self,
        r: &Reference,
        access: Access,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, OciError> {
        let key = (r.registry.clone(), r.repository.clone(), access.actions());
        let cached = self.auth.lock().ok().and_then(|m| m.get(&key).cloned());
        let mut request = build(&self.http);
        if let Some(value) = &cached {
            request = request.header(header::AUTHORIZATION, value.expose());
        }
        let response = request.send().await.map_err(|e| self.unreachable(r, &e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::parse_challenge);
        let Some(challenge) = challenge else {
            return Err(self.unauthorized(
                r,
                "it asks for an authentication scheme this client does not speak",
            ));
        };
        let value = self.authorize(r, access, &challenge).await?;
        let response = build(&self.http)
            .header(header::AUTHORIZATION, value.expose())
            .send()
            .await
            .map_err(|e| self.unreachable(r, &e))?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let reason = if self.config.credentials_for(&r.registry).is_some() {
                "the configured credentials were refused"
            } else {
                "it needs credentials and none are configured for it"
            };
            return Err(self.unauthorized(r, reason));
        }
        if let Ok(mut map) = self.auth.lock() {
            map.insert(key, value);
        }
        Ok(response)
    }

    /// The `Authorization` value answering `challenge`.
    async fn authorize(
        &self,
        r: &Reference,
        access: Access,
        challenge: &Challenge,
    ) -> Result<Secret<String>, OciError> {
        let credentials = self.config.credentials_for(&r.registry);
        match challenge {
            Challenge::Basic => credentials.map(Credentials::basic).ok_or_else(|| {
                self.unauthorized(r, "it needs credentials and none are configured for it")
            }),
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let wanted = format!("repository:{}:{}", r.repository, access.actions());
                let scope = match scope {
                    Some(s) if s.contains(&r.repository) => s.clone(),
                    _ => wanted,
                };
                let mut query = vec![("scope", scope.as_str())];
                if let Some(service) = service {
                    query.push(("service", service.as_str()));
                }
                let mut request = self.http.get(realm).query(&query);
                if let Some(c) = credentials {
                    request = request.header(header::AUTHORIZATION, c.basic().expose());
                }
                let response = request.send().await.map_err(|e| OciError::Unreachable {
                    registry: format!("{} (token service)", r.registry),
                    scheme: if realm.starts_with("http://") {
                        "HTTP"
                    } else {
                        "HTTPS"
                    },
                    reason: error_chain(&e),
                    hint: "",
                })?;
                if !response.status().is_success() {
                    return Err(self.unauthorized(
                        r,
                        &format!("its token service answered {}", response.status().as_u16()),
                    ));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let token: Token = response
                    .json()
                    .await
                    .map_err(|_| self.unauthorized(r, "its token service answered no token"))?;
                let token = token
                    .token
                    .or(token.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.unauthorized(r, "its token service answered no token"))?;
                Ok(Secret::new(format!("Bearer {token}")))
            }
        }
    }

    fn unauthorized(&self, r: &Reference, reason: &str) -> OciError {
        OciError::Unauthorized {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            reason: reason.to_owned(),
        }
    }

    fn unreachable(&self, r: &Reference, e: &reqwest::Error) -> OciError {
        let https = self.scheme(&r.registry) == "https";
        OciError::Unreachable {
            registry: r.registry.clone(),
            scheme: if https { "HTTPS" } else { "HTTP" },
            reason: error_chain(e),
            hint: if https {
                " (a registry serving plain HTTP must be listed in --oci-insecure-registries)"
            } else {
                ""
            },
        }
    }

    /// Fetches the manifest `r` names and verifies its digest (against the
    /// reference's digest, else the registry's `Docker-Content-Digest`).
    /// Returns `sha256:<hex>` of the manifest and the manifest.
    pub async fn manifest(&self, r: &Reference) -> Result<(String, Manifest), OciError> {
        let url = self.url(r, &format!("manifests/{}", r.manifest_reference()));
        let response = self
            .send(r, Access::Pull, |http| {
                http.get(&url).header(header::ACCEPT, manifest::ACCEPT)
            })
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(OciError::NotFound {
                reference: r.to_string(),
            });
        }
        let response = self.check_status(r, response).await?;
        let content_type = header_str(&response, header::CONTENT_TYPE.as_str());
        let announced = header_str(&response, "docker-content-digest");
        let body = read_bounded(response, manifest::MAX_MANIFEST, "the manifest", r).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let expected = r
            .digest
            .clone()
            .or(announced.filter(|d| d.starts_with("sha256:")));
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(OciError::DigestMismatch {
                what: format!("the manifest of {r}"),
                expected,
                actual: digest,
            });
        }
        let manifest = manifest::parse(&r.to_string(), content_type.as_deref(), &body)?;
        Ok((digest, manifest))
    }

    /// Streams the blob `descriptor` names into `out`, verifying its size
    /// (at most `descriptor.size`) and digest.
    pub async fn blob_to(
        &self,
        r: &Reference,
        descriptor: &Descriptor,
        what: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), OciError> {
        use tokio::io::AsyncWriteExt;
        let url = self.url(r, &format!("blobs/{}", descriptor.digest));
        let response = self.send(r, Access::Pull, |http| http.get(&url)).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(OciError::layout(
                r,
                format!(
                    "{what}: blob {} is missing from the registry",
                    descriptor.digest
                ),
            ));
        }
        let mut response = self.check_status(r, response).await?;
        let mut hasher = Sha256::new();
        let mut read: u64 = 0;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.unreachable(r, &e))?
        {
            read += chunk.len() as u64;
            if read > descriptor.size {
                return Err(OciError::layout(
                    r,
                    format!(
                        "{what} is longer than the {} bytes its descriptor says",
                        descriptor.size
                    ),
                ));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(|e| {
                OciError::Archive(crate::archive::ArchiveError::Io {
                    action: "writing",
                    path: what.into(),
                    source: e,
                })
            })?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if read != descriptor.size || actual != descriptor.digest {
            return Err(OciError::DigestMismatch {
                what: what.to_owned(),
                expected: format!("{} ({} bytes)", descriptor.digest, descriptor.size),
                actual: format!("{actual} ({read} bytes)"),
            });
        }
        out.flush().await.map_err(|e| {
            OciError::Archive(crate::archive::ArchiveError::Io {
                action: "writing",
                path: what.into(),
                source: e,
            })
        })
    }

    /// Uploads `data` as a blob unless the registry has it; its descriptor.
    pub async fn push_blob(
        &self,
        r: &Reference,
        media_type: &str,
        data: bytes::Bytes,
    ) -> Result<Descriptor, OciError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let descriptor = Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.clone(),
            size: data.len() as u64,
            data: None,
            annotations: Default::default(),
        };
        let head = self.url(r, &format!("blobs/{digest}"));
        let exists = self.send(r, Access::Push, |http| http.head(&head)).await?;
        if exists.status().is_success() {
            return Ok(descriptor);
        }
        let start = self.url(r, "blobs/uploads/");
        let started = self.send(r, Access::Push, |http| http.post(&start)).await?;
        let started = self.check_status(r, started).await?;
        let location =
            header_str(&started, header::LOCATION.as_str()).ok_or_else(|| OciError::Registry {
                registry: r.registry.clone(),
                status: started.status().as_u16(),
                detail: ": the upload has no Location".into(),
            })?;
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            format!("{}://{}{location}", self.scheme(&r.registry), r.registry)
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={digest}");
        let done = self
            .send(r, Access::Push, |http| {
                http.request(Method::PUT, &put)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(data.clone())
            })
            .await?;
        self.check_status(r, done).await?;
        Ok(descriptor)
    }

    /// Uploads a manifest under `r`'s tag; the manifest's digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        body: bytes::Bytes,
    ) -> Result<String, OciError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if let Some(expected) = &r.digest
            && *expected != digest
        {
            return Err(OciError::DigestMismatch {
                what: format!("the manifest pushed to {r}"),
                expected: expected.clone(),
                actual: digest,
            });
        }
        let url = self.url(r, &format!("manifests/{}", r.tag_or_latest()));
        let response = self
            .send(r, Access::Push, |http| {
                http.put(&url)
                    .header(header::CONTENT_TYPE, manifest::IMAGE_MANIFEST)
                    .body(body.clone())
            })
            .await?;
        self.check_status(r, response).await?;
        Ok(digest)
    }

    /// Passes a success through; turns anything else into an error with the
    /// registry's own error codes.
    async fn check_status(&self, r: &Reference, response: Response) -> Result<Response, OciError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_bounded(response, 64 * 1024, "an error", r)
            .await
            .unwrap_or_default();
        let detail = registry_errors(&body);
        if status == StatusCode::FORBIDDEN {
            return Err(self.unauthorized(r, &format!("access denied{detail}")));
        }
        Err(OciError::Registry {
            registry: r.registry.clone(),
            status: status.as_u16(),
            detail,
        })
    }
}

/// `: CODE message; CODE message` from a distribution error body.
fn registry_errors(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => {
            let items: Vec<String> = e
                .errors
                .iter()
                .map(|i| format!("{} {}", i.code, i.message).trim().to_owned())
                .collect();
            format!(": {}", items.join("; "))
        }
        _ => String::new(),
    }
}

fn header_str(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Reads a body of at most `max` bytes.
async fn read_bounded(
    mut response: Response,
    max: u64,
    what: &str,
    r: &Reference,
) -> Result<Vec<u8>, OciError> {
    if response.content_length().is_some_and(|n| n > max) {
        return Err(OciError::layout(
            r,
            format!("{what} is larger than {max} bytes"),
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| OciError::Unreachable {
        registry: r.registry.clone(),
        scheme: "HTTP(S)",
        reason: error_chain(&e),
        hint: "",
    })? {
        if body.len() as u64 + chunk.len() as u64 > max {
            return Err(OciError::layout(
                r,
                format!("{what} is larger than {max} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its causes, `: `-joined (reqwest's own message is terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

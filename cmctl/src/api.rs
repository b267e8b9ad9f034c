//! The REST client: chall-manager's `/api/v1/...` routes as `cm-api` serves
//! them (see `api/src/rest.rs`), with grpc-gateway's error body
//! `{"code", "message"}` turned into a [`CliError`] carrying the API's own
//! message and an exit code from the HTTP status.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use crate::error::CliError;

/// The answer to a write.
#[derive(Debug)]
pub enum Written {
    /// The worker's result.
    Done(Value),
    /// Accepted without waiting (`--async`): the operation to poll.
    Accepted { operation_id: String },
}

/// How cmctl proves who it is to the API: a bearer token, a private CA to
/// trust, a client certificate (mutual TLS).
#[derive(Debug, Default, Clone)]
pub struct ApiAccess {
    pub token: Option<cm_core::Secret<String>>,
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate chain then key, PEM.
    pub identity_pem: Option<cm_core::Secret<Vec<u8>>>,
}

impl ApiAccess {
    /// From the global flags: files read now, so a missing one is a usage error.
    pub fn from_flags(global: &crate::global::Global) -> Result<Self, CliError> {
        let usage = |e: cm_core::config::ConfigError| CliError::Usage(e.to_string());
        if global.api_token.is_some() && global.api_token_file.is_some() {
            return Err(CliError::Usage(
                "give --api-token or --api-token-file, not both".into(),
            ));
        }
        let token = match (&global.api_token, &global.api_token_file) {
            (Some(t), _) => Some(t.clone()).filter(|t| !t.expose().is_empty()),
            (None, Some(path)) => {
                Some(cm_core::config::read_secret("--api-token-file", path).map_err(usage)?)
            }
            (None, None) => None,
        };
        let ca_pem = global
            .api_ca
            .as_deref()
            .map(|p| cm_core::config::read_file("--api-ca", p))
            .transpose()
            .map_err(usage)?;
        let identity_pem = match (&global.api_cert, &global.api_key) {
            (Some(cert), Some(key)) => {
                let mut pem = cm_core::config::read_file("--api-cert", cert).map_err(usage)?;
                pem.push(b'\n');
                pem.extend(cm_core::config::read_file("--api-key", key).map_err(usage)?);
                Some(cm_core::Secret::new(pem))
            }
            (None, None) => None,
            _ => {
                return Err(CliError::Usage(
                    "--api-cert and --api-key go together".into(),
                ));
            }
        };
        Ok(Self {
            token,
            ca_pem,
            identity_pem,
        })
    }
}

/// A client of one API base URL.
#[derive(Debug, Clone)]
pub struct Api {
    base: Url,
    http: reqwest::Client,
    timeout: Duration,
}

impl Api {
    /// A client of `base` (`http(s)://host:port`) with `access`'s token and
    /// TLS material; every call gives up after `timeout`.
    pub fn new(base: &str, timeout: Duration, access: &ApiAccess) -> Result<Self, CliError> {
        let base = Url::parse(base)
            .map_err(|e| CliError::Usage(format!("--api-url {base:?} is not a URL: {e}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(CliError::Usage(format!(
                "--api-url {base} must be an http:// or https:// URL"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("cmctl/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &access.token {
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .map_err(|_| {
                        CliError::Usage("the API token holds characters a header cannot".into())
                    })?;
            value.set_sensitive(true);
            builder = builder.default_headers(reqwest::header::HeaderMap::from_iter([(
                reqwest::header::AUTHORIZATION,
                value,
            )]));
        }
        if let Some(ca) = &access.ca_pem {
            // reqwest accepts a file with no certificate in it, silently.
            if !String::from_utf8_lossy(ca).contains("-----BEGIN CERTIFICATE-----") {
                return Err(CliError::Usage(
                    "--api-ca holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                ));
            }
            let cert = reqwest::Certificate::from_pem(ca)
                .map_err(|e| CliError::Usage(format!("--api-ca: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some(identity) = &access.identity_pem {
            let identity = reqwest::Identity::from_pem(identity.expose())
                .map_err(|e| CliError::Usage(format!("--api-cert/--api-key: {e}")))?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Usage(format!("HTTP client: {e}")))?;
        Ok(Self {
            base,
            http,
            timeout,
        })
    }

    /// `base` + path segments, each percent-encoded (ids are user data).
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        respond_async: bool,
    ) -> Result<(StatusCode, String), CliError> {
        tracing::debug!(%method, %url, "request");
        let mut req = self.http.request(method, url);
        if let Some(body) = body {
            req = req.json(body);
        }
        if respond_async {
            req = req.header("Prefer", "respond-async");
        }
        let resp = req.send().await.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.transport(&e))?;
        tracing::debug!(status = status.as_u16(), "response");
        if status.is_success() {
            Ok((status, text))
        } else {
            Err(api_error(status, &text))
        }
    }

    fn transport(&self, e: &reqwest::Error) -> CliError {
        let root = root_cause(e);
        if e.is_timeout() {
            CliError::TimedOut(format!(
                "no answer from the API at {} within {} (--timeout)",
                self.base,
                humantime::format_duration(self.timeout)
            ))
        } else if e.is_connect() {
            CliError::Unavailable(format!("cannot reach the API at {}: {root}", self.base))
        } else {
            CliError::Unavailable(format!("API at {}: {root}", self.base))
        }
    }

    /// Sends a raw body (an archive), answering the JSON document.
    pub async fn post_bytes(
        &self,
        method: Method,
        segments: &[&str],
        body: Vec<u8>,
    ) -> Result<Value, CliError> {
        let resp = self
            .http
            .request(method, self.url(segments, &[]))
            .header("content-type", "application/gzip")
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.transport(&e))?;
        if !status.is_success() {
            return Err(api_error(status, &text));
        }
        parse(&text)
    }

    /// `GET` one JSON document.
    pub async fn get(&self, segments: &[&str]) -> Result<Value, CliError> {
        let (_, text) = self
            .send(Method::GET, self.url(segments, &[]), None, false)
            .await?;
        parse(&text)
    }

    /// `GET` a streamed list: one `{"result": ...}` object per line.
    pub async fn list(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Vec<Value>, CliError> {
        let (_, text) = self
            .send(Method::GET, self.url(segments, query), None, false)
            .await?;
        let mut items = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut item = parse(line)?;
            if let Some(error) = item.get("error") {
                return Err(CliError::Unavailable(format!(
                    "the API broke off the list: {}",
                    message_of(error).unwrap_or("no message")
                )));
            }
            match item.get_mut("result").map(Value::take) {
                Some(result) => items.push(result),
                None => {
                    return Err(CliError::Unavailable(
                        "the API answered a list line without a result".into(),
                    ));
                }
            }
        }
        Ok(items)
    }

    /// A write (`POST`, `PATCH`, `DELETE`): waits for the worker's result,
    /// or with `respond_async` returns the operation to poll.
    pub async fn write(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        respond_async: bool,
    ) -> Result<Written, CliError> {
        self.write_query(method, segments, &[], body, respond_async)
            .await
    }

    /// [`Api::write`] with query parameters.
    pub async fn write_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
        respond_async: bool,
    ) -> Result<Written, CliError> {
        let (status, text) = self
            .send(method, self.url(segments, query), body, respond_async)
            .await?;
        let value = parse(&text)?;
        if status == StatusCode::ACCEPTED {
            let operation_id = value
                .get("operationId")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    CliError::Unavailable("the API accepted without an operation id".into())
                })?
                .to_owned();
            return Ok(Written::Accepted { operation_id });
        }
        Ok(Written::Done(value))
    }
}

fn parse(text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text)
        .map_err(|e| CliError::Unavailable(format!("the API answered something not JSON: {e}")))
}

fn message_of(error: &Value) -> Option<&str> {
    error.get("message").and_then(Value::as_str)
}

/// grpc-gateway's error body to an error carrying the API's message.
fn api_error(status: StatusCode, text: &str) -> CliError {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let message = match parsed.as_ref().and_then(message_of) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => {
            let snippet: String = text.chars().take(200).collect();
            let snippet = snippet.split_whitespace().collect::<Vec<_>>().join(" ");
            let reason = status.canonical_reason().unwrap_or("error");
            if snippet.is_empty() {
                reason.to_owned()
            } else {
                format!("{reason}: {snippet}")
            }
        }
    };
    CliError::Api {
        status: status.as_u16(),
        message: message.replace(['\r', '\n'], " "),
    }
}

/// The innermost error of a chain ("Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_percent_encoded_path_segments() {
        let api = Api::new(
            "http://127.0.0.1:8080/",
            Duration::from_secs(1),
            &ApiAccess::default(),
        )
        .expect("api");
        let url = api.url(&["api", "v1", "instance", "web 1", "a?b#c"], &[]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/api/v1/instance/web%201/a%3Fb%23c"
        );
        let url = api.url(&["api", "v1", "instance"], &[("sourceId", "a b&c")]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/api/v1/instance?sourceId=a+b%26c"
        );
    }

    #[test]
    fn api_errors_carry_the_apis_message() {
        let e = api_error(
            StatusCode::NOT_FOUND,
            r#"{"code":5,"message":"challenge x not found","details":[]}"#,
        );
        assert_eq!(e.to_string(), "challenge x not found (HTTP 404)");
        assert_eq!(e.exit_code(), 2);
        let e = api_error(StatusCode::BAD_GATEWAY, "<html>\n bad </html>");
        assert_eq!(e.to_string(), "Bad Gateway: <html> bad </html> (HTTP 502)");
    }
}

//! The command envelope: what a command is on the wire and the one way it is
//! minted and published, by the API, by the worker's follow-up commands and
//! by the janitor.
//!
//! A command is a protobuf [`Command`] (id, issue time, requester, request)
//! on `cm.cmd.<kind>.<encoded challenge id>` with the headers
//! - `Nats-Msg-Id`: the command id (JetStream de-duplication), or an id the
//!   issuer derives from what the command is about (the janitor's expiry,
//!   the worker's undo of a lost create);
//! - `cm-reply`: where a waiter hears the result (see [`super::reply`]);
//! - `traceparent` / `tracestate`: the issuer's W3C trace context.
//!
//! A client's `Idempotency-Key` makes the command id a uuid v8 derived from
//! (caller, kind, target, key): [`keyed_command_id`].
//!
//! Owns: subjects of commands, the envelope's headers, command ids, trace
//! propagation in headers, decoding a delivered command. Must not know: the
//! store, operation records, how a waiter waits, or what a handler does.

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishAckFuture, publish::PublishAck},
};
use bytes::Bytes;
use cm_schemas::{
    v1::{Command, Requester, command::Request},
    wkt::Timestamp,
};
use opentelemetry::propagation::{Extractor, Injector};
use prost::Message as _;

use super::reply::HDR_REPLY;
use crate::{DomainError, ids, model::now};

/// JetStream de-duplication header.
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";

/// Command kinds, as they appear in subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    ChallengeCreate,
    ChallengeUpdate,
    ChallengeDelete,
    InstanceCreate,
    InstanceRenew,
    InstanceDelete,
    InstanceExpire,
    InstanceReset,
    InstanceUpdate,
    PoolRefill,
    StackReclaim,
}

impl CommandKind {
    /// Every kind.
    pub const ALL: [CommandKind; 11] = [
        Self::ChallengeCreate,
        Self::ChallengeUpdate,
        Self::ChallengeDelete,
        Self::InstanceCreate,
        Self::InstanceRenew,
        Self::InstanceDelete,
        Self::InstanceExpire,
        Self::InstanceReset,
        Self::InstanceUpdate,
        Self::PoolRefill,
        Self::StackReclaim,
    ];

    /// The kind as a subject fragment (`instance.create`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChallengeCreate => "challenge.create",
            Self::ChallengeUpdate => "challenge.update",
            Self::ChallengeDelete => "challenge.delete",
            Self::InstanceCreate => "instance.create",
            Self::InstanceRenew => "instance.renew",
            Self::InstanceDelete => "instance.delete",
            Self::InstanceExpire => "instance.expire",
            Self::InstanceReset => "instance.reset",
            Self::InstanceUpdate => "instance.update",
            Self::PoolRefill => "pool.refill",
            Self::StackReclaim => "stack.reclaim",
        }
    }

    /// The kind of a command's request, with the challenge it is about.
    pub fn of(request: &Request) -> (Self, &str) {
        match request {
            Request::ChallengeCreate(r) => (Self::ChallengeCreate, &r.id),
            Request::ChallengeUpdate(r) => (Self::ChallengeUpdate, &r.id),
            Request::ChallengeDelete(r) => (Self::ChallengeDelete, &r.id),
            Request::InstanceCreate(r) => (Self::InstanceCreate, &r.challenge_id),
            Request::InstanceRenew(r) => (Self::InstanceRenew, &r.challenge_id),
            Request::InstanceDelete(r) => (Self::InstanceDelete, &r.challenge_id),
            Request::InstanceExpire(r) => (Self::InstanceExpire, &r.challenge_id),
            Request::InstanceReset(r) => (Self::InstanceReset, &r.challenge_id),
            Request::InstanceUpdate(r) => (Self::InstanceUpdate, &r.challenge_id),
            Request::PoolRefill(r) => (Self::PoolRefill, &r.challenge_id),
            Request::StackReclaim(r) => (Self::StackReclaim, &r.challenge_id),
        }
    }
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `cm.cmd.<kind>.<challenge>`.
pub fn command_subject(kind: CommandKind, challenge_id: &str) -> String {
    format!("cm.cmd.{}.{}", kind.as_str(), ids::encode(challenge_id))
}

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The command id a client's `Idempotency-Key` stands for: a uuid v8 whose
/// bits are SHA-256 over the caller's principal, the command kind, its target
/// (challenge, and source for instance commands) and the key, each
/// length-prefixed. The same request retried with the same key is the same
/// command; the same key on another route, target or caller is not.
pub fn keyed_command_id(principal: &str, request: &Request, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let (kind, challenge_id) = CommandKind::of(request);
    let source_id = match request {
        Request::InstanceCreate(r) => r.source_id.as_str(),
        Request::InstanceRenew(r) => r.source_id.as_str(),
        Request::InstanceDelete(r) => r.source_id.as_str(),
        Request::InstanceReset(r) => r.source_id.as_str(),
        Request::InstanceExpire(r) => r.source_id.as_str(),
        _ => "",
    };
    let mut hash = Sha256::new();
    for part in [
        "cm-idempotency-v1",
        principal,
        kind.as_str(),
        challenge_id,
        source_id,
        key,
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Checks a client's `Idempotency-Key`: 1 to [`MAX_IDEMPOTENCY_KEY`]
/// visible ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), DomainError> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(DomainError::invalid(format!(
            "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        )));
    }
    Ok(())
}

/// The `Nats-Msg-Id` of the janitor's expiry of (challenge, source) at
/// `until`: every janitor that sees the same expiry derives the same id, so
/// JetStream keeps one copy.
pub fn expiry_msg_id(challenge_id: &str, source_id: &str, until: &Timestamp) -> String {
    format!(
        "expire:{}:{}:{}.{:09}",
        ids::encode(challenge_id),
        ids::encode(source_id),
        until.seconds,
        until.nanos
    )
}

/// The `Nats-Msg-Id` of the janitor's `stack.reclaim` of an orphaned
/// stack: the same from every janitor, so one copy is kept per dedupe
/// window however many sweeps see the orphan.
pub fn reclaim_msg_id(challenge_id: &str, identity: &crate::Identity) -> String {
    format!("reclaim:{}:{identity}", ids::encode(challenge_id))
}

/// Why a command could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The publish did not reach JetStream.
    #[error("not published: {0}")]
    Send(#[source] jetstream::context::PublishError),
    /// JetStream did not acknowledge it.
    #[error("not acknowledged: {0}")]
    Ack(#[source] jetstream::context::PublishError),
}

/// A command minted and ready to publish: its envelope and its headers.
#[derive(Debug, Clone)]
pub struct Outgoing {
    command: Command,
    kind: CommandKind,
    subject: String,
    msg_id: String,
    reply: Option<String>,
}

impl Outgoing {
    /// The command for `request` asked by `requester`: a fresh uuid v7 id,
    /// or, with an `Idempotency-Key`, the id that key stands for (refused
    /// when the key is malformed).
    pub fn new(request: Request, requester: Requester) -> Result<Self, DomainError> {
        let id = if requester.idempotency_key.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            validate_idempotency_key(&requester.idempotency_key)?;
            keyed_command_id(&requester.principal, &request, &requester.idempotency_key)
        };
        Ok(Self::with_id(id, request, requester))
    }

    /// A command a process issues itself (`via`: `worker`, `janitor`), for
    /// no principal, with a fresh id.
    pub fn internal(request: Request, via: &str) -> Self {
        let requester = Requester {
            principal: String::new(),
            via: via.to_owned(),
            ..Default::default()
        };
        Self::with_id(uuid::Uuid::now_v7().to_string(), request, requester)
    }

    fn with_id(command_id: String, request: Request, requester: Requester) -> Self {
        let (kind, challenge_id) = CommandKind::of(&request);
        let subject = command_subject(kind, challenge_id);
        Self {
            kind,
            msg_id: command_id.clone(),
            command: Command {
                command_id,
                issued_at: Some(now()),
                requested_by: Some(requester),
                request: Some(request),
            },
            subject,
            reply: None,
        }
    }

    /// De-duplicated by `msg_id` rather than by the command id: copies of
    /// one order published by several issuers count once.
    pub fn deduplicated_as(mut self, msg_id: String) -> Self {
        self.msg_id = msg_id;
        self
    }

    /// Its result is sent to `<prefix>.<command id>`.
    pub fn reply_to(mut self, prefix: &str) -> Self {
        self.reply = Some(super::reply::reply_subject(
            prefix,
            &self.command.command_id,
        ));
        self
    }

    pub fn command(&self) -> &Command {
        &self.command
    }

    pub fn id(&self) -> &str {
        &self.command.command_id
    }

    pub fn kind(&self) -> CommandKind {
        self.kind
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The envelope's headers, with the current span's trace context.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HDR_MSG_ID, self.msg_id.as_str());
        if let Some(reply) = &self.reply {
            headers.insert(HDR_REPLY, reply.as_str());
        }
        inject_trace_context(&mut headers);
        headers
    }

    /// Sends it; the acknowledgement is awaited by the caller (several
    /// publishes may be in flight at once).
    pub async fn send(&self, js: &jetstream::Context) -> Result<PublishAckFuture, PublishError> {
        let payload = Bytes::from(self.command.encode_to_vec());
        js.publish_with_headers(self.subject.clone(), self.headers(), payload)
            .await
            .map_err(PublishError::Send)
    }

    /// Sends it and waits for JetStream's acknowledgement.
    pub async fn publish(&self, js: &jetstream::Context) -> Result<PublishAck, PublishError> {
        self.send(js).await?.await.map_err(PublishError::Ack)
    }
}

/// Why a delivered message is not a command (it is dead-lettered at once).
#[derive(Debug, thiserror::Error)]
pub enum Undecodable {
    #[error("undecodable command: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("command without id or request")]
    Empty,
}

/// The command a delivered payload holds: decodable, with an id and a request.
pub fn decode_command(payload: Bytes) -> Result<Command, Undecodable> {
    match Command::decode(payload)? {
        c if c.request.is_some() && !c.command_id.is_empty() => Ok(c),
        _ => Err(Undecodable::Empty),
    }
}

// ---- trace context in headers -----------------------------------------------

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's W3C trace context (`traceparent`, `tracestate`)
/// into `headers`.
pub fn inject_trace_context(headers: &mut HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Reads a W3C trace context from `headers` (empty context when absent).
pub fn extract_trace_context(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) => {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)))
        }
        None => opentelemetry::Context::new(),
    }
}

#[cfg(test)]
mod tests {
    use cm_schemas::v1::{CreateInstanceRequest, DeleteInstanceRequest, RefillPool};

    use super::*;

    #[test]
    fn subjects_carry_encoded_ids() {
        assert_eq!(
            command_subject(CommandKind::InstanceCreate, "web.1 *"),
            "cm.cmd.instance.create.web~2E1~20~2A"
        );
    }

    #[test]
    fn an_envelope_carries_its_id_reply_and_subject() {
        let out = Outgoing::internal(
            Request::PoolRefill(RefillPool {
                challenge_id: "web.1".into(),
            }),
            "worker",
        )
        .reply_to("_INBOX.x");
        assert_eq!(out.subject(), "cm.cmd.pool.refill.web~2E1");
        let headers = out.headers();
        assert_eq!(headers.get(HDR_MSG_ID).map(|v| v.as_str()), Some(out.id()));
        let reply = format!("_INBOX.x.{}", out.id());
        assert_eq!(
            headers.get(HDR_REPLY).map(|v| v.as_str()),
            Some(reply.as_str())
        );
        let who = out.command().requested_by.clone().expect("requester");
        assert_eq!((who.principal.as_str(), who.via.as_str()), ("", "worker"));
        let back = decode_command(Bytes::from(out.command().encode_to_vec())).expect("decodes");
        assert_eq!(&back, out.command());
        let deduped = out.deduplicated_as("undo-1".into()).headers();
        assert_eq!(deduped.get(HDR_MSG_ID).map(|v| v.as_str()), Some("undo-1"));
    }

    #[test]
    fn an_expiry_is_named_by_what_expires() {
        let until = Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        };
        assert_eq!(
            expiry_msg_id("web.1", "team 7", &until),
            "expire:web~2E1:team~207:1700000000.000000005"
        );
    }

    #[test]
    fn a_key_makes_the_command_id() {
        let who = Requester {
            principal: "alice".into(),
            idempotency_key: "k".into(),
            ..Default::default()
        };
        let out = Outgoing::new(create("c", "s"), who).expect("valid key");
        assert_eq!(out.id(), keyed_command_id("alice", &create("c", "s"), "k"));
        let bad = Requester {
            idempotency_key: "has space".into(),
            ..Default::default()
        };
        assert!(Outgoing::new(create("c", "s"), bad).is_err());
    }

    #[test]
    fn what_is_not_a_command_says_why() {
        let empty = Command::default().encode_to_vec();
        assert_eq!(
            decode_command(Bytes::from(empty))
                .expect_err("empty")
                .to_string(),
            "command without id or request"
        );
        let garbage = decode_command(Bytes::from_static(b"\xff\xff"));
        assert!(
            garbage
                .expect_err("garbage")
                .to_string()
                .starts_with("undecodable command: ")
        );
    }

    fn create(cid: &str, sid: &str) -> Request {
        Request::InstanceCreate(CreateInstanceRequest {
            challenge_id: cid.into(),
            source_id: sid.into(),
            additional: Default::default(),
        })
    }

    #[test]
    fn a_key_names_one_command_per_caller_route_and_target() {
        let id = keyed_command_id("", &create("c", "s"), "k");
        assert_eq!(
            id,
            keyed_command_id("", &create("c", "s"), "k"),
            "deterministic"
        );
        let parsed = uuid::Uuid::parse_str(&id).expect("a uuid");
        assert_eq!(parsed.get_version_num(), 8);
        for other in [
            keyed_command_id("", &create("c", "s"), "k2"),
            keyed_command_id("alice", &create("c", "s"), "k"),
            keyed_command_id("", &create("c", "s2"), "k"),
            keyed_command_id("", &create("c2", "s"), "k"),
            keyed_command_id(
                "",
                &Request::InstanceDelete(DeleteInstanceRequest {
                    challenge_id: "c".into(),
                    source_id: "s".into(),
                    force: false,
                }),
                "k",
            ),
            // Parts are length-prefixed: no two splits of one string collide.
            keyed_command_id("", &create("cs", ""), "k"),
        ] {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(validate_idempotency_key("retry-1:abc").is_ok());
        for bad in ["", "has space", "tab\there", "é", &"x".repeat(256)] {
            assert!(validate_idempotency_key(bad).is_err(), "{bad:?}");
        }
    }
}

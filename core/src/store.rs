//! The etcd store: records under one root prefix, written in transactions
//! guarded by revision (compare-and-swap) so a retried command is idempotent.
//!
//! # Keys (ids encoded with [`crate::ids::encode`])
//! ```text
//! <root>/challenge/<cid>                    ChallengeRecord (JSON)
//! <root>/instance/<cid>/claimed/<sid>       InstanceRecord of a source's instance
//! <root>/instance/<cid>/pool/<identity>     InstanceRecord of a pooled instance
//! <root>/source/<sid>/<cid>                 copy of the claimed record (query by source: one read)
//! <root>/stack/<cid>/<identity>             Pulumi stack state (JSON, kept apart: reads stay light)
//! <root>/run/<cid>/<identity>               RunMarker: the lease a Pulumi run on the stack holds
//! <root>/operation/<command id>             OperationRecord (see `protocol::operation`)
//! <root>/expiry/<until>/<cid>/<sid>         identity of a claimed instance that expires at
//!                                           <until> (`<secs:020>.<nanos:09>`, so keys sort by
//!                                           time and the janitor reads only what has expired)
//! <root>/lock/...                           see `lock`
//! ```
//!
//! # Reads of whole prefixes
//! Lists are read in pages of [`Store::page_size`] keys, each page starting
//! after the last key of the one before and all pinned to the revision of the
//! first: one consistent snapshot however many records there are, and no
//! response near the gRPC message limit.
//!
//! # Operation records
//! Typed ([`OperationRecord`]): no raw bytes leave the store. An operation
//! settles once: [`Store::settle_operation`] writes a result only over
//! nothing or a pending record and otherwise hands back the record already
//! there, and [`Store::create_operation`] (the API's pending record) never
//! replaces anything.

use cm_schemas::wkt::Timestamp;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity as TlsIdentity,
    PutOptions, TlsOptions, Txn, TxnOp,
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    DomainError, Identity, ids,
    model::{ChallengeRecord, InstanceRecord, InstanceStatus},
    pool_demand::Demand,
    protocol::OperationRecord,
    stack_store::StatePointer,
};

/// What an instance's stack key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredStack {
    /// Where the state is in the object store (what every write stores).
    Pointer(StatePointer),
    /// The state itself, as releases before the object store wrote it: read
    /// as it is, replaced by a pointer at the stack's next write.
    Inline(Vec<u8>),
}

impl StoredStack {
    fn parse(key: &str, value: &[u8]) -> Result<Self, StoreError> {
        #[derive(serde::Deserialize)]
        struct Probe {
            object: Option<serde_json::Value>,
        }
        let probe: Probe = from_json(key, value)?;
        if probe.object.is_some() {
            from_json(key, value).map(Self::Pointer)
        } else {
            Ok(Self::Inline(value.to_vec()))
        }
    }

    /// The object this value points at, if it is a pointer.
    pub fn object(&self) -> Option<&str> {
        match self {
            Self::Pointer(p) => Some(&p.object),
            Self::Inline(_) => None,
        }
    }
}

/// Who runs (or last ran, without ending cleanly) Pulumi on a stack: the
/// lease its locks hang on and that lease's TTL. A holder that finds
/// another lease's marker waits until that lease's holder must have
/// stopped its run (see the worker's `run_marker`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunMarker {
    pub lease: i64,
    pub ttl_secs: u64,
}

/// A stack pointer to write, and the stack key's mod revision its writer
/// read (`over`; 0: the key was absent). The write applies only if the key
/// is still at that revision: a write etcd applies late (its answer lost
/// while a member still held the request) fails instead of landing over a
/// newer pointer, whose writer may already have removed the object the
/// late one names (see `stack_store`).
#[derive(Debug, Clone, Copy)]
pub struct PointerWrite<'a> {
    pub pointer: &'a StatePointer,
    pub over: i64,
}

impl PointerWrite<'_> {
    fn compare(&self, stack_key: &str) -> Compare {
        Compare::mod_revision(stack_key, CompareOp::Equal, self.over)
    }
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or refused the request; retry later.
    #[error("etcd unavailable: {0}")]
    Unavailable(etcd_client::Error),
    /// etcd refused a request over its size limit (`--max-request-bytes`,
    /// or the gRPC message limit): the same write fails every time.
    #[error("etcd refused a request too large for it: {0}")]
    TooLarge(etcd_client::Error),
    /// A stored value does not parse.
    #[error("record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A guarded write lost against a concurrent one.
    #[error("conflicting concurrent write on {key}")]
    Conflict { key: String },
    /// The writer's lock is gone (its lease expired or was revoked): another
    /// holder may own the record now, so this stale holder's write is refused.
    #[error("lock {key} lost; the write was refused")]
    Fenced { key: String },
    /// The first request after connecting failed: etcd is away, refused the
    /// TLS handshake or the credentials. `detail` is the whole error chain.
    #[error("cannot use etcd at {endpoints}: {detail}{hint}")]
    Connect {
        endpoints: String,
        detail: String,
        /// What to check, from the options used (may be empty).
        hint: &'static str,
        /// etcd refused the credentials or the configuration is invalid:
        /// retrying cannot help.
        permanent: bool,
    },
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        let too_large = matches!(&e, etcd_client::Error::GRpcStatus(s)
            if s.message().contains("request is too large")
                || s.message().contains("larger than max"));
        if too_large {
            Self::TooLarge(e)
        } else {
            Self::Unavailable(e)
        }
    }
}

impl StoreError {
    /// Whether retrying cannot help (credentials refused, bad configuration,
    /// a request over etcd's size limit).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Connect {
                permanent: true,
                ..
            } | Self::TooLarge(_)
        )
    }
}

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Connect { .. } => {
                DomainError::unavailable("the store is unavailable, retry later")
            }
            StoreError::Corrupt { .. } => DomainError::internal_error(),
            StoreError::TooLarge(_) => DomainError::new(
                cm_schemas::v1::Code::ResourceExhausted,
                "a record is too large for the store",
            ),
            StoreError::Conflict { .. } => DomainError::new(
                cm_schemas::v1::Code::Aborted,
                "a concurrent change won, retry",
            ),
            StoreError::Fenced { .. } => {
                DomainError::unavailable("the worker lost its lock, retry later")
            }
        }
    }
}

/// An entry of the expiry index.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub challenge_id: String,
    pub source_id: String,
    pub identity: Identity,
    pub until: Timestamp,
}

fn expiry_time(t: &Timestamp) -> String {
    format!(
        "{:020}.{:09}",
        t.seconds.max(0),
        t.nanos.clamp(0, 999_999_999)
    )
}

fn parse_expiry_time(s: &str) -> Option<Timestamp> {
    let (secs, nanos) = s.split_once('.')?;
    Some(Timestamp {
        seconds: secs.parse().ok()?,
        nanos: nanos.parse().ok()?,
    })
}

/// What the janitor's read of the expiry index found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpiredScan {
    /// Expired entries whose instance is still there as the entry says.
    pub live: Vec<Expired>,
    /// Stale entries deleted on the way.
    pub stale_removed: usize,
}

/// A value with the revision it was last modified at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// What a guarded write expects to find.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must still be at this modification revision.
    Revision(i64),
    /// No guard: the caller holds a lock that excludes concurrent writers.
    Any,
}

/// The locks a writer holds: each lock key with the revision it was created
/// at. A store [`Store::fenced`] by it adds, to every transaction it runs,
/// the comparison "each key still exists with that create revision": once a
/// lock is lost (lease expired or revoked, even if a new key of the same
/// name was made since), the holder's writes fail with
/// [`StoreError::Fenced`] instead of overwriting the next holder's work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fence {
    keys: Vec<(String, i64)>,
}

impl Fence {
    /// A fence on these `(key, create revision)` pairs.
    pub fn new(keys: Vec<(String, i64)>) -> Self {
        Self { keys }
    }

    /// This fence and `other`'s keys together.
    pub fn and(mut self, other: &Fence) -> Self {
        self.keys.extend(other.keys.iter().cloned());
        self
    }

    /// The fenced keys.
    pub fn keys(&self) -> &[(String, i64)] {
        &self.keys
    }
}

/// Connection options for etcd.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// `(user, password)` for etcd authentication. The auth token etcd hands
    /// out expires (simple tokens: `--auth-token-ttl`, 300 s by default, idle
    /// time; JWT: their `ttl`); a request refused with `invalid auth token`
    /// authenticates again and is retried once, so long-running workers
    /// outlive their tokens.
    pub user: Option<(String, crate::Secret<String>)>,
    /// TLS towards etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
    /// etcd's space quota (`--quota-backend-bytes`), when etcd does not
    /// report it (before 3.6); `None`: etcd's default, [`DEFAULT_ETCD_QUOTA`].
    pub quota_bytes: Option<i64>,
}

/// etcd's default space quota (2 GiB): past it, etcd raises its NOSPACE
/// alarm and refuses every write until compacted, defragmented and disarmed.
pub const DEFAULT_ETCD_QUOTA: i64 = 2 << 30;

/// etcd's space as one member reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpace {
    /// Size of the database file, bytes (what the quota is held against).
    pub db_size: i64,
    /// Bytes of it in use (the rest is free pages a defragmentation returns).
    pub db_size_in_use: i64,
    /// The quota: reported by etcd (3.6+) or configured.
    pub quota: i64,
    /// Raised alarms: `NOSPACE`, `CORRUPT`.
    pub alarms: Vec<&'static str>,
}

impl EtcdSpace {
    /// Whether etcd refuses writes for want of space.
    pub fn out_of_space(&self) -> bool {
        self.alarms.contains(&"NOSPACE")
    }
}

/// TLS material for etcd, read from the PEM files at startup.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// CA bundle the server certificate must chain to.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and its private key, for `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, crate::Secret<Vec<u8>>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.identity.is_some())
            .finish()
    }
}

/// Keys per page of a list read (see [`Store::with_page_size`]).
pub const DEFAULT_PAGE_SIZE: i64 = 500;

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    root: String,
    /// Keeps the client's requests off etcd members that do not answer
    /// (several endpoints only); shared by every clone of this store.
    _endpoints: Option<std::sync::Arc<crate::etcd_endpoints::Watch>>,
    /// Compared in every write transaction (empty: unfenced).
    fence: Fence,
    /// Keys per page of a list read.
    page_size: i64,
    /// etcd's space quota when etcd does not report it.
    quota: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `endpoints`; records live under `root` (e.g. `/cm`).
    pub async fn connect(
        endpoints: &[String],
        root: &str,
        options: &StoreOptions,
    ) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10))
            .with_keep_alive(
                std::time::Duration::from_secs(10),
                std::time::Duration::from_secs(5),
            );
        if let Some((user, password)) = &options.user {
            opts = opts
                .with_user(user.clone(), password.expose().clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &options.tls {
            let mut config = TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                config = config.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(TlsIdentity::from_pem(cert, key.expose()));
            }
            opts = opts.with_tls(config);
        }
        let failed = |e: etcd_client::Error| {
            let permanent = match &e {
                etcd_client::Error::GRpcStatus(status) => matches!(
                    cm_schemas::v1::Code::try_from(i32::from(status.code())),
                    Ok(cm_schemas::v1::Code::Unauthenticated
                        | cm_schemas::v1::Code::PermissionDenied
                        | cm_schemas::v1::Code::InvalidArgument)
                ),
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => true,
                _ => false,
            };
            let hint = match (&e, &options.tls, &options.user) {
                (etcd_client::Error::GRpcStatus(_), _, Some(_)) if permanent => {
                    "; check --etcd-user and --etcd-password"
                }
                (etcd_client::Error::GRpcStatus(_), _, None) if permanent => {
                    "; etcd has authentication on: give --etcd-user and --etcd-password"
                }
                (_, Some(_), _) if !permanent => {
                    "; over TLS, check --etcd-ca, and --etcd-cert/--etcd-key when etcd \
                     requires client certificates (--client-cert-auth)"
                }
                _ => "",
            };
            StoreError::Connect {
                endpoints: endpoints.join(","),
                detail: crate::error::chain(&e),
                hint,
                permanent,
            }
        };
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(failed)?;
        let mut store = Self::from_client(client, root);
        store.quota = options.quota_bytes.unwrap_or(DEFAULT_ETCD_QUOTA);
        store._endpoints =
            crate::etcd_endpoints::watch(&store.client, endpoints).map(std::sync::Arc::new);
        // The client connects lazily: one read now turns a refused TLS
        // handshake or missing permission into a startup error.
        store
            .client
            .kv_client()
            .get(
                store.root.as_str(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(failed)?;
        Ok(store)
    }

    /// Wraps an existing client.
    pub fn from_client(client: Client, root: &str) -> Self {
        Self {
            client,
            root: root.trim_end_matches('/').to_owned(),
            _endpoints: None,
            fence: Fence::default(),
            page_size: DEFAULT_PAGE_SIZE,
            quota: DEFAULT_ETCD_QUOTA,
        }
    }

    /// The same store, whose every write also requires `fence`'s lock keys
    /// to be still held (see [`Fence`]). Reads are unchanged.
    pub fn fenced(&self, fence: &Fence) -> Self {
        Self {
            fence: fence.clone(),
            ..self.clone()
        }
    }

    /// The fence this store's writes carry.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The same store reading lists `page_size` keys at a time (at least 1).
    pub fn with_page_size(mut self, page_size: i64) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// Keys per page of a list read.
    pub fn page_size(&self) -> i64 {
        self.page_size
    }

    /// The etcd client (for locks and leases).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The root prefix.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn challenge_key(&self, cid: &str) -> String {
        format!("{}/challenge/{}", self.root, ids::encode(cid))
    }
    fn instances_prefix(&self, cid: &str) -> String {
        format!("{}/instance/{}/", self.root, ids::encode(cid))
    }
    fn claimed_key(&self, cid: &str, sid: &str) -> String {
        format!("{}claimed/{}", self.instances_prefix(cid), ids::encode(sid))
    }
    fn pooled_key(&self, cid: &str, identity: &Identity) -> String {
        format!("{}pool/{identity}", self.instances_prefix(cid))
    }
    fn source_key(&self, sid: &str, cid: &str) -> String {
        format!(
            "{}/source/{}/{}",
            self.root,
            ids::encode(sid),
            ids::encode(cid)
        )
    }
    fn stack_key(&self, cid: &str, identity: &Identity) -> String {
        format!("{}/stack/{}/{identity}", self.root, ids::encode(cid))
    }
    fn run_key(&self, cid: &str, identity: &Identity) -> String {
        format!("{}/run/{}/{identity}", self.root, ids::encode(cid))
    }
    fn expiry_prefix(&self) -> String {
        format!("{}/expiry/", self.root)
    }
    fn expiry_key(&self, until: &Timestamp, cid: &str, sid: &str) -> String {
        format!(
            "{}{}/{}/{}",
            self.expiry_prefix(),
            expiry_time(until),
            ids::encode(cid),
            ids::encode(sid)
        )
    }
    fn demand_key(&self, cid: &str) -> String {
        format!("{}/demand/{}", self.root, ids::encode(cid))
    }
    fn operation_key(&self, id: &str) -> String {
        format!("{}/operation/{}", self.root, ids::encode(id))
    }

    /// The key of an instance record (claimed or pooled).
    fn instance_key(&self, rec: &InstanceRecord) -> String {
        match &rec.source_id {
            Some(sid) => self.claimed_key(&rec.challenge_id, sid),
            None => self.pooled_key(&rec.challenge_id, &rec.identity),
        }
    }

    // ---- challenges -------------------------------------------------------

    /// One challenge.
    pub async fn get_challenge(
        &self,
        cid: &str,
    ) -> Result<Option<Versioned<ChallengeRecord>>, StoreError> {
        self.get_json(&self.challenge_key(cid)).await
    }

    /// Every challenge, ordered by id encoding.
    pub async fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError> {
        self.list_json(&format!("{}/challenge/", self.root)).await
    }

    /// Writes a challenge if the guard holds; `Conflict` otherwise.
    pub async fn put_challenge(
        &self,
        rec: &ChallengeRecord,
        expect: Expect,
    ) -> Result<(), StoreError> {
        let key = self.challenge_key(&rec.id);
        let value = to_json(&key, rec)?;
        self.guarded(&key, expect, vec![TxnOp::put(key.clone(), value, None)])
            .await
            .map(|_| ())
    }

    /// Deletes a challenge record (its instances are deleted one by one first).
    pub async fn delete_challenge(&self, cid: &str) -> Result<(), StoreError> {
        let key = self.challenge_key(cid);
        let demand = self.demand_key(cid);
        self.txn(
            &key,
            Vec::new(),
            vec![
                TxnOp::delete(key.clone(), None),
                TxnOp::delete(demand, None),
            ],
        )
        .await?;
        Ok(())
    }

    // ---- pool demand ------------------------------------------------------

    /// A challenge's demand estimate (empty when none was recorded).
    pub async fn get_demand(&self, cid: &str) -> Result<Demand, StoreError> {
        Ok(self
            .get_json::<Demand>(&self.demand_key(cid))
            .await?
            .map(|v| v.value)
            .unwrap_or_default())
    }

    /// Moves a challenge's demand estimate by `change`, compare-and-swap on
    /// its revision (claims on several workers move it at once). Advisory:
    /// no lock, no fence; gives up with `Conflict` after a few lost races.
    pub async fn update_demand(
        &self,
        cid: &str,
        change: impl Fn(&mut Demand),
    ) -> Result<Demand, StoreError> {
        let key = self.demand_key(cid);
        for _ in 0..8 {
            let current = self.get_json::<Demand>(&key).await?;
            let (mut demand, expect) = match current {
                Some(v) => (v.value, Expect::Revision(v.mod_revision)),
                None => (Demand::default(), Expect::Absent),
            };
            change(&mut demand);
            let value = to_json(&key, &demand)?;
            let compare = match expect {
                Expect::Revision(rev) => Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
                _ => Compare::version(key.as_str(), CompareOp::Equal, 0),
            };
            let resp = self
                .client
                .clone()
                .txn(Txn::new().when(vec![compare]).and_then(vec![TxnOp::put(
                    key.clone(),
                    value,
                    None,
                )]))
                .await?;
            if resp.succeeded() {
                return Ok(demand);
            }
        }
        Err(StoreError::Conflict { key })
    }

    /// Takes up to `want` of the cluster's `cap` refill slots, each a key
    /// under `lease` (a worker that dies frees its slots with its lease).
    /// Returns the slots taken (maybe none: all are busy).
    pub async fn take_refill_slots(
        &self,
        lease: i64,
        cap: usize,
        want: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = crate::lock_keys::refill_slots(&self.root);
        let busy = self
            .client
            .clone()
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let busy: std::collections::HashSet<Vec<u8>> =
            busy.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        let mut taken = Vec::new();
        for i in 0..cap {
            if taken.len() >= want {
                break;
            }
            let key = format!("{prefix}{i}");
            if busy.contains(key.as_bytes()) {
                continue;
            }
            let resp = self
                .client
                .clone()
                .txn(
                    Txn::new()
                        .when(vec![Compare::version(key.as_str(), CompareOp::Equal, 0)])
                        .and_then(vec![TxnOp::put(
                            key.clone(),
                            Vec::new(),
                            Some(PutOptions::new().with_lease(lease)),
                        )]),
                )
                .await?;
            if resp.succeeded() {
                taken.push(key);
            }
        }
        Ok(taken)
    }

    /// Gives refill slots back.
    pub async fn release_refill_slots(&self, slots: &[String]) -> Result<(), StoreError> {
        if slots.is_empty() {
            return Ok(());
        }
        let ops = slots
            .iter()
            .map(|k| TxnOp::delete(k.as_str(), None))
            .collect::<Vec<_>>();
        self.client.clone().txn(Txn::new().and_then(ops)).await?;
        Ok(())
    }

    // ---- instances --------------------------------------------------------

    /// The instance claimed by `sid` on `cid`.
    pub async fn get_instance(
        &self,
        cid: &str,
        sid: &str,
    ) -> Result<Option<Versioned<InstanceRecord>>, StoreError> {
        self.get_json(&self.claimed_key(cid, sid)).await
    }

    /// Every instance of a challenge, claimed and pooled.
    pub async fn list_instances(&self, cid: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        self.list_json(&self.instances_prefix(cid)).await
    }

    /// How many instances of a challenge are claimed (a count-only read).
    pub async fn count_claimed(&self, cid: &str) -> Result<i64, StoreError> {
        self.count_under(format!("{}claimed/", self.instances_prefix(cid)))
            .await
    }

    /// How many instances of a challenge are pooled, ready or deploying (a
    /// count-only read).
    pub async fn count_pooled(&self, cid: &str) -> Result<i64, StoreError> {
        self.count_under(format!("{}pool/", self.instances_prefix(cid)))
            .await
    }

    async fn count_under(&self, prefix: String) -> Result<i64, StoreError> {
        let r = self
            .client
            .clone()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        Ok(r.count())
    }

    /// The pooled (unclaimed) instances of a challenge, with their revisions.
    pub async fn list_pooled(
        &self,
        cid: &str,
    ) -> Result<Vec<Versioned<InstanceRecord>>, StoreError> {
        self.list_versioned(&format!("{}pool/", self.instances_prefix(cid)))
            .await
    }

    /// Every instance of a challenge, claimed and pooled, with revisions.
    pub async fn list_instances_versioned(
        &self,
        cid: &str,
    ) -> Result<Vec<Versioned<InstanceRecord>>, StoreError> {
        self.list_versioned(&self.instances_prefix(cid)).await
    }

    /// The instance of a challenge that has `identity`, claimed or pooled.
    pub async fn find_identity(
        &self,
        cid: &str,
        identity: &Identity,
    ) -> Result<Option<Versioned<InstanceRecord>>, StoreError> {
        if let Some(pooled) = self.get_json(&self.pooled_key(cid, identity)).await? {
            return Ok(Some(pooled));
        }
        Ok(self
            .list_instances_versioned(cid)
            .await?
            .into_iter()
            .find(|r| &r.value.identity == identity))
    }

    /// Moves a pooled instance to a source in one transaction: the pooled
    /// record must be unchanged (`pooled.mod_revision`), the source's slot
    /// free, and no lock held or awaited on the identity (see
    /// [`crate::lock_keys::identity_lock`]: an update or a refill's destroy of
    /// that instance is under way), else `Conflict`: the caller tries
    /// another pooled instance. No Pulumi is involved. Returns the revision
    /// of the claimed record.
    pub async fn claim_pooled(
        &self,
        pooled: &Versioned<InstanceRecord>,
        claimed: &InstanceRecord,
    ) -> Result<i64, StoreError> {
        let identity_lock =
            crate::lock_keys::identity_lock(&self.root, &claimed.challenge_id, &claimed.identity);
        self.claim_pooled_with(
            pooled,
            claimed,
            vec![Compare::version(identity_lock, CompareOp::Equal, 0).with_prefix()],
        )
        .await
    }

    /// Whether a refill of `cid`'s pool is at work (or waiting for the one
    /// at work) with no challenge writer around: some key under the pool's
    /// lock, none under the challenge's writers. A claim that sees it after
    /// its own transaction needs no refill of its own: the refill holding
    /// the pool's lock counts the pool again after releasing it, and one
    /// waiting for that lock reads the pool once it has it (see the
    /// worker's `pool_refill`). With a writer there (an update or a delete),
    /// a waiting refill may step aside behind it: `false`.
    pub async fn refill_at_work(&self, cid: &str) -> Result<bool, StoreError> {
        let pool = crate::lock_keys::pool_lock(&self.root, cid);
        let writers = format!("{}w-", crate::lock_keys::challenge_lock(&self.root, cid));
        let (refills, writers) =
            tokio::try_join!(self.count_under(pool), self.count_under(writers))?;
        Ok(refills > 0 && writers == 0)
    }

    /// [`Store::claim_pooled`] by a create that holds no lock at all (the
    /// common case: no per-source quota, nothing else at work on the slot).
    /// The transaction also proves what the create's locks would have: no
    /// key under the slot's lock (a create, delete, expiry or reset of that
    /// slot), nor under the source's (a create counting the source's
    /// instances, an eviction), nor a writer's under the challenge's (an
    /// update or a delete), and the challenge record unchanged since
    /// `challenge_revision`. `Conflict` when any of it fails: the caller
    /// takes its locks and decides again.
    pub async fn claim_unlocked(
        &self,
        pooled: &Versioned<InstanceRecord>,
        claimed: &InstanceRecord,
        challenge_revision: i64,
    ) -> Result<i64, StoreError> {
        let cid = &claimed.challenge_id;
        let Some(sid) = &claimed.source_id else {
            return Err(StoreError::Conflict {
                key: self.instance_key(claimed),
            });
        };
        let identity_lock = crate::lock_keys::identity_lock(&self.root, cid, &claimed.identity);
        let slot_lock = crate::lock_keys::instance_lock(&self.root, cid, sid);
        let source_lock = crate::lock_keys::source_lock(&self.root, sid);
        let writers = format!("{}w-", crate::lock_keys::challenge_lock(&self.root, cid));
        let guards = vec![
            Compare::version(identity_lock, CompareOp::Equal, 0).with_prefix(),
            Compare::version(slot_lock, CompareOp::Equal, 0).with_prefix(),
            Compare::version(source_lock, CompareOp::Equal, 0).with_prefix(),
            Compare::version(writers, CompareOp::Equal, 0).with_prefix(),
            Compare::mod_revision(
                self.challenge_key(cid),
                CompareOp::Equal,
                challenge_revision,
            ),
        ];
        self.claim_pooled_with(pooled, claimed, guards).await
    }

    /// [`Store::claim_pooled`] by a caller that holds the identity's lock
    /// itself (its fence proves it): no check that the lock is free.
    pub async fn claim_pooled_locked(
        &self,
        pooled: &Versioned<InstanceRecord>,
        claimed: &InstanceRecord,
    ) -> Result<i64, StoreError> {
        self.claim_pooled_with(pooled, claimed, Vec::new()).await
    }

    async fn claim_pooled_with(
        &self,
        pooled: &Versioned<InstanceRecord>,
        claimed: &InstanceRecord,
        extra: Vec<Compare>,
    ) -> Result<i64, StoreError> {
        let pool_key = self.instance_key(&pooled.value);
        let claim_key = self.instance_key(claimed);
        let value = to_json(&claim_key, claimed)?;
        let mut ops = vec![
            TxnOp::delete(pool_key.clone(), None),
            TxnOp::put(claim_key.clone(), value.clone(), None),
        ];
        if let Some(sid) = &claimed.source_id {
            ops.push(TxnOp::put(
                self.source_key(sid, &claimed.challenge_id),
                value,
                None,
            ));
            if let Some(until) = &claimed.until {
                let entry = self.expiry_key(until, &claimed.challenge_id, sid);
                ops.push(TxnOp::put(entry, claimed.identity.as_str(), None));
            }
        }
        let mut when = vec![
            Compare::mod_revision(pool_key.clone(), CompareOp::Equal, pooled.mod_revision),
            Compare::version(claim_key, CompareOp::Equal, 0),
        ];
        when.extend(extra);
        self.txn(&pool_key, when, ops).await
    }

    /// Every instance claimed by a source, across challenges.
    pub async fn list_by_source(&self, sid: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        self.list_json(&format!("{}/source/{}/", self.root, ids::encode(sid)))
            .await
    }

    /// Writes an instance record (and its source index, its expiry index
    /// entry, and the stack state when given) in one transaction guarded by
    /// `expect` on the record key. `previous` is the version being replaced,
    /// whose expiry entry is moved when `until` changed.
    pub async fn put_instance(
        &self,
        rec: &InstanceRecord,
        stack: Option<PointerWrite<'_>>,
        expect: Expect,
        previous: Option<&InstanceRecord>,
    ) -> Result<(), StoreError> {
        self.put_instance_rev(rec, stack, expect, previous)
            .await
            .map(|_| ())
    }

    /// [`Store::put_instance`], returning the record's new revision (the
    /// guard of the holder's next write).
    pub async fn put_instance_rev(
        &self,
        rec: &InstanceRecord,
        stack: Option<PointerWrite<'_>>,
        expect: Expect,
        previous: Option<&InstanceRecord>,
    ) -> Result<i64, StoreError> {
        let key = self.instance_key(rec);
        let ops = self.instance_ops(rec, stack.map(|w| w.pointer), previous)?;
        let stack_key = self.stack_key(&rec.challenge_id, &rec.identity);
        let also = stack.map(|w| w.compare(&stack_key)).into_iter().collect();
        self.guarded_with(&key, expect, also, ops).await
    }

    /// The writes of [`Store::put_instance_rev`]: the record, its source
    /// index, the stack pointer when given, the expiry entry moved.
    fn instance_ops(
        &self,
        rec: &InstanceRecord,
        stack: Option<&StatePointer>,
        previous: Option<&InstanceRecord>,
    ) -> Result<Vec<TxnOp>, StoreError> {
        let key = self.instance_key(rec);
        let value = to_json(&key, rec)?;
        let mut ops = vec![TxnOp::put(key.clone(), value.clone(), None)];
        if let Some(sid) = &rec.source_id {
            ops.push(TxnOp::put(
                self.source_key(sid, &rec.challenge_id),
                value,
                None,
            ));
        }
        if let Some(stack) = stack {
            let stack_key = self.stack_key(&rec.challenge_id, &rec.identity);
            let pointer = to_json(&stack_key, stack)?;
            ops.push(TxnOp::put(stack_key, pointer, None));
        }
        if let Some(prev) = previous
            && let (Some(sid), Some(until)) = (&prev.source_id, &prev.until)
            && (prev.until != rec.until || prev.source_id != rec.source_id)
        {
            ops.push(TxnOp::delete(
                self.expiry_key(until, &prev.challenge_id, sid),
                None,
            ));
        }
        if let (Some(sid), Some(until)) = (&rec.source_id, &rec.until) {
            let entry = self.expiry_key(until, &rec.challenge_id, sid);
            ops.push(TxnOp::put(entry, rec.identity.as_str(), None));
        }
        Ok(ops)
    }

    /// A renewal without locks: writes claimed record `rec` over `previous`
    /// (read at `revision`) only if, in the same transaction, the record is
    /// unchanged, the challenge is the one read (at `challenge_revision`),
    /// nobody holds or awaits the slot's lock (create, delete, expiry,
    /// reset) and no writer holds or awaits the challenge's lock (its
    /// update moves `until`). `Ok(false)`: one of those did not hold; the
    /// caller takes the locks and tries again.
    pub async fn renew_unlocked(
        &self,
        rec: &InstanceRecord,
        previous: &InstanceRecord,
        revision: i64,
        challenge_revision: i64,
    ) -> Result<bool, StoreError> {
        let Some(sid) = &rec.source_id else {
            return Ok(false);
        };
        let cid = &rec.challenge_id;
        let key = self.instance_key(rec);
        let slot_lock = crate::lock_keys::instance_lock(&self.root, cid, sid);
        let writers = format!("{}w-", crate::lock_keys::challenge_lock(&self.root, cid));
        let when = vec![
            Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
            Compare::mod_revision(
                self.challenge_key(cid),
                CompareOp::Equal,
                challenge_revision,
            ),
            Compare::version(slot_lock, CompareOp::Equal, 0).with_prefix(),
            Compare::version(writers, CompareOp::Equal, 0).with_prefix(),
        ];
        let ops = self.instance_ops(rec, None, Some(previous))?;
        let resp = self
            .client
            .clone()
            .txn(Txn::new().when(when).and_then(ops))
            .await?;
        Ok(resp.succeeded())
    }

    /// Replaces pooled record `old` (guarded by its `revision`) with pooled
    /// record `new` under another identity and its stack `pointer`, in one
    /// transaction (a blue/green update of a pooled instance). The old
    /// identity's stack state stays: its destroy deletes it, or the orphan
    /// sweep finds it if that never happens.
    pub async fn replace_pooled(
        &self,
        old: &InstanceRecord,
        revision: i64,
        new: &InstanceRecord,
        stack: PointerWrite<'_>,
    ) -> Result<(), StoreError> {
        let (old_key, new_key) = (self.instance_key(old), self.instance_key(new));
        let stack_key = self.stack_key(&new.challenge_id, &new.identity);
        let ops = vec![
            TxnOp::delete(old_key.clone(), None),
            TxnOp::put(new_key.clone(), to_json(&new_key, new)?, None),
            TxnOp::put(stack_key.clone(), to_json(&stack_key, stack.pointer)?, None),
        ];
        let compare = vec![
            Compare::mod_revision(old_key.as_str(), CompareOp::Equal, revision),
            Compare::version(new_key.as_str(), CompareOp::Equal, 0),
            stack.compare(&stack_key),
        ];
        self.txn(&old_key, compare, ops).await?;
        Ok(())
    }

    /// Deletes an instance record, its source index and its stack state.
    pub async fn delete_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        self.delete_instance_if(rec, Expect::Any).await
    }

    /// [`Store::delete_instance`], guarded by `expect` on the record's key.
    pub async fn delete_instance_if(
        &self,
        rec: &InstanceRecord,
        expect: Expect,
    ) -> Result<(), StoreError> {
        self.delete_instance_answering(rec, expect, None).await
    }

    /// [`Store::delete_instance_if`], writing in the same transaction the
    /// command's settled operation record `answer` (on retention `lease`):
    /// a delivery that follows one that died right after the delete finds
    /// the command answered, rather than an instance gone.
    pub async fn delete_instance_answering(
        &self,
        rec: &InstanceRecord,
        expect: Expect,
        answer: Option<(&OperationRecord, i64)>,
    ) -> Result<(), StoreError> {
        let mut ops = vec![
            TxnOp::delete(self.instance_key(rec), None),
            TxnOp::delete(self.stack_key(&rec.challenge_id, &rec.identity), None),
            TxnOp::delete(self.run_key(&rec.challenge_id, &rec.identity), None),
        ];
        if let Some(sid) = &rec.source_id {
            ops.push(TxnOp::delete(self.source_key(sid, &rec.challenge_id), None));
            if let Some(until) = &rec.until {
                ops.push(TxnOp::delete(
                    self.expiry_key(until, &rec.challenge_id, sid),
                    None,
                ));
            }
        }
        if let Some((answer, lease)) = answer {
            let key = self.operation_key(answer.id());
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            ops.push(TxnOp::put(
                key.clone(),
                encode_operation(&key, answer)?,
                opts,
            ));
        }
        self.guarded(&self.instance_key(rec), expect, ops).await?;
        Ok(())
    }

    /// Claimed instances whose `until` is at or before `now`, oldest first,
    /// at most `limit`: one range read over the expiry index, whose cost
    /// follows the number of expired instances, not of all instances.
    pub async fn list_expired(
        &self,
        now: &Timestamp,
        limit: i64,
    ) -> Result<Vec<Expired>, StoreError> {
        let prefix = self.expiry_prefix();
        // Keys strictly below "<now>/~" hold every until <= now.
        let end = format!("{prefix}{}/~", expiry_time(now));
        let resp = self
            .client
            .clone()
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_range(end).with_limit(limit)),
            )
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let corrupt = || StoreError::Corrupt {
                key: key.clone(),
                reason: "malformed expiry entry".into(),
            };
            let rest = key.strip_prefix(&prefix).ok_or_else(corrupt)?;
            let mut parts = rest.split('/');
            let (Some(time), Some(cid), Some(sid), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(corrupt());
            };
            let until = parse_expiry_time(time).ok_or_else(corrupt)?;
            let challenge_id = ids::decode(cid).ok_or_else(corrupt)?;
            let source_id = ids::decode(sid).ok_or_else(corrupt)?;
            let identity = String::from_utf8_lossy(kv.value())
                .parse()
                .map_err(|_| corrupt())?;
            out.push(Expired {
                challenge_id,
                source_id,
                identity,
                until,
            });
        }
        Ok(out)
    }

    /// Like [`Store::list_expired`], for the janitor: at most `limit`
    /// expired entries whose instance is still there with that identity and
    /// `until`, read a page at a time past any number of stale entries. A
    /// stale entry (its instance deleted, renewed or replaced by a write that
    /// did not move the entry) is deleted on the way, guarded by its
    /// revision, so it can neither hide live entries behind it nor cost a
    /// command per tick for ever. One transaction of record reads per page.
    pub async fn expired_live(
        &self,
        now: &Timestamp,
        limit: i64,
    ) -> Result<ExpiredScan, StoreError> {
        let prefix = self.expiry_prefix();
        let end = format!("{prefix}{}/~", expiry_time(now)).into_bytes();
        // etcd caps operations per transaction (128 by default).
        let page = self.page_size.clamp(1, 64);
        let mut from = prefix.clone().into_bytes();
        let mut scan = ExpiredScan::default();
        while (scan.live.len() as i64) < limit {
            let resp = self
                .client
                .clone()
                .get(
                    from.clone(),
                    Some(GetOptions::new().with_range(end.clone()).with_limit(page)),
                )
                .await?;
            if resp.kvs().is_empty() {
                break;
            }
            let mut entries = Vec::new();
            let mut stale = Vec::new();
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match self.parse_expiry_entry(&prefix, &key, kv.value()) {
                    Ok(entry) => entries.push((key, kv.mod_revision(), entry)),
                    // Not one of ours: it must not stop every later tick.
                    Err(e) => {
                        tracing::warn!(error = %e, "malformed expiry entry; deleting it");
                        stale.push((key, kv.mod_revision()));
                    }
                }
            }
            let reads = Txn::new().and_then(
                entries
                    .iter()
                    .map(|(_, _, e)| {
                        TxnOp::get(self.claimed_key(&e.challenge_id, &e.source_id), None)
                    })
                    .collect::<Vec<_>>(),
            );
            let records = self.client.clone().txn(reads).await?;
            for ((key, revision, entry), op) in entries.into_iter().zip(records.op_responses()) {
                let current = match op {
                    etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                        from_json::<InstanceRecord>(&String::from_utf8_lossy(kv.key()), kv.value())
                    }),
                    _ => None,
                }
                .transpose()?;
                let live = current.is_some_and(|rec| {
                    rec.identity == entry.identity
                        && rec.until.as_ref().map(expiry_time) == Some(expiry_time(&entry.until))
                });
                if live {
                    if (scan.live.len() as i64) < limit {
                        scan.live.push(entry);
                    }
                } else {
                    stale.push((key, revision));
                }
            }
            scan.stale_removed += self.delete_stale_entries(&stale).await?;
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(scan)
    }

    /// Deletes expiry entries, each only if unchanged since read; how many.
    async fn delete_stale_entries(&self, stale: &[(String, i64)]) -> Result<usize, StoreError> {
        if stale.is_empty() {
            return Ok(0);
        }
        let compares: Vec<Compare> = stale
            .iter()
            .map(|(k, rev)| Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev))
            .collect();
        let deletes: Vec<TxnOp> = stale
            .iter()
            .map(|(k, _)| TxnOp::delete(k.as_str(), None))
            .collect();
        let all = Txn::new().when(compares).and_then(deletes);
        if self.client.clone().txn(all).await?.succeeded() {
            return Ok(stale.len());
        }
        // One changed meanwhile (written again): delete the others one by one.
        let mut removed = 0;
        for (key, rev) in stale {
            let one = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev)])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            if self.client.clone().txn(one).await?.succeeded() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn parse_expiry_entry(
        &self,
        prefix: &str,
        key: &str,
        value: &[u8],
    ) -> Result<Expired, StoreError> {
        let corrupt = || StoreError::Corrupt {
            key: key.to_owned(),
            reason: "malformed expiry entry".into(),
        };
        let rest = key.strip_prefix(prefix).ok_or_else(corrupt)?;
        let mut parts = rest.split('/');
        let (Some(time), Some(cid), Some(sid), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt());
        };
        Ok(Expired {
            until: parse_expiry_time(time).ok_or_else(corrupt)?,
            challenge_id: ids::decode(cid).ok_or_else(corrupt)?,
            source_id: ids::decode(sid).ok_or_else(corrupt)?,
            identity: String::from_utf8_lossy(value)
                .parse()
                .map_err(|_| corrupt())?,
        })
    }

    /// Points the stack key at a checkpoint stored while Pulumi runs (see
    /// [`crate::stack_store`]): a worker that dies mid-run leaves the state
    /// of what it already deployed for the next one to resume from. Fenced
    /// like every write of a lock holder.
    /// Guarded by the revision the writer read (see [`PointerWrite`]);
    /// returns the key's new revision.
    pub async fn put_stack(
        &self,
        cid: &str,
        identity: &Identity,
        stack: PointerWrite<'_>,
    ) -> Result<i64, StoreError> {
        let key = self.stack_key(cid, identity);
        let value = to_json(&key, stack.pointer)?;
        self.txn(
            &key,
            vec![stack.compare(&key)],
            vec![TxnOp::put(key.clone(), value, None)],
        )
        .await
    }

    /// [`Store::put_stack`] by a run whose lock is gone, without the fence:
    /// applied only while `marker` (the run's own) is still the stack's run
    /// marker. A new holder replaces the marker before it runs, and reads
    /// the stack again after waiting out this run (see the worker's
    /// `run_marker`), so what this write records is either seen by the next
    /// run or refused. It exists so that what a dying run deployed is never
    /// left without a state naming it.
    pub async fn put_stack_under_marker(
        &self,
        cid: &str,
        identity: &Identity,
        stack: PointerWrite<'_>,
        marker: &RunMarker,
    ) -> Result<i64, StoreError> {
        let key = self.stack_key(cid, identity);
        let run_key = self.run_key(cid, identity);
        let value = to_json(&key, stack.pointer)?;
        let when = vec![
            stack.compare(&key),
            Compare::value(
                run_key.as_str(),
                CompareOp::Equal,
                to_json(&run_key, marker)?,
            ),
        ];
        let unfenced = Self {
            fence: Fence::default(),
            ..self.clone()
        };
        unfenced
            .txn(&key, when, vec![TxnOp::put(key.clone(), value, None)])
            .await
    }

    /// Deletes a stack's pointer (after its stack was destroyed).
    pub async fn delete_stack(&self, cid: &str, identity: &Identity) -> Result<(), StoreError> {
        let key = self.stack_key(cid, identity);
        let ops = vec![
            TxnOp::delete(key.clone(), None),
            TxnOp::delete(self.run_key(cid, identity), None),
        ];
        self.txn(&key, Vec::new(), ops).await?;
        Ok(())
    }

    /// The marker of the last Pulumi run on a stack that did not end
    /// cleanly (or of the one running now), if any.
    pub async fn get_run_marker(
        &self,
        cid: &str,
        identity: &Identity,
    ) -> Result<Option<RunMarker>, StoreError> {
        Ok(self
            .get_json(&self.run_key(cid, identity))
            .await?
            .map(|v| v.value))
    }

    /// Marks a Pulumi run on a stack as this holder's (fenced: a holder
    /// whose lock is gone cannot start a run).
    pub async fn put_run_marker(
        &self,
        cid: &str,
        identity: &Identity,
        marker: &RunMarker,
    ) -> Result<(), StoreError> {
        let key = self.run_key(cid, identity);
        let value = to_json(&key, marker)?;
        self.txn(&key, Vec::new(), vec![TxnOp::put(key.clone(), value, None)])
            .await?;
        Ok(())
    }

    /// Removes `marker` once its run has ended (only if it is still the
    /// marker there).
    pub async fn delete_run_marker(
        &self,
        cid: &str,
        identity: &Identity,
        marker: &RunMarker,
    ) -> Result<(), StoreError> {
        let key = self.run_key(cid, identity);
        let value = to_json(&key, marker)?;
        self.txn(
            &key,
            vec![Compare::value(key.as_str(), CompareOp::Equal, value)],
            vec![TxnOp::delete(key.clone(), None)],
        )
        .await?;
        Ok(())
    }

    /// Whether etcd still holds `lease` (neither expired nor revoked).
    pub async fn lease_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let ttl = self.client.clone().lease_time_to_live(lease, None).await;
        match ttl {
            // A lease etcd no longer holds has TTL -1 (older servers
            // answer "requested lease not found" instead).
            Ok(r) => Ok(r.ttl() > 0),
            Err(e) if e.to_string().contains("lease not found") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// What the stack key of an instance holds, and its mod revision (0:
    /// absent), the guard of the next pointer write (see [`PointerWrite`]).
    pub async fn get_stack_at(
        &self,
        cid: &str,
        identity: &Identity,
    ) -> Result<(Option<StoredStack>, i64), StoreError> {
        let key = self.stack_key(cid, identity);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        match resp.kvs().first() {
            None => Ok((None, 0)),
            Some(kv) => Ok((
                Some(StoredStack::parse(&key, kv.value())?),
                kv.mod_revision(),
            )),
        }
    }

    /// What the stack key of an instance holds.
    pub async fn get_stack(
        &self,
        cid: &str,
        identity: &Identity,
    ) -> Result<Option<StoredStack>, StoreError> {
        let key = self.stack_key(cid, identity);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        resp.kvs()
            .first()
            .map(|kv| StoredStack::parse(&key, kv.value()))
            .transpose()
    }

    /// The object names every stack pointer of this root refers to (what the
    /// object store sweep must keep).
    pub async fn stack_objects(&self) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}/stack/", self.root);
        let mut objects = Vec::new();
        self.scan(prefix.as_bytes(), &prefix_end(prefix.as_bytes()), |kv| {
            let key = String::from_utf8_lossy(kv.key());
            if let StoredStack::Pointer(p) = StoredStack::parse(&key, kv.value())? {
                objects.push(p.object);
            }
            Ok(true)
        })
        .await?;
        Ok(objects)
    }

    /// Stacks nobody answers for, whose identity no lock holds: a stack
    /// state no instance record names (left by a replacement, a reset or a
    /// blue/green update, that died before or after its switch or failed to
    /// destroy the stack it replaced), and a pool reservation still
    /// `Deploying` (its refill died, and no refill of that pool has run
    /// since to resume it: it counts as pooled while no one can claim it). As (challenge, identity).
    /// Whoever acts on one checks again under the identity's lock.
    pub async fn orphan_stacks(&self) -> Result<Vec<(String, Identity)>, StoreError> {
        let prefix = format!("{}/stack/", self.root);
        let mut stacks: std::collections::BTreeMap<String, Vec<Identity>> = Default::default();
        self.scan(prefix.as_bytes(), &prefix_end(prefix.as_bytes()), |kv| {
            let key = String::from_utf8_lossy(kv.key());
            let parsed = key
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(cid, identity)| Some((ids::decode(cid)?, identity.parse().ok()?)));
            match parsed {
                Some((cid, identity)) => stacks.entry(cid).or_default().push(identity),
                None => tracing::warn!(%key, "unexpected key under the stack prefix; skipped"),
            }
            Ok(true)
        })
        .await?;
        for challenge in self.list_challenges().await? {
            stacks.entry(challenge.id).or_default();
        }
        let mut orphans = Vec::new();
        for (cid, with_state) in stacks {
            let records = self.list_instances(&cid).await?;
            let abandoned = records
                .iter()
                .filter(|r| r.source_id.is_none() && r.status == InstanceStatus::Deploying)
                .map(|r| r.identity.clone());
            let named: std::collections::HashSet<&Identity> =
                records.iter().map(|r| &r.identity).collect();
            let unnamed = with_state.into_iter().filter(|i| !named.contains(i));
            let candidates: std::collections::BTreeSet<Identity> =
                unnamed.chain(abandoned).collect();
            for identity in candidates {
                let lock = crate::lock_keys::identity_lock(&self.root, &cid, &identity);
                let held = self
                    .client
                    .clone()
                    .get(
                        lock.as_str(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await?
                    .count()
                    > 0;
                if !held {
                    orphans.push((cid.clone(), identity));
                }
            }
        }
        Ok(orphans)
    }

    // ---- etcd's space -----------------------------------------------------

    /// etcd's database size against its quota, and its raised alarms.
    pub async fn space(&self) -> Result<EtcdSpace, StoreError> {
        let mut client = self.client.clone();
        let status = client.status().await?;
        let alarms = client
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None,
            )
            .await?;
        let mut raised: Vec<&'static str> = alarms
            .alarms()
            .iter()
            .filter_map(|a| match a.alarm() {
                etcd_client::AlarmType::Nospace => Some("NOSPACE"),
                etcd_client::AlarmType::Corrupt => Some("CORRUPT"),
                etcd_client::AlarmType::None => None,
            })
            .collect();
        raised.sort_unstable();
        raised.dedup();
        Ok(EtcdSpace {
            db_size: status.db_size(),
            db_size_in_use: status.raft_used_db_size(),
            quota: if status.db_size_quota() > 0 {
                status.db_size_quota()
            } else {
                self.quota
            },
            alarms: raised,
        })
    }

    // ---- inventory (metrics) --------------------------------------------

    /// Counts for the inventory gauges: (challenges, claimed, pooled), and
    /// the pool size of each challenge that has a pool. Count-only reads.
    pub async fn inventory(&self) -> Result<(i64, i64, i64, Vec<(String, i64)>), StoreError> {
        let count = |prefix: String| {
            let mut client = self.client.clone();
            async move {
                let r = client
                    .get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await?;
                Ok::<i64, StoreError>(r.count())
            }
        };
        let challenges = self.list_challenges().await?;
        let claimed = count(format!("{}/source/", self.root)).await?;
        let all = count(format!("{}/instance/", self.root)).await?;
        let mut pools = Vec::new();
        for c in challenges
            .iter()
            .filter(|c| c.min > 0 || c.max > 0 || c.pool == crate::pool_demand::PoolMode::Adaptive)
        {
            let n = count(format!("{}pool/", self.instances_prefix(&c.id))).await?;
            pools.push((c.id.clone(), n));
        }
        Ok((challenges.len() as i64, claimed, all - claimed, pools))
    }

    // ---- operations -------------------------------------------------------

    /// A command's operation record.
    pub async fn get_operation(&self, id: &str) -> Result<Option<OperationRecord>, StoreError> {
        let key = self.operation_key(id);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        resp.kvs()
            .first()
            .map(|kv| decode_operation(&key, kv.value()))
            .transpose()
    }

    /// Writes an operation record over anything, attached to `lease` (0:
    /// none) so that it expires with it.
    pub async fn put_operation(
        &self,
        record: &OperationRecord,
        lease: i64,
    ) -> Result<(), StoreError> {
        let key = self.operation_key(record.id());
        let value = encode_operation(&key, record)?;
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        self.client.clone().put(key, value, opts).await?;
        Ok(())
    }

    /// Writes an operation record only if none exists yet (the API's pending
    /// record, which must never replace a result a worker recorded). Returns
    /// the record already there instead, if any. One round trip.
    pub async fn create_operation(
        &self,
        record: &OperationRecord,
        lease: i64,
    ) -> Result<Option<OperationRecord>, StoreError> {
        let key = self.operation_key(record.id());
        let value = encode_operation(&key, record)?;
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, opts)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(None);
        }
        first_get(&resp)
            .map(|(value, _)| decode_operation(&key, &value))
            .transpose()
    }

    /// Records a command's settled operation record, once: written over
    /// nothing or over a pending record (guarded by its revision), never
    /// over another settled one. Returns `None` when `record` was written, or
    /// the settled record already there (an earlier delivery settled the
    /// command first: its answer is the command's answer). One round trip
    /// when nothing is recorded yet.
    ///
    /// `since`: a settled record finished before it answered an earlier
    /// life of the command (dead-lettered, then replayed by an operator) and
    /// is replaced like a pending one.
    pub async fn settle_operation(
        &self,
        record: &OperationRecord,
        lease: i64,
        since: Option<std::time::SystemTime>,
    ) -> Result<Option<OperationRecord>, StoreError> {
        let key = self.operation_key(record.id());
        let value = encode_operation(&key, record)?;
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let mut guard = Compare::version(key.clone(), CompareOp::Equal, 0);
        // A pending record may be replaced; a concurrent change is re-read.
        for _ in 0..8 {
            let txn = Txn::new()
                .when([guard])
                .and_then([TxnOp::put(key.clone(), value.clone(), opts.clone())])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.client.clone().txn(txn).await?;
            if resp.succeeded() {
                return Ok(None);
            }
            let Some((existing, revision)) = first_get(&resp) else {
                // Deleted meanwhile (its lease expired): write it afresh.
                guard = Compare::version(key.clone(), CompareOp::Equal, 0);
                continue;
            };
            let existing = decode_operation(&key, &existing)?;
            let earlier_life = since.is_some_and(|s| existing.finished_before(s));
            if existing.is_settled() && !earlier_life {
                return Ok(Some(existing));
            }
            guard = Compare::mod_revision(key.clone(), CompareOp::Equal, revision);
        }
        Err(StoreError::Conflict { key })
    }

    // ---- helpers ----------------------------------------------------------

    /// Runs `ops` when `expect` holds on `key`; returns the transaction's
    /// revision (that of every key it wrote).
    async fn guarded(&self, key: &str, expect: Expect, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        self.guarded_with(key, expect, Vec::new(), ops).await
    }

    /// [`Self::guarded`], `also` compared too.
    async fn guarded_with(
        &self,
        key: &str,
        expect: Expect,
        also: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<i64, StoreError> {
        let mut compare = match expect {
            Expect::Absent => vec![Compare::version(key, CompareOp::Equal, 0)],
            Expect::Revision(rev) => vec![Compare::mod_revision(key, CompareOp::Equal, rev)],
            Expect::Any => Vec::new(),
        };
        compare.extend(also);
        self.txn(key, compare, ops).await
    }

    /// Runs `ops` when `compare` and this store's fence hold, in one round
    /// trip; returns the transaction's revision. A failed fence is told
    /// apart from a failed guard by reading the fence's keys in the
    /// transaction's `else` branch: `Fenced` names the lost lock, `Conflict`
    /// names `key`.
    async fn txn(
        &self,
        key: &str,
        compare: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<i64, StoreError> {
        let mut when: Vec<Compare> = self
            .fence
            .keys
            .iter()
            .map(|(k, rev)| Compare::create_revision(k.as_str(), CompareOp::Equal, *rev))
            .collect();
        when.extend(compare);
        let otherwise: Vec<TxnOp> = self
            .fence
            .keys
            .iter()
            .map(|(k, _)| TxnOp::get(k.as_str(), None))
            .collect();
        let resp = self
            .client
            .clone()
            .txn(Txn::new().when(when).and_then(ops).or_else(otherwise))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(revision);
        }
        for ((k, rev), got) in self.fence.keys.iter().zip(resp.op_responses()) {
            let held = match got {
                etcd_client::TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.create_revision() == *rev),
                _ => true,
            };
            if !held {
                return Err(StoreError::Fenced { key: k.clone() });
            }
        }
        Err(StoreError::Conflict {
            key: key.to_owned(),
        })
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let resp = self.client.clone().get(key, None).await?;
        resp.kvs()
            .first()
            .map(|kv| {
                Ok(Versioned {
                    value: from_json(key, kv.value())?,
                    mod_revision: kv.mod_revision(),
                })
            })
            .transpose()
    }

    async fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        Ok(self
            .list_versioned(prefix)
            .await?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }

    async fn list_versioned<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let mut out = Vec::new();
        self.scan(prefix.as_bytes(), &prefix_end(prefix.as_bytes()), |kv| {
            out.push(Versioned {
                value: from_json(&String::from_utf8_lossy(kv.key()), kv.value())?,
                mod_revision: kv.mod_revision(),
            });
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// Visits the keys in `[start, end)` in order, a page of
    /// [`Store::page_size`] keys per read, every page at the revision of the
    /// first (one snapshot); `visit` returns whether to go on.
    async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        mut visit: impl FnMut(&etcd_client::KeyValue) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut from = start.to_vec();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.to_vec())
                .with_limit(self.page_size);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self.client.clone().get(from.clone(), Some(opts)).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                if !visit(kv)? {
                    return Ok(());
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end
/// of a prefix read).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff: to the end of the keyspace.
    vec![0]
}

/// The value and modification revision of a transaction's first get.
fn first_get(resp: &etcd_client::TxnResponse) -> Option<(Vec<u8>, i64)> {
    resp.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    })
}

fn encode_operation(key: &str, record: &OperationRecord) -> Result<Vec<u8>, StoreError> {
    record.encode().map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn decode_operation(key: &str, bytes: &[u8]) -> Result<OperationRecord, StoreError> {
    OperationRecord::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn from_json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

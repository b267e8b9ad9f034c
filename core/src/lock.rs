//! Distributed locks on etcd, every key bound to the holder's lease so a dead
//! worker releases its locks when its lease expires.
//!
//! Recipe (etcd's RWMutex): a waiter puts `<prefix><r|w>-<uuid>` with its
//! lease and reads the prefix. A reader waits for every *writer* created
//! before it; a writer waits for *every* key created before it (so writers
//! are preferred: readers arriving after a writer queue behind it). Waiting
//! watches the deletion of the newest blocker, then re-reads. A wait that is
//! cancelled or times out deletes its key (the guard's drop does it), so no
//! lock leaks.

use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio_util::sync::CancellationToken;

use crate::{ids, store::StoreError};

/// Read (shared) or write (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Read,
    Write,
}

impl LockMode {
    fn tag(self) -> &'static str {
        match self {
            Self::Read => "r-",
            Self::Write => "w-",
        }
    }
}

/// A lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("timed out after {0:?} waiting for the lock")]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<etcd_client::Error> for LockError {
    fn from(e: etcd_client::Error) -> Self {
        Self::Store(StoreError::Unavailable(e))
    }
}

/// A lease kept alive in the background, revoked on [`Session::close`].
pub struct Session {
    client: Client,
    lease: i64,
    stop: CancellationToken,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Grants a lease of `ttl` seconds and keeps it alive every `ttl / 3`.
    pub async fn start(client: Client, ttl: i64) -> Result<Self, StoreError> {
        let lease = client.clone().lease_grant(ttl, None).await?.id();
        let stop = CancellationToken::new();
        let (mut keeper, mut responses) = client.clone().lease_keep_alive(lease).await?;
        let token = stop.clone();
        let period = Duration::from_secs((ttl / 3).max(1) as u64);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = keeper.keep_alive().await {
                            tracing::warn!(error = %e, lease, "lease keep-alive failed");
                            continue;
                        }
                        match responses.message().await {
                            Ok(Some(r)) if r.ttl() > 0 => {}
                            Ok(_) => { tracing::error!(lease, "lease expired"); break; }
                            Err(e) => tracing::warn!(error = %e, lease, "lease keep-alive failed"),
                        }
                    }
                }
            }
        });
        Ok(Self {
            client,
            lease,
            stop,
        })
    }

    /// The lease id.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Stops the keep-alive and revokes the lease (releasing every lock).
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.client.clone().lease_revoke(self.lease).await;
    }
}

/// A held lock; released by [`LockGuard::release`] or, failing that, on drop.
pub struct LockGuard {
    client: Client,
    key: String,
    released: bool,
}

impl LockGuard {
    /// Releases the lock: its key is deleted in the background, so the
    /// caller's answer does not wait for that round trip. (Dropping the guard
    /// does the same; a failed delete is undone by the lease.)
    pub fn release(self) {
        drop(self);
    }

    /// Releases the lock and waits until its key is gone.
    pub async fn release_now(mut self) {
        self.released = true;
        if let Err(e) = self.client.delete(self.key.clone(), None).await {
            tracing::warn!(error = %e, key = %self.key, "lock release failed; the lease will free it");
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut client = self.client.clone();
        let key = std::mem::take(&mut self.key);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.delete(key, None).await;
            });
        }
    }
}

/// Several locks taken together (see [`acquire_all`]); released together.
pub struct LockSet {
    client: Client,
    keys: Vec<String>,
}

impl std::fmt::Debug for LockSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockSet")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl LockSet {
    /// Releases every lock of the set, in the background (one transaction).
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for LockSet {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        if keys.is_empty() {
            return;
        }
        let mut client = self.client.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let ops: Vec<TxnOp> = keys.into_iter().map(|k| TxnOp::delete(k, None)).collect();
                if let Err(e) = client.txn(Txn::new().and_then(ops)).await {
                    tracing::warn!(error = %e, "lock release failed; the lease will free them");
                }
            });
        }
    }
}

/// Takes several locks at once, in the order given, bound to `lease`.
///
/// Every waiter key is written and every prefix read in **one** transaction,
/// so an uncontended set costs one round trip. All keys share that
/// transaction's revision, and each lock waits only for keys older than it,
/// so waits always point to older waiters and cannot form a cycle.
#[tracing::instrument(name = "lock wait", skip(client, lease, locks, timeout), fields(locks = ?locks))]
pub async fn acquire_all(
    client: &Client,
    lease: i64,
    locks: &[(&str, LockMode)],
    timeout: Duration,
) -> Result<LockSet, LockError> {
    let id = uuid::Uuid::now_v7();
    let keys: Vec<String> = locks
        .iter()
        .map(|(prefix, mode)| format!("{prefix}{}{id}", mode.tag()))
        .collect();
    let mut ops: Vec<TxnOp> = keys
        .iter()
        .map(|k| {
            TxnOp::put(
                k.clone(),
                Vec::new(),
                Some(PutOptions::new().with_lease(lease)),
            )
        })
        .collect();
    ops.extend(locks.iter().map(|(prefix, _)| {
        TxnOp::get(
            *prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend),
            ),
        )
    }));
    let _observe = ObserveWait {
        started: std::time::Instant::now(),
        lock: lock_kind(locks.last().map_or("", |(p, _)| *p)),
    };
    let resp = client.clone().txn(Txn::new().and_then(ops)).await?;
    let my_rev = resp.header().map_or(0, |h| h.revision());
    let set = LockSet {
        client: client.clone(),
        keys,
    };
    let blocked = resp
        .op_responses()
        .into_iter()
        .skip(locks.len())
        .zip(locks)
        .any(|(r, (prefix, mode))| match r {
            TxnOpResponse::Get(get) => get.kvs().iter().any(|kv| blocks(kv, prefix, *mode, my_rev)),
            _ => false,
        });
    if !blocked {
        return Ok(set);
    }
    let wait = async {
        for (prefix, mode) in locks {
            wait_turn(client, prefix, *mode, my_rev).await?;
        }
        Ok::<(), LockError>(())
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(())) => Ok(set),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LockError::Timeout(timeout)),
    }
}

/// Records a lock wait's duration when dropped (taken, failed or timed out).
struct ObserveWait {
    started: std::time::Instant,
    lock: &'static str,
}

impl Drop for ObserveWait {
    fn drop(&mut self) {
        crate::metrics::metrics().lock_waited(self.lock, self.started.elapsed().as_secs_f64());
    }
}

/// The kind of lock a prefix names (`.../lock/<kind>/...`).
fn lock_kind(prefix: &str) -> &'static str {
    match prefix
        .split("/lock/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
    {
        Some("challenge") => "challenge",
        Some("instance") => "instance",
        Some("pool") => "pool",
        Some("source") => "source",
        _ => "other",
    }
}

fn blocks(kv: &etcd_client::KeyValue, prefix: &str, mode: LockMode, my_rev: i64) -> bool {
    kv.create_revision() < my_rev
        && (mode == LockMode::Write
            || kv.key()[prefix.len()..].starts_with(LockMode::Write.tag().as_bytes()))
}

/// Lock prefix of a challenge (reader/writer).
pub fn challenge_lock(root: &str, cid: &str) -> String {
    format!("{root}/lock/challenge/{}/", ids::encode(cid))
}

/// Lock prefix of a challenge's pool (writer only: one refill at a time).
pub fn pool_lock(root: &str, cid: &str) -> String {
    format!("{root}/lock/pool/{}/", ids::encode(cid))
}

/// Lock prefix of a source's instance count (writer only; held by creates).
pub fn source_lock(root: &str, sid: &str) -> String {
    format!("{root}/lock/source/{}/", ids::encode(sid))
}

/// Lock prefix of one (challenge, source) instance slot (writer only).
pub fn instance_lock(root: &str, cid: &str, sid: &str) -> String {
    format!(
        "{root}/lock/instance/{}/{}/",
        ids::encode(cid),
        ids::encode(sid)
    )
}

/// Takes the lock at `prefix` in `mode`, bound to `lease`, waiting at most `timeout`.
#[tracing::instrument(name = "lock wait", skip(client, lease), fields(lock = %prefix, mode = ?mode))]
pub async fn acquire(
    client: &Client,
    lease: i64,
    prefix: &str,
    mode: LockMode,
    timeout: Duration,
) -> Result<LockGuard, LockError> {
    let key = format!("{prefix}{}{}", mode.tag(), uuid::Uuid::now_v7());
    let _observe = ObserveWait {
        started: std::time::Instant::now(),
        lock: lock_kind(prefix),
    };
    let mut kv = client.clone();
    let put = kv
        .put(
            key.clone(),
            Vec::new(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    let my_rev = put.header().map_or(0, |h| h.revision());
    // From here on, the guard deletes the key if we give up.
    let guard = LockGuard {
        client: client.clone(),
        key,
        released: false,
    };
    match tokio::time::timeout(timeout, wait_turn(client, prefix, mode, my_rev)).await {
        Ok(Ok(())) => Ok(guard),
        Ok(Err(e)) => {
            guard.release_now().await;
            Err(e)
        }
        Err(_) => {
            guard.release_now().await;
            Err(LockError::Timeout(timeout))
        }
    }
}

async fn wait_turn(
    client: &Client,
    prefix: &str,
    mode: LockMode,
    my_rev: i64,
) -> Result<(), LockError> {
    let mut kv = client.clone();
    loop {
        let resp = kv
            .get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            )
            .await?;
        let header_rev = resp.header().map_or(0, |h| h.revision());
        let blocker = resp
            .kvs()
            .iter()
            .rfind(|kv| blocks(kv, prefix, mode, my_rev))
            .map(|kv| kv.key().to_vec());
        let Some(blocker) = blocker else {
            return Ok(());
        };
        // Wait for the newest blocker to go; the others went before it or
        // will be seen on the next read.
        let mut stream = client
            .clone()
            .watch(
                blocker,
                Some(WatchOptions::new().with_start_revision(header_rev + 1)),
            )
            .await?;
        'watch: loop {
            match stream.message().await? {
                Some(resp) => {
                    if resp.canceled() {
                        break 'watch;
                    }
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        break 'watch;
                    }
                }
                None => break 'watch,
            }
        }
    }
}

/// A lease records are attached to so that they expire on their own (e.g.
/// operation records after a day). A new lease is granted every
/// `ttl - keep`, so a record lives between `keep` and `ttl` seconds.
pub struct RetentionLease {
    client: Client,
    ttl: i64,
    keep: i64,
    current: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
}

impl std::fmt::Debug for RetentionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetentionLease")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RetentionLease {
    /// Records live at least `keep` seconds and at most `ttl`.
    pub fn new(client: Client, keep: i64, ttl: i64) -> Self {
        Self {
            client,
            ttl: ttl.max(keep + 1),
            keep,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The lease to attach a record to now.
    pub async fn id(&self) -> Result<i64, StoreError> {
        let mut current = self.current.lock().await;
        let fresh_for = Duration::from_secs((self.ttl - self.keep).max(1) as u64);
        if let Some((id, granted)) = *current
            && granted.elapsed() < fresh_for
        {
            return Ok(id);
        }
        let id = self.client.clone().lease_grant(self.ttl, None).await?.id();
        *current = Some((id, std::time::Instant::now()));
        Ok(id)
    }
}

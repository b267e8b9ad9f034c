//! Distributed locks on etcd, every key bound to the holder's lease so a dead
//! worker releases its locks when its lease expires.
//!
//! Recipe (etcd's RWMutex): a waiter puts `<prefix><r|w>-<uuid>` with its
//! lease and reads the prefix. A reader waits for every *writer* created
//! before it; a writer waits for *every* key created before it (so writers
//! are preferred: readers arriving after a writer queue behind it). Waiting
//! watches the deletion of the newest blocker, then re-reads. A wait that is
//! cancelled or times out deletes its key (the guard's drop does it), so no
//! lock leaks. A waiter whose own key vanished meanwhile (its lease expired)
//! fails with [`LockError::Lost`] instead of proceeding unprotected.
//!
//! # Fencing
//! Holding a lock is a claim that can go stale (lease expired while the
//! process was paused or cut off from etcd). Every guard knows its keys'
//! create revision ([`LockSet::fence`]); a store fenced by it
//! ([`crate::store::Store::fenced`]) compares them in every transaction, so
//! a stale holder's writes fail. [`Session::lost`] tells running handlers
//! that the lease their locks hang on is gone, so they stop (and their
//! Pulumi child with them) instead of running on unprotected.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use etcd_client::{
    Client, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio_util::sync::CancellationToken;

pub use crate::lock_keys::{challenge_lock, identity_lock, instance_lock, pool_lock, source_lock};
use crate::store::{Fence, StoreError};

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
    /// The waiter's own key is gone (its lease expired or was revoked).
    #[error("lock {0} lost while waiting for it")]
    Lost(String),
    /// etcd refused the lock's lease: it expired or was revoked.
    #[error("lease {0} is gone; a new one is being granted")]
    LeaseGone(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<etcd_client::Error> for LockError {
    fn from(e: etcd_client::Error) -> Self {
        Self::Store(StoreError::from(e))
    }
}

/// A lease kept alive in the background, revoked on [`Session::close`].
///
/// The keep-alive survives etcd outages: a broken stream is re-opened with
/// backoff, and a lease that expired meanwhile (etcd was away longer than
/// its TTL) is replaced by a new one, so the process recovers without a
/// restart. Locks held under an expired lease are gone; that is logged.
pub struct Session {
    client: Client,
    lease: Arc<Mutex<Generation>>,
    stop: CancellationToken,
    valid_until: tokio::sync::watch::Receiver<Option<SystemTime>>,
    ttl: i64,
}

/// One lease and the token cancelled when it is known (or presumed) lost.
#[derive(Debug, Clone)]
struct Generation {
    id: i64,
    lost: CancellationToken,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease", &self.lease())
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
        let asked = tokio::time::Instant::now();
        let granted = client.clone().lease_grant(ttl, None).await?.id();
        let lease = Arc::new(Mutex::new(Generation {
            id: granted,
            lost: CancellationToken::new(),
        }));
        let stop = CancellationToken::new();
        let deadline = asked + Duration::from_secs(ttl.max(1) as u64);
        let (valid, valid_until) = tokio::sync::watch::channel(Some(wall_clock(deadline)));
        tokio::spawn(keep_alive(
            client.clone(),
            ttl,
            Renewal {
                lease: lease.clone(),
                deadline,
                valid,
            },
            stop.clone(),
        ));
        Ok(Self {
            client,
            lease,
            stop,
            valid_until,
            ttl,
        })
    }

    /// Until when the current lease, and so every lock held under it, is
    /// known to live: the time of the last renewal etcd confirmed plus the
    /// TTL it gave then (`None` once the lease is known or presumed lost,
    /// until a new one is granted). It only moves while this process runs:
    /// a process paused or wedged leaves it in the past, which is what a
    /// guard outside the process watches (see the worker's Pulumi guard).
    pub fn valid_until(&self) -> tokio::sync::watch::Receiver<Option<SystemTime>> {
        self.valid_until.clone()
    }

    fn current(&self) -> Generation {
        match self.lease.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The TTL of its leases, in seconds.
    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// The lease id (it changes when etcd lost the previous one).
    pub fn lease(&self) -> i64 {
        self.current().id
    }

    /// A token cancelled once the current lease is known or presumed lost
    /// (etcd said it expired, or no keep-alive succeeded for a whole TTL).
    /// A handler takes it before its locks and stops when it fires: locks
    /// taken under a lease are at most as fresh as the lease.
    pub fn lost(&self) -> CancellationToken {
        self.current().lost
    }

    /// Tells the session that etcd refused `lease` (a lock put answered that
    /// it does not exist): when it is still the current one, it is treated
    /// as lost now (its handlers stopped, a new lease granted) rather than at
    /// the next keep-alive.
    pub fn report_lost(&self, lease: i64) {
        let current = self.current();
        if current.id == lease {
            current.lost.cancel();
        }
    }

    /// Stops the keep-alive and revokes the lease (releasing every lock).
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.client.clone().lease_revoke(self.lease()).await;
    }
}

/// What the keep-alive updates: the current lease, the time it is known to
/// live until, and that time published as [`Session::valid_until`].
struct Renewal {
    lease: Arc<Mutex<Generation>>,
    deadline: tokio::time::Instant,
    valid: tokio::sync::watch::Sender<Option<SystemTime>>,
}

/// `at` on the wall clock (which processes other than this one can read).
fn wall_clock(at: tokio::time::Instant) -> SystemTime {
    let now = tokio::time::Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

/// Keeps `lease` alive until `stop`, re-opening the stream after errors and
/// granting a new lease when the old one is lost: etcd answered that it
/// expired, or no keep-alive was confirmed before its deadline (the time of
/// the last confirmed request plus the TTL etcd gave then; a process paused
/// past it wakes up here). A lost lease's token is cancelled first, so the
/// handlers whose locks hung on it stop.
async fn keep_alive(client: Client, ttl: i64, renewal: Renewal, stop: CancellationToken) {
    use tokio::time::{Instant, timeout_at};
    let Renewal {
        lease,
        mut deadline,
        valid,
    } = renewal;
    let period = Duration::from_secs((ttl / 3).max(1) as u64);
    let full = Duration::from_secs(ttl.max(1) as u64);
    let mut retry = Duration::from_millis(200);
    loop {
        let (id, reported) = match lease.lock() {
            Ok(g) => (g.id, g.lost.clone()),
            Err(p) => {
                let g = p.into_inner();
                (g.id, g.lost.clone())
            }
        };
        // Renew until the stream breaks (false) or the lease is lost (true).
        let lost = 'renew: {
            let mut lease_client = client.lease_client();
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                r = timeout_at(deadline, lease_client.keep_alive(id)) => r,
            };
            let (mut keeper, mut responses) = match opened {
                Err(_) => break 'renew true,
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = id, ?retry, "lease keep-alive unavailable; retrying");
                    break 'renew false;
                }
            };
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                    // A lock put refused the lease (Session::report_lost).
                    _ = reported.cancelled() => break 'renew true,
                }
                let sent = Instant::now();
                if sent >= deadline {
                    break 'renew true;
                }
                match timeout_at(deadline, keeper.keep_alive()).await {
                    Err(_) => break 'renew true,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, lease = id, "lease keep-alive failed; reconnecting");
                        break 'renew false;
                    }
                    Ok(Ok(())) => {}
                }
                match timeout_at(deadline, responses.message()).await {
                    Err(_) => break 'renew true,
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        retry = Duration::from_millis(200);
                        deadline = sent + Duration::from_secs(r.ttl() as u64);
                        valid.send_replace(Some(wall_clock(deadline)));
                    }
                    Ok(Ok(Some(_))) => break 'renew true,
                    Ok(Ok(None) | Err(_)) => {
                        tracing::warn!(lease = id, "lease keep-alive stream ended; reconnecting");
                        break 'renew false;
                    }
                }
            }
        };
        if !lost {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(period);
            if Instant::now() < deadline {
                continue;
            }
        }
        tracing::error!(
            lease = id,
            "lease lost (expired, revoked, or not renewed within its TTL): locks held under it are gone, their handlers are stopped; granting a new one"
        );
        valid.send_replace(None);
        if let Ok(g) = lease.lock() {
            g.lost.cancel();
        }
        // Best effort: if etcd still has it, its keys go now rather than at expiry.
        let mut revoker = client.clone();
        tokio::spawn(async move {
            let _ = revoker.lease_revoke(id).await;
        });
        loop {
            let asked = Instant::now();
            match client.clone().lease_grant(ttl, None).await {
                Ok(r) => {
                    deadline = asked + full;
                    valid.send_replace(Some(wall_clock(deadline)));
                    if let Ok(mut g) = lease.lock() {
                        *g = Generation {
                            id: r.id(),
                            lost: CancellationToken::new(),
                        };
                    }
                    tracing::info!(lease = r.id(), "new lease granted");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?retry, "lease grant failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(period);
                }
            }
        }
    }
}

/// A held lock; released by [`LockGuard::release`] or, failing that, on drop.
pub struct LockGuard {
    client: Client,
    key: String,
    created: i64,
    released: bool,
}

impl LockGuard {
    /// The fence of this lock: its key and create revision (see [`Fence`]).
    pub fn fence(&self) -> Fence {
        Fence::new(vec![(self.key.clone(), self.created)])
    }

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
            tracing::warn!(error = %e, key = %self.key, "lock release failed; retrying in the background");
            release_in_background(self.client.clone(), vec![std::mem::take(&mut self.key)]);
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let key = std::mem::take(&mut self.key);
        release_in_background(self.client.clone(), vec![key]);
    }
}

/// Several locks taken together (see [`acquire_all`]); released together.
pub struct LockSet {
    client: Client,
    keys: Vec<String>,
    created: i64,
}

impl std::fmt::Debug for LockSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockSet")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl LockSet {
    /// The fence of these locks: their keys and create revision (see [`Fence`]).
    pub fn fence(&self) -> Fence {
        Fence::new(
            self.keys
                .iter()
                .map(|k| (k.clone(), self.created))
                .collect(),
        )
    }

    /// Releases every lock of the set, in the background (one transaction).
    pub fn release(self) {
        drop(self);
    }

    /// Releases every lock of the set and waits until etcd applied it, for
    /// a holder whose next read must come after the release (one
    /// transaction; on failure, retried in the background as [`release`]
    /// does, and `false`).
    ///
    /// [`release`]: LockSet::release
    pub async fn release_now(mut self) -> bool {
        let keys = std::mem::take(&mut self.keys);
        match self.client.txn(delete_all(&keys)).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "lock release failed; retrying in the background");
                release_in_background(self.client.clone(), keys);
                false
            }
        }
    }
}

impl Drop for LockSet {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        if keys.is_empty() {
            return;
        }
        release_in_background(self.client.clone(), keys);
    }
}

/// The transaction deleting every key of `keys` (a set's release).
fn delete_all(keys: &[String]) -> Txn {
    Txn::new().and_then(
        keys.iter()
            .map(|k| TxnOp::delete(k.as_str(), None))
            .collect::<Vec<_>>(),
    )
}

/// Deletes lock keys in the background (one transaction), retrying with
/// backoff until etcd takes it: the keys are bound to a lease this process
/// keeps alive, so a release lost to an etcd outage would otherwise hold the
/// lock for as long as the process lives.
fn release_in_background(mut client: Client, keys: Vec<String>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            match client.txn(delete_all(&keys)).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, ?delay, "lock release failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
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
    let resp = client
        .clone()
        .txn(Txn::new().and_then(ops))
        .await
        .map_err(|e| lease_refused(e, lease))?;
    let my_rev = resp.header().map_or(0, |h| h.revision());
    let set = LockSet {
        client: client.clone(),
        keys,
        created: my_rev,
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
        for ((prefix, mode), key) in locks.iter().zip(&set.keys) {
            wait_turn(client, prefix, *mode, key, my_rev).await?;
        }
        Ok::<(), LockError>(())
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(())) => Ok(set),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LockError::Timeout(timeout)),
    }
}

/// A lock key's put failed: etcd answers `NotFound` to a put only when its
/// lease does not exist (expired or revoked), which [`LockError::LeaseGone`]
/// says so the session can replace it at once (`Session::report_lost`).
fn lease_refused(e: etcd_client::Error, lease: i64) -> LockError {
    match &e {
        etcd_client::Error::GRpcStatus(status)
            if i32::from(status.code()) == cm_schemas::v1::Code::NotFound as i32 =>
        {
            LockError::LeaseGone(lease)
        }
        _ => e.into(),
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
        Some("identity") => "identity",
        _ => "other",
    }
}

fn blocks(kv: &etcd_client::KeyValue, prefix: &str, mode: LockMode, my_rev: i64) -> bool {
    kv.create_revision() < my_rev
        && (mode == LockMode::Write
            || kv.key()[prefix.len()..].starts_with(LockMode::Write.tag().as_bytes()))
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
        .await
        .map_err(|e| lease_refused(e, lease))?;
    let my_rev = put.header().map_or(0, |h| h.revision());
    // From here on, the guard deletes the key if we give up.
    let guard = LockGuard {
        client: client.clone(),
        key,
        created: my_rev,
        released: false,
    };
    match tokio::time::timeout(timeout, wait_turn(client, prefix, mode, &guard.key, my_rev)).await {
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
    mine: &str,
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
        // Our own key must still be there: a waiter whose lease expired
        // while it waited holds nothing, whatever the blockers did.
        if !resp
            .kvs()
            .iter()
            .any(|kv| kv.key() == mine.as_bytes() && kv.create_revision() == my_rev)
        {
            return Err(LockError::Lost(mine.to_owned()));
        }
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

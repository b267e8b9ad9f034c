//! Pulumi stack states in the JetStream object store, out of etcd's history.
//!
//! A stack state is opaque here: bytes whose layout only the worker's Pulumi
//! driver knows. A state written with its record ([`StackStore::put`]) is a
//! new object (chunked, any size) named by a [`StatePointer`] (object name,
//! SHA-256, size): the caller writes that small pointer into etcd in the
//! same guarded, fenced transaction as the record (see `store`), then
//! removes the object the pointer replaced; a write whose transaction fails
//! removes its own object.
//!
//! The checkpoints of one Pulumi run go to one object of that run
//! ([`StackStore::checkpoint_object`]), rewritten in place: its pointer
//! (`live`, no digest: the content moves on) is written to etcd once, at
//! the run's first checkpoint. So etcd's history grows by two pointers per
//! run whatever the state's size and the number of checkpoints, and the
//! bucket holds one object per stack plus, during a run, the run's own.
//!
//! Why an object per run or per write rather than one name per stack: a
//! stale holder (lock lost, run not yet stopped) may still write. Under one
//! name its write would replace the state the live holder's pointer names;
//! under its own name it only touches an object no live pointer names,
//! which its writer removes or [`StackStore::sweep`] collects.
//!
//! # Objects
//! ```text
//! bucket BUCKET, object <root>/<cid>/<identity>/<uuid>       a state written with its record
//!                       <root>/<cid>/<identity>/run-<uuid>   the checkpoints of one run
//! ```   (ids encoded as in `store`)
//! A removed object's metadata tombstone is purged too, so the bucket's
//! stream does not grow with the number of writes.

use std::{collections::HashSet, time::Duration};

use async_nats::jetstream::{
    self,
    object_store::{ObjectInfo, ObjectStore},
    stream::Stream,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    Identity, ids,
    object_read::{self, ObjectReadError},
};

/// Longest time one operation on the bucket may take. While a stream's
/// leader is being elected (a NATS node restarting) a read can wait for
/// ever, and the handler waiting holds its locks: every command on that
/// challenge would queue behind it.
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn bounded<T>(
    what: &str,
    operation: impl std::future::Future<Output = Result<T, StackStoreError>>,
) -> Result<T, StackStoreError> {
    tokio::time::timeout(OPERATION_TIMEOUT, operation)
        .await
        .unwrap_or_else(|_| {
            Err(StackStoreError::Unavailable(format!(
                "{what} timed out after {OPERATION_TIMEOUT:?}"
            )))
        })
}

/// The object store bucket holding stack states.
pub const BUCKET: &str = "cm-stack-states";

/// Where a stack state is: written in etcd in place of the state itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatePointer {
    /// The object's name in [`BUCKET`].
    pub object: String,
    /// SHA-256 of the state, lowercase hex (empty when `live`).
    pub sha256: String,
    /// The state's size in bytes (0 when `live`).
    pub size: u64,
    /// The object is a run's checkpoint, rewritten in place while the run
    /// lasts: read as it is, without a digest to check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

/// Why a state could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StackStoreError {
    /// JetStream failed (retryable).
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// The pointer names an object that is not there.
    #[error("stack state {object} is missing from the object store")]
    Missing { object: String },
    /// What was read is not what the pointer describes.
    #[error("stack state {object} does not match its pointer ({reason})")]
    Mismatch { object: String, reason: String },
}

impl StackStoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

fn unavailable(e: impl std::fmt::Display) -> StackStoreError {
    StackStoreError::Unavailable(e.to_string())
}

/// Stack states of one store root.
#[derive(Clone)]
pub struct StackStore {
    js: jetstream::Context,
    bucket: ObjectStore,
    /// The bucket's stream: reads go to its leader (see `object_read`).
    stream: Stream,
    prefix: String,
}

impl std::fmt::Debug for StackStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The bucket, created with `replicas` when missing.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<ObjectStore, StackStoreError> {
    let name = format!("OBJ_{BUCKET}");
    match js.get_stream(&name).await {
        Ok(mut stream) => {
            // Direct gets may be answered by a replica that has not caught
            // up (one just restarted): a state written a moment ago would
            // read as missing. Reads of this bucket go to the leader.
            let config = stream.info().await.map_err(unavailable)?.config.clone();
            if config.allow_direct {
                js.update_stream(jetstream::stream::Config {
                    allow_direct: false,
                    ..config
                })
                .await
                .map_err(unavailable)?;
            }
        }
        Err(_) => {
            // The object store's own stream layout, but leader-only reads.
            let created = js.create_stream(jetstream::stream::Config {
                name,
                description: Some(
                    "ctf-instancer: Pulumi stack states, one object per stack".into(),
                ),
                subjects: vec![format!("$O.{BUCKET}.C.>"), format!("$O.{BUCKET}.M.>")],
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                discard: jetstream::stream::DiscardPolicy::New,
                allow_rollup: true,
                allow_direct: false,
                ..Default::default()
            });
            // Another process may have created it meanwhile.
            if let Err(e) = created.await
                && js.get_stream(format!("OBJ_{BUCKET}")).await.is_err()
            {
                return Err(unavailable(e));
            }
        }
    }
    js.get_object_store(BUCKET).await.map_err(unavailable)
}

impl StackStore {
    /// [`Self::remove_unbounded`], within [`OPERATION_TIMEOUT`].
    pub async fn remove(&self, object: &str) -> Result<(), StackStoreError> {
        bounded("removing a state", self.remove_unbounded(object)).await
    }

    /// [`Self::get_unbounded`], within [`OPERATION_TIMEOUT`].
    pub async fn get(&self, pointer: &StatePointer) -> Result<Vec<u8>, StackStoreError> {
        bounded("reading a state", self.get_unbounded(pointer)).await
    }

    /// [`Self::rewrite_unbounded`], within [`OPERATION_TIMEOUT`].
    pub async fn rewrite(
        &self,
        pointer: &StatePointer,
        state: &[u8],
    ) -> Result<(), StackStoreError> {
        bounded(
            "rewriting a checkpoint",
            self.rewrite_unbounded(pointer, state),
        )
        .await
    }

    /// [`Self::put_unbounded`], within [`OPERATION_TIMEOUT`].
    pub async fn put(
        &self,
        cid: &str,
        identity: &Identity,
        state: &[u8],
    ) -> Result<StatePointer, StackStoreError> {
        bounded("storing a state", self.put_unbounded(cid, identity, state)).await
    }

    /// The states of the store rooted at `root` (the etcd root: two
    /// deployments sharing a NATS server never touch each other's objects).
    /// The bucket is created by `queue::ensure_streams` with the
    /// deployment's replicas; here, with one, only if it is still missing.
    pub async fn open(js: &jetstream::Context, root: &str) -> Result<Self, StackStoreError> {
        let bucket = ensure_bucket(js, 1).await?;
        let stream = js
            .get_stream(format!("OBJ_{BUCKET}"))
            .await
            .map_err(unavailable)?;
        Ok(Self {
            js: js.clone(),
            bucket,
            stream,
            prefix: format!("{}/", ids::encode(root)),
        })
    }

    fn stack_prefix(&self, cid: &str, identity: &Identity) -> String {
        format!("{}{}/{identity}/", self.prefix, ids::encode(cid))
    }

    /// Stores `state` as a new object of the stack and returns its pointer.
    /// Nothing refers to it until the caller writes the pointer.
    async fn put_unbounded(
        &self,
        cid: &str,
        identity: &Identity,
        state: &[u8],
    ) -> Result<StatePointer, StackStoreError> {
        let object = format!(
            "{}{}",
            self.stack_prefix(cid, identity),
            uuid::Uuid::new_v4().simple()
        );
        let mut reader = state;
        self.bucket
            .put(object.as_str(), &mut reader)
            .await
            .map_err(unavailable)?;
        Ok(StatePointer {
            object,
            sha256: hex::encode(Sha256::digest(state)),
            size: state.len() as u64,
            live: false,
        })
    }

    /// A new object name for the checkpoints of one run of the stack, and
    /// its (live) pointer.
    pub fn checkpoint_object(&self, cid: &str, identity: &Identity) -> StatePointer {
        StatePointer {
            object: format!(
                "{}run-{}",
                self.stack_prefix(cid, identity),
                uuid::Uuid::new_v4().simple()
            ),
            sha256: String::new(),
            size: 0,
            live: true,
        }
    }

    /// Writes `state` as the content of the live object `pointer` names,
    /// replacing what it held.
    async fn rewrite_unbounded(
        &self,
        pointer: &StatePointer,
        state: &[u8],
    ) -> Result<(), StackStoreError> {
        let mut reader = state;
        self.bucket
            .put(pointer.object.as_str(), &mut reader)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The state `pointer` names, checked against its size and digest
    /// (a live object against the digest its metadata carries).
    async fn get_unbounded(&self, pointer: &StatePointer) -> Result<Vec<u8>, StackStoreError> {
        let limit = if pointer.live { u64::MAX } else { pointer.size };
        let mismatch = |reason: String| StackStoreError::Mismatch {
            object: pointer.object.clone(),
            reason,
        };
        let read = object_read::read(&self.stream, BUCKET, &pointer.object, limit).await;
        let data = match read {
            Ok(Some(object)) => object.data,
            Ok(None) => {
                return Err(StackStoreError::Missing {
                    object: pointer.object.clone(),
                });
            }
            Err(ObjectReadError::Unavailable(e)) => return Err(StackStoreError::Unavailable(e)),
            Err(e) => return Err(mismatch(e.to_string())),
        };
        if pointer.live {
            return Ok(data);
        }
        if data.len() as u64 != pointer.size {
            return Err(mismatch(format!(
                "{} bytes, expected {}",
                data.len(),
                pointer.size
            )));
        }
        let actual = hex::encode(Sha256::digest(&data));
        if actual != pointer.sha256 {
            return Err(mismatch(format!("sha256 {actual}")));
        }
        Ok(data)
    }

    /// Removes an object and its metadata tombstone. Removing one that is
    /// already gone succeeds.
    async fn remove_unbounded(&self, object: &str) -> Result<(), StackStoreError> {
        match self.bucket.delete(object).await {
            Ok(()) => {}
            Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(unavailable(e)),
        }
        // The delete leaves a metadata message saying "deleted"; one per
        // write would grow the stream for ever.
        let meta = format!(
            "$O.{BUCKET}.M.{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, object)
        );
        self.stream
            .purge()
            .filter(meta)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The names of this root's objects.
    pub async fn names(&self) -> Result<Vec<String>, StackStoreError> {
        Ok(self
            .objects()
            .await?
            .into_iter()
            .map(|info| info.name)
            .collect())
    }

    /// This root's objects.
    async fn objects(&self) -> Result<Vec<ObjectInfo>, StackStoreError> {
        let all = object_read::list(&self.stream, BUCKET)
            .await
            .map_err(unavailable)?;
        Ok(all
            .into_iter()
            .filter(|info| info.name.starts_with(&self.prefix))
            .collect())
    }

    /// Removes this root's objects that no pointer names and that are older
    /// than `grace` (a writer between its put and its pointer's transaction
    /// is younger). Returns how many were removed.
    pub async fn sweep(
        &self,
        referenced: &HashSet<String>,
        grace: Duration,
    ) -> Result<usize, StackStoreError> {
        let now = time::OffsetDateTime::now_utc();
        let grace = time::Duration::try_from(grace).unwrap_or(time::Duration::MAX);
        let orphans: Vec<String> = self
            .objects()
            .await?
            .into_iter()
            .filter(|info| {
                !referenced.contains(&info.name) && info.modified.is_some_and(|m| now - m > grace)
            })
            .map(|info| info.name)
            .collect();
        for object in &orphans {
            self.remove(object).await?;
        }
        Ok(orphans.len())
    }

    /// Bytes and objects the bucket holds (all roots), for the benchmarks.
    pub async fn usage(&self) -> Result<(u64, u64), StackStoreError> {
        let info = self
            .js
            .get_stream(format!("OBJ_{BUCKET}"))
            .await
            .map_err(unavailable)?
            .info()
            .await
            .map_err(unavailable)?
            .clone();
        Ok((info.state.bytes, info.state.messages))
    }
}

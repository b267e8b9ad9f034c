//! Reading objects of a JetStream object store bucket with plain message
//! gets that the stream's leader answers, never a consumer.
//!
//! The client's own `ObjectStore::get` streams an object's chunks through
//! an ephemeral ordered consumer. On a clustered nats-server 2.9 (Debian
//! bookworm's) the soak saw such reads of one state wait, on every one of
//! eight deliveries over twelve minutes, until our 60 s bound cut them off,
//! after NATS nodes had been killed and restarted. A message get is one
//! request with the JetStream timeout: it answers, or fails and is retried.
//! It also reads what the leader holds, never a replica that lags.
//!
//! An object is its metadata message (`$O.<bucket>.M.<base64 name>`, the
//! last one wins) naming a `nuid`, and `chunks` messages on
//! `$O.<bucket>.C.<nuid>`. A rewrite stores new chunks under a new nuid,
//! then the metadata, then purges the old chunks: a reader that finds a
//! chunk gone reads the metadata again, and starts over if it moved on.

use async_nats::jetstream::{
    object_store::ObjectInfo,
    stream::{LastRawMessageErrorKind, Stream},
};
use base64::Engine as _;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};

/// How long a read keeps starting over while the object is rewritten
/// under it. A run rewrites its checkpoint at most once per checkpoint
/// interval (2 s by default), so a read normally starts over once at most;
/// a count would fail a read that is merely slower than a burst of
/// rewrites (a loaded machine), a deadline only one that never catches up.
const REWRITES_FOLLOWED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Why an object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectReadError {
    /// The metadata names chunks the stream does not hold.
    #[error("chunk {chunk} of {chunks} is missing")]
    ChunksMissing { chunk: usize, chunks: usize },
    /// The chunks do not hash to the metadata's digest.
    #[error("the content does not match its digest")]
    Digest,
    /// More bytes than the caller accepts.
    #[error("larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// JetStream failed or did not answer (retryable).
    #[error("{0}")]
    Unavailable(String),
}

/// An object and its bytes.
#[derive(Debug)]
pub struct ReadObject {
    pub info: ObjectInfo,
    pub data: Vec<u8>,
}

fn unavailable(e: impl std::fmt::Display) -> ObjectReadError {
    ObjectReadError::Unavailable(e.to_string())
}

fn meta_subject(bucket: &str, name: &str) -> String {
    format!(
        "$O.{bucket}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(name)
    )
}

/// The object's current metadata; `None` when it has none or is deleted.
pub async fn info<I>(
    stream: &Stream<I>,
    bucket: &str,
    name: &str,
) -> Result<Option<ObjectInfo>, ObjectReadError> {
    last_info(stream, &meta_subject(bucket, name)).await
}

async fn last_info<I>(
    stream: &Stream<I>,
    subject: &str,
) -> Result<Option<ObjectInfo>, ObjectReadError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => {
            let info: ObjectInfo = serde_json::from_slice(&message.payload)
                .map_err(|e| unavailable(format!("unreadable object metadata: {e}")))?;
            Ok((!info.deleted).then_some(info))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// Reads object `name` of `bucket` whole, checked against its digest;
/// `None` when there is no such object. At most `limit` bytes.
pub async fn read<I>(
    stream: &Stream<I>,
    bucket: &str,
    name: &str,
    limit: u64,
) -> Result<Option<ReadObject>, ObjectReadError> {
    let subject = meta_subject(bucket, name);
    let deadline = tokio::time::Instant::now() + REWRITES_FOLLOWED_FOR;
    let mut rewrites = 0;
    while rewrites == 0 || tokio::time::Instant::now() < deadline {
        let Some(info) = last_info(stream, &subject).await? else {
            return Ok(None);
        };
        if info.size as u64 > limit {
            return Err(ObjectReadError::TooLarge { limit });
        }
        match read_chunks(stream, bucket, &info).await? {
            Ok(data) => return Ok(Some(ReadObject { info, data })),
            Err(chunk) => {
                // Gone under us: rewritten (the metadata moved on) or lost.
                let again = last_info(stream, &subject).await?;
                if again.as_ref().map(|i| &i.nuid) == Some(&info.nuid) {
                    return Err(ObjectReadError::ChunksMissing {
                        chunk,
                        chunks: info.chunks,
                    });
                }
                rewrites += 1;
            }
        }
    }
    Err(ObjectReadError::Unavailable(format!(
        "rewritten {rewrites} times in {} s while being read",
        REWRITES_FOLLOWED_FOR.as_secs()
    )))
}

/// The chunks of `info` in order, or the (1-based) number of the first
/// one the stream does not hold.
async fn read_chunks<I>(
    stream: &Stream<I>,
    bucket: &str,
    info: &ObjectInfo,
) -> Result<Result<Vec<u8>, usize>, ObjectReadError> {
    let subject = format!("$O.{bucket}.C.{}", info.nuid);
    let mut data = Vec::with_capacity(info.size);
    let mut sha = Sha256::new();
    let mut next = 1;
    for chunk in 1..=info.chunks {
        let message = match stream
            .get_first_raw_message_by_subject(&subject, next)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Err(chunk));
            }
            Err(e) => return Err(unavailable(e)),
        };
        sha.update(&message.payload);
        data.extend_from_slice(&message.payload);
        next = message.sequence + 1;
    }
    let digest = format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(sha.finalize())
    );
    if data.len() != info.size || info.digest.as_ref().is_some_and(|d| *d != digest) {
        return Err(ObjectReadError::Digest);
    }
    Ok(Ok(data))
}

/// The metadata of every object of `bucket` (deleted ones left out), read
/// subject by subject from the leader.
pub async fn list<I>(stream: &Stream<I>, bucket: &str) -> Result<Vec<ObjectInfo>, ObjectReadError> {
    let subjects: Vec<String> = stream
        .info_with_subjects(format!("$O.{bucket}.M.>"))
        .await
        .map_err(unavailable)?
        .map_ok(|(subject, _count)| subject)
        .try_collect()
        .await
        .map_err(unavailable)?;
    let mut infos = Vec::with_capacity(subjects.len());
    for subject in subjects {
        if let Some(info) = last_info(stream, &subject).await? {
            infos.push(info);
        }
    }
    Ok(infos)
}

//! State snapshots in the `conv_snapshots` bucket, written with optimistic
//! concurrency: every write names the revision it replaces, so an owner that
//! lost its partition (a stale owner) cannot overwrite newer state — its write
//! is refused with [`Error::Conflict`] and it gives the partition up.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use conv_nats::topology::KV_SNAPSHOTS;
use serde::{Deserialize, Serialize};

use crate::state::State;

/// A snapshot: the state after some applied marker, and that marker's
/// `CONV_APPLIED` sequence (where the journal tail starts on restore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub applied_seq: u64,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Someone else wrote the snapshot since we read it: we are a stale owner.
    #[error("snapshot of {conversation} changed under us (expected revision {expected:?}): stale owner")]
    Conflict { conversation: String, expected: Option<u64> },
    #[error("snapshot store: {0}")]
    Store(String),
}

/// The snapshot bucket.
#[derive(Debug, Clone)]
pub struct Snapshots {
    kv: kv::Store,
}

impl Snapshots {
    pub async fn open(js: &jetstream::Context) -> Result<Self, Error> {
        let kv = js.get_key_value(KV_SNAPSHOTS).await.map_err(|e| Error::Store(e.to_string()))?;
        Ok(Self { kv })
    }

    /// The stored snapshot (`None` when absent or unreadable — the state is
    /// then rebuilt from the journal) and the key's revision (`Some` whenever
    /// the key exists, so an unreadable snapshot is overwritten, not fought over).
    pub async fn load(&self, conversation: &str) -> Result<(Option<Snapshot>, Option<u64>), Error> {
        let entry = self.kv.entry(conversation).await.map_err(|e| Error::Store(e.to_string()))?;
        Ok(match entry {
            None => (None, None),
            Some(e) => {
                let snapshot = serde_json::from_slice::<Snapshot>(&e.value)
                    .ok()
                    .filter(|s| s.state.format == crate::state::SNAPSHOT_FORMAT);
                if snapshot.is_none() {
                    tracing::warn!(
                        message = "Unreadable snapshot; rebuilding from the journal.",
                        conversation_id = conversation
                    );
                }
                (snapshot, Some(e.revision))
            }
        })
    }

    /// Writes `snapshot` if the stored revision is still `expected` (`None`:
    /// there must be none). Returns the new revision.
    pub async fn save(&self, conversation: &str, snapshot: &Snapshot, expected: Option<u64>) -> Result<u64, Error> {
        let bytes = Bytes::from(serde_json::to_vec(snapshot).unwrap_or_default());
        let conflict = || Error::Conflict { conversation: conversation.to_owned(), expected };
        match expected {
            None => self.kv.create(conversation, bytes).await.map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => conflict(),
                _ => Error::Store(e.to_string()),
            }),
            Some(revision) => self.kv.update(conversation, bytes, revision).await.map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => conflict(),
                _ => Error::Store(e.to_string()),
            }),
        }
    }
}

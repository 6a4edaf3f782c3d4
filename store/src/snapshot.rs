//! State snapshots of any size: a head in `conv_snapshots`, written with
//! optimistic concurrency (every write names the revision it replaces, so an
//! owner that lost its partition cannot overwrite newer state — its write is
//! refused with [`Error::Conflict`] and it gives the partition up), and one
//! value per entry in `conv_entries` (layout: `conv_core::snapshot`).
//!
//! Entries are written when added or changed ([`Snapshots::flush`]): before
//! an LLM step's directive is published (effects read its context there)
//! and before each head. A head names the revision of every entry's copy;
//! [`Snapshots::load`] reads exactly those (the bucket keeps a few
//! revisions per key), so entries written after the head — by this owner or
//! by a stale one — never leak into the restored state. If a named copy is
//! gone, the head is unusable and the state is rebuilt from the journal.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use conv_core::snapshot::{self as codec, EncodedValue, Snapshot};
use conv_core::state::Entry;
use conv_nats::topology::{KV_ENTRIES, KV_SNAPSHOTS};
use futures::{StreamExt, TryStreamExt};

use crate::parts::{self, PartsError};

/// How many entry reads or writes are in flight at once.
const PIPELINE: usize = 64;
/// Room left in a store value for the message's headers and framing.
const VALUE_HEADROOM: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Someone else wrote the snapshot since we read it: we are a stale owner.
    #[error("snapshot of {conversation} changed under us (expected revision {expected:?}): stale owner")]
    Conflict { conversation: String, expected: Option<u64> },
    #[error("snapshot store: {0}")]
    Store(String),
    #[error("snapshot codec: {0}")]
    Codec(#[from] codec::CodecError),
    /// An entry (or a part of it) a head names is not in the store (any more).
    #[error("entry {key} revision {revision} is not in the store")]
    MissingEntry { key: String, revision: u64 },
}

impl From<PartsError> for Error {
    fn from(e: PartsError) -> Self {
        match e {
            PartsError::Store(detail) => Error::Store(detail),
            PartsError::Codec(c) => Error::Codec(c),
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

/// A conversation's stored snapshot, as [`Snapshots::load`] found it.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The snapshot, `None` when there is none or it cannot be used (the
    /// state is then rebuilt from the journal).
    pub snapshot: Option<Snapshot>,
    /// The head's revision: `Some` whenever the key exists, so an unusable
    /// head is overwritten, not fought over.
    pub revision: Option<u64>,
    /// The revision of each entry's stored copy (what the next head names
    /// for the entries not written since).
    pub entries: Vec<u64>,
}

/// The snapshot store (heads and entries).
#[derive(Debug, Clone)]
pub struct Snapshots {
    heads: kv::Store,
    entries: kv::Store,
    /// Largest value written (the server's max payload less headroom).
    max_value: usize,
}

impl Snapshots {
    pub async fn open(js: &jetstream::Context) -> Result<Self, Error> {
        let heads = js.get_key_value(KV_SNAPSHOTS).await.map_err(store_err)?;
        let entries = js.get_key_value(KV_ENTRIES).await.map_err(store_err)?;
        let max_payload = conv_nats::connect::max_payload(&js.client());
        let max_value = max_payload.saturating_sub(VALUE_HEADROOM).max(16 * 1024);
        Ok(Self { heads, entries, max_value })
    }

    /// The stored snapshot of a conversation, its entries read at the
    /// revisions its head names.
    pub async fn load(&self, conversation: &str) -> Result<Loaded, Error> {
        let Some(head) = self.heads.entry(codec::head_key(conversation)).await.map_err(store_err)? else {
            return Ok(Loaded::default());
        };
        let revision = Some(head.revision);
        let decoded = match codec::decode_head(&head.value) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(
                    message = "Unreadable snapshot head; rebuilding from the journal.",
                    conversation_id = conversation,
                    error = %e
                );
                return Ok(Loaded { snapshot: None, revision, entries: Vec::new() });
            }
        };
        let revisions = decoded.entries.clone();
        let reads: Vec<_> =
            revisions.iter().enumerate().map(|(place, &rev)| self.read_at(conversation, place, rev)).collect();
        let entries: Result<Vec<Entry>, Error> = futures::stream::iter(reads).buffered(PIPELINE).try_collect().await;
        let entries = match entries {
            Ok(e) => e,
            Err(e @ (Error::MissingEntry { .. } | Error::Codec(_))) => {
                tracing::warn!(
                    message = "Snapshot entries unusable; rebuilding from the journal.",
                    conversation_id = conversation,
                    error = %e
                );
                return Ok(Loaded { snapshot: None, revision, entries: Vec::new() });
            }
            Err(e) => return Err(e),
        };
        let snapshot = codec::assemble(decoded, entries)?;
        Ok(Loaded { snapshot: Some(snapshot), revision, entries: revisions })
    }

    /// The entry at `place` as stored at `revision`.
    async fn read_at(&self, conversation: &str, place: usize, revision: u64) -> Result<Entry, Error> {
        let key = codec::entry_key(conversation, place);
        let missing = || Error::MissingEntry { key: key.clone(), revision };
        let first = match self.entries.entry_for_revision(key.as_str(), revision).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => e.value,
            Err(e) if e.kind() == kv::EntryErrorKind::TimedOut => return Err(store_err(e)),
            _ => return Err(missing()),
        };
        let bytes = parts::read(&self.entries, &key, &first).await?.ok_or_else(missing)?;
        Ok(codec::decode_entry(&bytes)?)
    }

    /// The latest stored copy of the entry at `place` (`None`: never
    /// written). What effects read a context with.
    pub async fn latest_entry(&self, conversation: &str, place: usize) -> Result<Option<Entry>, Error> {
        let key = codec::entry_key(conversation, place);
        match self.entries.entry(&key).await.map_err(store_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let bytes = parts::read(&self.entries, &key, &e.value)
                    .await?
                    .ok_or_else(|| Error::MissingEntry { key: key.clone(), revision: e.revision })?;
                Ok(Some(codec::decode_entry(&bytes)?))
            }
            _ => Ok(None),
        }
    }

    /// Writes the entries of `state` added or changed since the last flush
    /// (and any `revisions` does not cover yet), pipelined; `revisions`
    /// then names every entry's latest copy. Returns how many were written.
    pub async fn flush(
        &self,
        conversation: &str,
        state: &mut conv_core::state::State,
        revisions: &mut Vec<u64>,
    ) -> Result<usize, Error> {
        let mut places = state.take_touched();
        places.extend(revisions.len()..state.entries.len());
        places.sort_unstable();
        places.dedup();
        let writes: Vec<_> = places
            .iter()
            .map(|&place| codec::encode_entry(&state.entries[place], self.max_value).map(|e| (place, e)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|(place, encoded)| self.write_entry(conversation, place, encoded))
            .collect();
        let written: Result<Vec<(usize, u64)>, Error> =
            futures::stream::iter(writes).buffer_unordered(PIPELINE).try_collect().await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                // Written again on the next flush.
                for &p in &places {
                    state.retouch(p);
                }
                return Err(e);
            }
        };
        revisions.resize(state.entries.len(), 0);
        for (place, rev) in &written {
            revisions[*place] = *rev;
        }
        Ok(written.len())
    }

    /// Writes one entry: its parts (if split), then its first value.
    async fn write_entry(
        &self,
        conversation: &str,
        place: usize,
        encoded: EncodedValue,
    ) -> Result<(usize, u64), Error> {
        let key = codec::entry_key(conversation, place);
        let first = parts::write(&self.entries, &key, &encoded).await?;
        let revision = self.entries.put(key, first).await.map_err(store_err)?;
        Ok((place, revision))
    }

    /// Writes `snapshot`: its changed entries, then its head if the stored
    /// head revision is still `expected` (`None`: there must be none).
    /// Returns the new head revision.
    pub async fn save(
        &self,
        conversation: &str,
        snapshot: &mut Snapshot,
        revisions: &mut Vec<u64>,
        expected: Option<u64>,
    ) -> Result<u64, Error> {
        self.flush(conversation, &mut snapshot.state, revisions).await?;
        let bytes = Bytes::from(codec::encode_head(snapshot, revisions)?);
        let key = codec::head_key(conversation);
        let conflict = || Error::Conflict { conversation: conversation.to_owned(), expected };
        match expected {
            None => self.heads.create(key, bytes).await.map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => conflict(),
                _ => store_err(e),
            }),
            Some(revision) => self.heads.update(key, bytes, revision).await.map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => conflict(),
                _ => store_err(e),
            }),
        }
    }
}

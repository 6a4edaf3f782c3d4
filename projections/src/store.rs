//! How a timeline is kept in the `conv_projections` bucket, so that a write
//! costs the same at entry 10 and at entry 10 000.
//!
//! * `<conversation>`: the header — run status, position, where a reader of
//!   the stream can start reading the output after it (`resume_seq`), how
//!   many sealed blocks there are, and the *tail*: every entry after them.
//!   Written with the expected revision, so two writers cannot both win.
//! * `<conversation>.b<k>`: sealed block `k`, entries `k*64 .. k*64+64`.
//!   Once the tail holds 128 entries its first 64 are sealed into a new
//!   block; the tail therefore stays between 64 and 128 entries. A block is
//!   rewritten only when one of its entries changes (rare: a late tool result).
//!
//! A flush writes the header and, now and then, one block: O(1) per batch of
//! events whatever the length of the conversation.

use std::collections::BTreeSet;

use async_nats::jetstream::kv;
use bytes::Bytes;
use conv_contracts::payload::RunStatus;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::timeline::{Entry, Indexed, Timeline};

/// Entries per sealed block.
pub const BLOCK: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    conversation_id: String,
    run_status: RunStatus,
    position: u64,
    /// A `CONV_OUT` sequence at or before which no output after `position`
    /// is stored: where to read from to catch up with this view.
    #[serde(default)]
    resume_seq: u64,
    blocks: usize,
    tail: Vec<Entry>,
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conv_projections: {0}")]
    Kv(String),
    #[error("the stored view of {conversation} is unreadable: {detail}")]
    Unreadable { conversation: String, detail: String },
    #[error("the view of {0} was written by someone else")]
    Conflict(String),
}

fn kv_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Kv(e.to_string())
}

fn block_key(conversation: &str, k: usize) -> String {
    format!("{conversation}.b{k}")
}

/// A view as stored: the timeline, its sealed block count and revision.
#[derive(Debug, Clone)]
pub struct Stored {
    pub view: Indexed,
    pub blocks: usize,
    pub revision: Option<u64>,
    pub resume_seq: u64,
}

impl Stored {
    pub fn new(conversation: &str) -> Self {
        Self { view: Indexed::new(conversation), blocks: 0, revision: None, resume_seq: 0 }
    }
}

async fn header(store: &kv::Store, conversation: &str) -> Result<Option<(Header, u64)>, StoreError> {
    let Some(entry) = store.entry(conversation).await.map_err(kv_error)? else { return Ok(None) };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let header: Header = serde_json::from_slice(&entry.value)
        .map_err(|e| StoreError::Unreadable { conversation: conversation.to_owned(), detail: e.to_string() })?;
    Ok(Some((header, entry.revision)))
}

async fn blocks(store: &kv::Store, conversation: &str, n: usize) -> Result<Vec<Entry>, StoreError> {
    let blocks: Vec<Vec<Entry>> = futures::stream::iter(0..n)
        .map(|k| async move {
            let bytes = store.get(block_key(conversation, k)).await.map_err(kv_error)?.ok_or_else(|| {
                StoreError::Unreadable {
                    conversation: conversation.to_owned(),
                    detail: format!("block {k} is missing"),
                }
            })?;
            serde_json::from_slice::<Vec<Entry>>(&bytes).map_err(|e| StoreError::Unreadable {
                conversation: conversation.to_owned(),
                detail: format!("block {k}: {e}"),
            })
        })
        .buffered(16)
        .try_collect()
        .await?;
    Ok(blocks.into_iter().flatten().collect())
}

/// The stored view of a conversation, or `None` if there is none.
pub async fn load(store: &kv::Store, conversation: &str) -> Result<Option<Stored>, StoreError> {
    let Some((h, revision)) = header(store, conversation).await? else { return Ok(None) };
    let mut entries = blocks(store, conversation, h.blocks).await?;
    entries.extend(h.tail);
    let timeline =
        Timeline { conversation_id: h.conversation_id, run_status: h.run_status, entries, position: h.position };
    Ok(Some(Stored {
        view: Indexed::from_timeline(timeline),
        blocks: h.blocks,
        revision: Some(revision),
        resume_seq: h.resume_seq,
    }))
}

/// The stored timeline (what `GET …/timeline` serves).
pub async fn read(store: &kv::Store, conversation: &str) -> Result<Option<Timeline>, StoreError> {
    Ok(load(store, conversation).await?.map(|s| s.view.timeline))
}

/// The header of a stored view: enough for a stream reader to catch up.
#[derive(Debug, Clone)]
pub struct Head {
    pub position: u64,
    /// A `CONV_OUT` sequence at or before which no output after `position` is stored.
    pub resume_seq: u64,
    /// The latest entries (the streaming one among them).
    pub tail: Vec<Entry>,
}

/// The header of the stored view (without the sealed blocks).
pub async fn head(store: &kv::Store, conversation: &str) -> Result<Option<Head>, StoreError> {
    Ok(header(store, conversation).await?.map(|(h, _)| Head {
        position: h.position,
        resume_seq: h.resume_seq,
        tail: h.tail,
    }))
}

/// Writes what changed: newly sealed blocks and `dirty` blocks (places of
/// changed entries below the tail), then the header with the expected
/// revision. Updates `stored.blocks` and `stored.revision`.
pub async fn save(store: &kv::Store, stored: &mut Stored, dirty: &BTreeSet<usize>) -> Result<(), StoreError> {
    let timeline = &stored.view.timeline;
    let conversation = timeline.conversation_id.as_str();
    let mut sealed = stored.blocks;
    while timeline.entries.len() - sealed * BLOCK >= 2 * BLOCK {
        sealed += 1;
    }
    let mut write: BTreeSet<usize> = dirty.iter().map(|i| i / BLOCK).filter(|k| *k < stored.blocks).collect();
    write.extend(stored.blocks..sealed);
    for k in write {
        let bytes = serde_json::to_vec(&timeline.entries[k * BLOCK..(k + 1) * BLOCK]).map_err(kv_error)?;
        store.put(block_key(conversation, k), Bytes::from(bytes)).await.map_err(kv_error)?;
    }
    let header = Header {
        conversation_id: conversation.to_owned(),
        run_status: timeline.run_status,
        position: timeline.position,
        resume_seq: stored.resume_seq,
        blocks: sealed,
        tail: timeline.entries[sealed * BLOCK..].to_vec(),
    };
    let bytes = Bytes::from(serde_json::to_vec(&header).map_err(kv_error)?);
    let written = match stored.revision {
        Some(r) => store.update(conversation, bytes, r).await.map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict(conversation.to_owned()),
            _ => kv_error(e),
        }),
        None => store.create(conversation, bytes).await.map_err(|e| match e.kind() {
            kv::CreateErrorKind::AlreadyExists => StoreError::Conflict(conversation.to_owned()),
            _ => kv_error(e),
        }),
    }?;
    stored.revision = Some(written);
    stored.blocks = sealed;
    Ok(())
}

/// Replaces the stored view with `timeline` unless the stored one is at a
/// later position (then it is kept). Returns whether it was written.
pub async fn replace(store: &kv::Store, timeline: Timeline, resume_seq: u64) -> Result<bool, StoreError> {
    for _ in 0..5 {
        let current = match header(store, &timeline.conversation_id).await {
            Ok(h) => h,
            Err(StoreError::Unreadable { .. }) => {
                let e = store.entry(&timeline.conversation_id).await.map_err(kv_error)?;
                e.map(|e| (Header::empty(&timeline.conversation_id), e.revision))
            }
            Err(e) => return Err(e),
        };
        if let Some((h, _)) = &current
            && h.position > timeline.position
        {
            return Ok(false);
        }
        let mut stored = Stored {
            view: Indexed::from_timeline(timeline.clone()),
            blocks: 0,
            revision: current.map(|(_, r)| r),
            resume_seq,
        };
        // `blocks: 0`: every block is (re)written.
        match save(store, &mut stored, &BTreeSet::new()).await {
            Ok(()) => return Ok(true),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict(timeline.conversation_id))
}

impl Header {
    fn empty(conversation: &str) -> Self {
        Self {
            conversation_id: conversation.to_owned(),
            run_status: RunStatus::Idle,
            position: 0,
            resume_seq: 0,
            blocks: 0,
            tail: Vec::new(),
        }
    }
}

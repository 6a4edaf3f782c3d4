//! How a timeline is kept in the `conv_projections` bucket, so that a write
//! costs the same at entry 10 and at entry 10 000.
//!
//! * `<conversation>`: the header — run status, position, where a reader of
//!   the stream can start reading the output after it (`resume_seq`), how
//!   many sealed blocks there are, and the *tail*: every entry after them.
//!   Written with the expected revision, so two writers cannot both win.
//! * `<conversation>.b<k>`: sealed block `k`: up to 64 entries and, unless
//!   it holds one entry, at most 256 KiB (the header lists each block's
//!   entry count). Entries are sealed from the front of the tail once it
//!   holds 128 entries or more than 256 KiB, never past a streaming entry
//!   (stream readers take those from the header). A block is rewritten only
//!   when one of its entries changes (rare: a late tool result).
//!
//! A value larger than the server's payload limit (a header or block
//! holding a huge message) is split into parts (`<key>.<n>`) written first,
//! with the first value naming their revisions (`conv_core::snapshot`), so
//! a view of any size can be stored.
//!
//! A flush writes the header and, now and then, one block: O(1) per batch of
//! events whatever the length of the conversation.

use std::collections::BTreeSet;

use async_nats::jetstream::kv;
use bytes::Bytes;
use conv_contracts::payload::{EntryStatus, RunStatus};
use conv_core::snapshot as codec;
use conv_store::parts::{self, PartsError};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::timeline::{Entry, Indexed, Timeline};

/// Entries per sealed block (at most).
pub const BLOCK: usize = 64;
/// Bytes of a sealed block (at most, unless it holds one entry), and of
/// the tail before it is sealed.
pub const BLOCK_BYTES: usize = 256 * 1024;
/// Room left in a value for the message's headers.
const VALUE_HEADROOM: usize = 16 * 1024;

/// The largest value to write through this connection.
pub fn max_value(js: &async_nats::jetstream::Context) -> usize {
    conv_nats::connect::max_payload(&js.client()).saturating_sub(VALUE_HEADROOM).max(16 * 1024)
}

/// What an entry counts against a block's bytes.
fn entry_bytes(e: &Entry) -> usize {
    e.text.len() + e.id.len() + 96
}

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
    /// Entries in each sealed block (absent in views written before blocks
    /// were bounded by bytes: then every block holds 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    block_sizes: Vec<u32>,
    tail: Vec<Entry>,
}

impl Header {
    fn sizes(&self) -> Vec<u32> {
        if self.block_sizes.len() == self.blocks { self.block_sizes.clone() } else { vec![BLOCK as u32; self.blocks] }
    }
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

/// A view as stored: the timeline, its sealed blocks and revision.
#[derive(Debug, Clone)]
pub struct Stored {
    pub view: Indexed,
    /// Entries in each sealed block.
    pub blocks: Vec<u32>,
    pub revision: Option<u64>,
    pub resume_seq: u64,
}

impl Stored {
    pub fn new(conversation: &str) -> Self {
        Self { view: Indexed::new(conversation), blocks: Vec::new(), revision: None, resume_seq: 0 }
    }
}

/// A value and its revision, its parts (if split) put back together
/// (`conv_store::parts`). A part replaced while it was read (the bucket
/// keeps one revision) makes the read start again.
async fn get_value(store: &kv::Store, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
    for _ in 0..5 {
        let Some(entry) = store.entry(key).await.map_err(kv_error)? else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        if let Some(bytes) = parts::read(store, key, &entry.value).await.map_err(|e| parts_error(key, e))? {
            return Ok(Some((bytes, entry.revision)));
        }
    }
    Err(StoreError::Unreadable { conversation: key.to_owned(), detail: "its parts kept changing while read".into() })
}

/// Writes the parts of a value larger than `max_value` (`conv_store::parts`)
/// and returns the first value, for the caller to write at `key`.
async fn put_parts(store: &kv::Store, key: &str, bytes: Vec<u8>, max_value: usize) -> Result<Bytes, StoreError> {
    parts::write(store, key, &codec::encode_value(bytes, max_value)).await.map_err(|e| parts_error(key, e))
}

fn parts_error(key: &str, e: PartsError) -> StoreError {
    match e {
        PartsError::Store(detail) => StoreError::Kv(detail),
        PartsError::Codec(c) => StoreError::Unreadable { conversation: key.to_owned(), detail: c.to_string() },
    }
}

async fn header(store: &kv::Store, conversation: &str) -> Result<Option<(Header, u64)>, StoreError> {
    let Some((bytes, revision)) = get_value(store, conversation).await? else { return Ok(None) };
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Unreadable { conversation: conversation.to_owned(), detail: e.to_string() })?;
    Ok(Some((header, revision)))
}

async fn blocks(store: &kv::Store, conversation: &str, n: usize) -> Result<Vec<Entry>, StoreError> {
    let reads: Vec<_> = (0..n)
        .map(|k| async move {
            let key = block_key(conversation, k);
            let (bytes, _) = get_value(store, &key).await?.ok_or_else(|| StoreError::Unreadable {
                conversation: conversation.to_owned(),
                detail: format!("block {k} is missing"),
            })?;
            serde_json::from_slice::<Vec<Entry>>(&bytes).map_err(|e| StoreError::Unreadable {
                conversation: conversation.to_owned(),
                detail: format!("block {k}: {e}"),
            })
        })
        .collect();
    let blocks: Vec<Vec<Entry>> = futures::stream::iter(reads).buffered(16).try_collect().await?;
    Ok(blocks.into_iter().flatten().collect())
}

/// The stored view of a conversation, or `None` if there is none.
pub async fn load(store: &kv::Store, conversation: &str) -> Result<Option<Stored>, StoreError> {
    let Some((h, revision)) = header(store, conversation).await? else { return Ok(None) };
    let sizes = h.sizes();
    let mut entries = blocks(store, conversation, h.blocks).await?;
    if entries.len() != sizes.iter().map(|&n| n as usize).sum::<usize>() {
        return Err(StoreError::Unreadable {
            conversation: conversation.to_owned(),
            detail: "sealed blocks do not hold the entries the header names".into(),
        });
    }
    entries.extend(h.tail);
    let timeline =
        Timeline { conversation_id: h.conversation_id, run_status: h.run_status, entries, position: h.position };
    Ok(Some(Stored {
        view: Indexed::from_timeline(timeline),
        blocks: sizes,
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
pub async fn save(
    store: &kv::Store,
    stored: &mut Stored,
    dirty: &BTreeSet<usize>,
    max_value: usize,
) -> Result<(), StoreError> {
    let timeline = &stored.view.timeline;
    let conversation = timeline.conversation_id.as_str();
    let entries = &timeline.entries;
    // Where each existing block starts, then seal what the tail outgrew.
    let mut starts: Vec<usize> = Vec::with_capacity(stored.blocks.len() + 1);
    let mut at = 0;
    for &n in &stored.blocks {
        starts.push(at);
        at += n as usize;
    }
    let (old_blocks, old_end) = (stored.blocks.len(), at);
    let mut sizes = stored.blocks.clone();
    loop {
        let tail = &entries[at..];
        let tail_bytes: usize = tail.iter().map(entry_bytes).sum();
        if tail.len() < 2 * BLOCK && tail_bytes <= BLOCK_BYTES {
            break;
        }
        let (mut n, mut bytes) = (0, 0);
        for e in tail.iter().take(BLOCK) {
            if e.status == EntryStatus::Streaming || (n > 0 && bytes + entry_bytes(e) > BLOCK_BYTES) {
                break;
            }
            n += 1;
            bytes += entry_bytes(e);
        }
        if n == 0 {
            break; // a streaming entry first: it stays in the header
        }
        starts.push(at);
        sizes.push(n as u32);
        at += n;
    }
    let block_of = |place: usize| starts.partition_point(|&s| s <= place).checked_sub(1);
    let mut write: BTreeSet<usize> = dirty.iter().filter(|&&i| i < old_end).filter_map(|&i| block_of(i)).collect();
    write.extend(old_blocks..sizes.len());
    for k in write {
        let range = starts[k]..starts[k] + sizes[k] as usize;
        let bytes = serde_json::to_vec(&entries[range]).map_err(kv_error)?;
        let key = block_key(conversation, k);
        let first = put_parts(store, &key, bytes, max_value).await?;
        store.put(key, first).await.map_err(kv_error)?;
    }
    let header = Header {
        conversation_id: conversation.to_owned(),
        run_status: timeline.run_status,
        position: timeline.position,
        resume_seq: stored.resume_seq,
        blocks: sizes.len(),
        block_sizes: sizes.clone(),
        tail: entries[at..].to_vec(),
    };
    let bytes = put_parts(store, conversation, serde_json::to_vec(&header).map_err(kv_error)?, max_value).await?;
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
    stored.blocks = sizes;
    Ok(())
}

/// Replaces the stored view with `timeline` unless the stored one is at a
/// later position (then it is kept). Returns whether it was written.
pub async fn replace(
    store: &kv::Store,
    timeline: Timeline,
    resume_seq: u64,
    max_value: usize,
) -> Result<bool, StoreError> {
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
            blocks: Vec::new(),
            revision: current.map(|(_, r)| r),
            resume_seq,
        };
        // No blocks yet: every block is (re)written.
        match save(store, &mut stored, &BTreeSet::new(), max_value).await {
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
            block_sizes: Vec::new(),
            tail: Vec::new(),
        }
    }
}

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
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use conv_contracts::payload::{EntryStatus, RunStatus};
use conv_contracts::subject::{self, STREAM_OUT};
use conv_contracts::{ConversationId, Envelope, Limits};
use conv_core::snapshot as codec;
use conv_core::timeline::{Entry, Indexed, Timeline};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use conv_nats::topology::KV_PROJECTIONS;

use crate::parts::{self, PartsError};

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
/// ([`crate::parts`]). A part replaced while it was read (the bucket
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

/// Writes the parts of a value larger than `max_value` ([`crate::parts`])
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

// The journal side: rebuild a view from the output, verify a stored one.

/// Why the journal or the views could not be read (rebuild, verify, lists).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Journal(#[from] conv_nats::read::ReadError),
    #[error("the views bucket: {0}")]
    Bucket(#[from] async_nats::jetstream::context::KeyValueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A conversation's output stored at or after `CONV_OUT` sequence `start`
/// (0: all of it), decoded, oldest first, with each event's sequence.
/// Messages that do not decode are left out (the view workers dead-letter them).
pub async fn journal_from(
    js: &async_nats::jetstream::Context,
    conversation: &ConversationId,
    start: u64,
) -> Result<Vec<(u64, Envelope)>, ReadError> {
    let stored =
        conv_nats::read::from(js, STREAM_OUT, &subject::out_conversation_filter(conversation), start, false).await?;
    Ok(stored
        .into_iter()
        .filter_map(|m| {
            conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default())
                .ok()
                .map(|e| (m.seq, e))
        })
        .collect())
}

/// Rebuilds a conversation's timeline from scratch (the fold of all its
/// `CONV_OUT` events) and stores it, unless the stored view is already
/// further along. Returns the view and the number of events folded.
pub async fn rebuild(
    js: &async_nats::jetstream::Context,
    conversation: &ConversationId,
) -> Result<(Timeline, usize), ReadError> {
    let bucket = js.get_key_value(KV_PROJECTIONS).await?;
    let events = journal_from(js, conversation, 0).await?;
    let last_seq = events.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let view = conv_core::timeline::fold(conversation.as_str(), events.iter().map(|(_, e)| e), None);
    let folded = events.iter().filter(|(_, e)| e.position().is_some_and(|p| p <= view.position)).count();
    replace(&bucket, view.clone(), last_seq + 1, max_value(js)).await?;
    Ok((view, folded))
}

/// The outcome of comparing a stored view with the fold of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub conversation_id: String,
    /// Position of the stored view (0: none stored).
    pub view_position: u64,
    /// Last output position in `CONV_OUT`.
    pub journal_position: u64,
    /// What differs, one line each; empty when the view is the fold.
    pub differences: Vec<String>,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.differences.is_empty()
    }
}

fn compare(stored: &Timeline, folded: &Timeline, out: &mut Vec<String>) {
    if stored.run_status != folded.run_status {
        out.push(format!("run_status: view {:?}, journal {:?}", stored.run_status, folded.run_status));
    }
    if stored.entries.len() != folded.entries.len() {
        out.push(format!("entries: view has {}, journal {}", stored.entries.len(), folded.entries.len()));
    }
    for (i, (a, b)) in stored.entries.iter().zip(&folded.entries).enumerate() {
        if a != b {
            let what = if a.id != b.id {
                format!("id {:?} vs {:?}", a.id, b.id)
            } else if a.status != b.status {
                format!("status {:?} vs {:?}", a.status, b.status)
            } else if a.text != b.text {
                format!("text of {} bytes vs {} bytes", a.text.len(), b.text.len())
            } else {
                "role or tool fields".to_owned()
            };
            out.push(format!("entry {i} ({}): view and journal differ: {what}", b.id));
        }
    }
}

/// Compares the stored view of `conversation` with the fold of its output in
/// `CONV_OUT`, at the view's position. A view behind the journal is read
/// again until `settle` has passed; still behind, that is a difference.
pub async fn verify(
    js: &async_nats::jetstream::Context,
    conversation: &ConversationId,
    settle: Duration,
) -> Result<Verified, ReadError> {
    let bucket = js.get_key_value(KV_PROJECTIONS).await?;
    let deadline = Instant::now() + settle;
    loop {
        let events = journal_from(js, conversation, 0).await?;
        let journal_position = events.iter().filter_map(|(_, e)| e.position()).max().unwrap_or(0);
        let stored = read(&bucket, conversation.as_str()).await?;
        let view_position = stored.as_ref().map_or(0, |t| t.position);
        let mut differences = Vec::new();
        if view_position < journal_position && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match &stored {
            None if journal_position > 0 => differences.push("no stored view".to_owned()),
            None => {}
            Some(view) => {
                let folded = conv_core::timeline::fold(
                    conversation.as_str(),
                    events.iter().map(|(_, e)| e),
                    Some(view.position),
                );
                compare(view, &folded, &mut differences);
                if view_position < journal_position {
                    differences
                        .push(format!("the view is at position {view_position}, the journal at {journal_position}"));
                }
            }
        }
        return Ok(Verified {
            conversation_id: conversation.to_string(),
            view_position,
            journal_position,
            differences,
        });
    }
}

/// Every conversation with output in `CONV_OUT`.
pub async fn conversations(js: &async_nats::jetstream::Context) -> Result<Vec<ConversationId>, ReadError> {
    let mut ids: Vec<ConversationId> = conv_nats::read::all(js, STREAM_OUT, "", true)
        .await?
        .iter()
        .filter_map(|m| m.header("ce-subject").and_then(|s| ConversationId::parse(s).ok()))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

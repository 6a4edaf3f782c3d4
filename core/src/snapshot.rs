//! The snapshot codec: how a state is laid out in a key-value store so that
//! a snapshot has no size limit and writing one costs what changed, not the
//! size of the conversation.
//!
//! * The **head** (key `<conversation>`): the state without its entries, the
//!   applied-marker sequence it was taken after, and for every entry the
//!   store revision of its stored copy. Small (bounded by the in-flight work
//!   and the dedupe window), written with optimistic concurrency.
//! * **Entries** (key `<conversation>.<place>`): one value per entry,
//!   written when the entry is added or changed. An entry larger than one
//!   store value is split ([`encode_value`]): its parts go to
//!   `<conversation>.<place>.<n>` first, then the first value names the
//!   parts' revisions, so a reader always gets one consistent copy.
//!
//! A reader of a head asks for each entry by the revision the head names,
//! so entries written later (by this owner for an LLM step, or by a stale
//! owner) never leak into an older state.

use serde::{Deserialize, Serialize};

use crate::state::{Entry, SNAPSHOT_FORMAT, State};

/// A snapshot: the state after some applied marker, and that marker's
/// `CONV_APPLIED` sequence (where the journal tail starts on restore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub applied_seq: u64,
    pub state: State,
}

/// A stored head: the snapshot with its entries left out, and the store
/// revision of each entry's copy (in place order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub applied_seq: u64,
    pub state: State,
    pub entries: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("unreadable stored value: {0}")]
    Decode(String),
    #[error("snapshot format {found}, this build reads {SNAPSHOT_FORMAT}")]
    Format { found: u32 },
}

/// The head's key.
pub fn head_key(conversation: &str) -> String {
    conversation.to_owned()
}

/// The key of the entry at `place`.
pub fn entry_key(conversation: &str, place: usize) -> String {
    format!("{conversation}.{place}")
}

/// The key of part `part` (from 1) of a value split from the one at `key`.
pub fn part_key(key: &str, part: usize) -> String {
    format!("{key}.{part}")
}

/// Encodes the head. The entries are moved out for the encoding and put
/// back (O(1)), so the cost does not depend on the conversation's length.
pub fn encode_head(snapshot: &mut Snapshot, revisions: &[u64]) -> Result<Vec<u8>, CodecError> {
    let entries = std::mem::take(&mut snapshot.state.entries);
    #[derive(Serialize)]
    struct HeadRef<'a> {
        applied_seq: u64,
        state: &'a State,
        entries: &'a [u64],
    }
    let encoded =
        serde_json::to_vec(&HeadRef { applied_seq: snapshot.applied_seq, state: &snapshot.state, entries: revisions });
    snapshot.state.entries = entries;
    encoded.map_err(|e| CodecError::Encode(e.to_string()))
}

pub fn decode_head(bytes: &[u8]) -> Result<Head, CodecError> {
    let head: Head = serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))?;
    if head.state.format != SNAPSHOT_FORMAT {
        return Err(CodecError::Format { found: head.state.format });
    }
    Ok(head)
}

/// Marks the first value of a split value.
const PARTS_MAGIC: &[u8] = b"conv-parts ";

/// Bytes laid out in store values of at most `max_value` bytes: one value
/// when they fit, else parts written first (to `<key>.<n>`, n from 1) and a
/// first value naming the parts' revisions, written last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedValue {
    /// The bytes of parts 1.. (written first); empty when one value holds all.
    pub rest: Vec<Vec<u8>>,
    first: Vec<u8>,
}

impl EncodedValue {
    /// The first value, given the revisions the rest got.
    pub fn first(&self, rest_revisions: &[u64]) -> Result<Vec<u8>, CodecError> {
        if self.rest.is_empty() {
            return Ok(self.first.clone());
        }
        let mut out = PARTS_MAGIC.to_vec();
        serde_json::to_writer(&mut out, rest_revisions).map_err(|e| CodecError::Encode(e.to_string()))?;
        out.push(b'\n');
        out.extend_from_slice(&self.first);
        Ok(out)
    }
}

/// Room kept in a value for the parts header (a revision list).
const PARTS_HEADER_ROOM: usize = 4096;

/// Lays out `bytes` (JSON: never starting with [`PARTS_MAGIC`]).
pub fn encode_value(bytes: Vec<u8>, max_value: usize) -> EncodedValue {
    if bytes.len() <= max_value {
        return EncodedValue { rest: Vec::new(), first: bytes };
    }
    let chunk = max_value.saturating_sub(PARTS_HEADER_ROOM).max(1024);
    let mut chunks = bytes.chunks(chunk).map(<[u8]>::to_vec);
    let first = chunks.next().unwrap_or_default();
    EncodedValue { first, rest: chunks.collect() }
}

pub fn encode_entry(entry: &Entry, max_value: usize) -> Result<EncodedValue, CodecError> {
    let bytes = serde_json::to_vec(entry).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(encode_value(bytes, max_value))
}

/// A stored first value, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredValue {
    Whole(Vec<u8>),
    /// Split: the first bytes and the revisions of parts 1.. to read and
    /// append, in order.
    Split {
        first: Vec<u8>,
        rest: Vec<u64>,
    },
}

pub fn decode_value(value: &[u8]) -> Result<StoredValue, CodecError> {
    if let Some(body) = value.strip_prefix(PARTS_MAGIC) {
        let nl = body.iter().position(|&b| b == b'\n').ok_or_else(|| CodecError::Decode("parts header".into()))?;
        let rest: Vec<u64> = serde_json::from_slice(&body[..nl]).map_err(|e| CodecError::Decode(e.to_string()))?;
        return Ok(StoredValue::Split { first: body[nl + 1..].to_vec(), rest });
    }
    Ok(StoredValue::Whole(value.to_vec()))
}

/// Decodes an entry from all its bytes.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, CodecError> {
    serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
}

/// A head and its entries put back together.
pub fn assemble(head: Head, entries: Vec<Entry>) -> Result<Snapshot, CodecError> {
    if entries.len() != head.entries.len() {
        return Err(CodecError::Decode(format!("{} entries for a head naming {}", entries.len(), head.entries.len())));
    }
    let mut state = head.state;
    state.entries = entries;
    Ok(Snapshot { applied_seq: head.applied_seq, state })
}

#[cfg(test)]
mod tests {
    use conv_contracts::payload::{EntryRole, EntryStatus};

    use super::*;

    fn entry(text: &str) -> Entry {
        Entry {
            id: "u1".into(),
            role: EntryRole::User,
            text: text.into(),
            status: EntryStatus::Completed,
            tool_call_id: None,
            tool_calls: Vec::new(),
        }
    }

    #[test]
    fn a_small_entry_is_one_value() {
        let e = entry("hello");
        let enc = encode_entry(&e, 1 << 20).unwrap();
        assert!(enc.rest.is_empty());
        let StoredValue::Whole(bytes) = decode_value(&enc.first(&[]).unwrap()).unwrap() else { panic!("split") };
        assert_eq!(decode_entry(&bytes).unwrap(), e);
    }

    #[test]
    fn a_large_entry_is_split_and_put_back_together() {
        let e = entry(&"x".repeat(20_000));
        let enc = encode_entry(&e, 5_000).unwrap();
        assert!(enc.rest.len() >= 4, "{} parts", enc.rest.len());
        let revs: Vec<u64> = (10..10 + enc.rest.len() as u64).collect();
        let first = enc.first(&revs).unwrap();
        assert!(first.len() <= 5_000);
        let StoredValue::Split { first, rest } = decode_value(&first).unwrap() else { panic!("not split") };
        assert_eq!(rest, revs);
        let mut all = first;
        for part in &enc.rest {
            all.extend_from_slice(part);
        }
        assert_eq!(decode_entry(&all).unwrap(), e);
    }

    #[test]
    fn the_head_leaves_entries_out_and_keeps_them_in_memory() {
        let mut state = State::new("c");
        state.entries.push(entry("a"));
        let mut snap = Snapshot { applied_seq: 7, state };
        let bytes = encode_head(&mut snap, &[3]).unwrap();
        assert_eq!(snap.state.entries.len(), 1, "entries put back");
        let head = decode_head(&bytes).unwrap();
        assert!(head.state.entries.is_empty());
        assert_eq!(head.entries, vec![3]);
        let back = assemble(head, vec![entry("a")]).unwrap();
        assert_eq!(back, snap);
    }
}

//! Values larger than one store value, in any KV bucket: the layout is
//! `conv_core::snapshot::encode_value` (parts at `<key>.<n>` written first,
//! then a first value at `<key>` naming their revisions). The snapshot
//! entries (`conv_entries`) and the timeline views (`conv_projections`)
//! both store through this.

use async_nats::jetstream::kv;
use bytes::Bytes;
use conv_core::snapshot::{self as codec, EncodedValue, StoredValue};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}

/// Writes the parts of `encoded` (none when it fits in one value) and
/// returns the first value, for the caller to write at `key` as it must
/// (plainly, or with an expected revision).
pub async fn write(store: &kv::Store, key: &str, encoded: &EncodedValue) -> Result<Bytes, PartsError> {
    let mut revisions = Vec::with_capacity(encoded.rest.len());
    for (n, part) in encoded.rest.iter().enumerate() {
        let revision = store
            .put(codec::part_key(key, n + 1), Bytes::from(part.clone()))
            .await
            .map_err(|e| PartsError::Store(e.to_string()))?;
        revisions.push(revision);
    }
    Ok(Bytes::from(encoded.first(&revisions)?))
}

/// The whole bytes of the value whose first value (stored at `key`) is
/// `first`: its parts read at the revisions it names. `None` when a part is
/// no longer stored (replaced since), so the caller reads again or gives up.
pub async fn read(store: &kv::Store, key: &str, first: &[u8]) -> Result<Option<Vec<u8>>, PartsError> {
    match codec::decode_value(first)? {
        StoredValue::Whole(bytes) => Ok(Some(bytes)),
        StoredValue::Split { mut first, rest } => {
            for (n, revision) in rest.iter().enumerate() {
                match store.entry_for_revision(codec::part_key(key, n + 1), *revision).await {
                    Ok(Some(part)) if part.operation == kv::Operation::Put => first.extend_from_slice(&part.value),
                    Err(e) if e.kind() == kv::EntryErrorKind::TimedOut => return Err(PartsError::Store(e.to_string())),
                    _ => return Ok(None),
                }
            }
            Ok(Some(first))
        }
    }
}

//! The live lane: token deltas at token rate, on core NATS.
//!
//! Effects publish every piece of text the model streams to
//! [`crate::subject::live_subject`] as a [`LiveDelta`] (JSON), at once and
//! without journaling it; projections turn it into `conv.out.message.delta`
//! events for stream readers. Nothing on this lane is durable or replayed:
//! the durable lane (coalesced `conv.in.llm.delta` chunks through the
//! runtime, ADR 0007) is what the timeline, replay and crash-resume read, and
//! a reader that misses live deltas gets the same bytes from it.

use serde::{Deserialize, Serialize};

/// One piece of an entry's text, placed by its byte offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDelta {
    /// The timeline entry the text belongs to.
    pub entry_id: String,
    pub step_id: String,
    pub attempt: u32,
    /// Byte offset of `text` within the entry's text.
    pub offset: u64,
    pub text: String,
}

impl LiveDelta {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A plain struct of strings and integers: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

//! The live lane: token deltas at token rate, on core NATS.
//!
//! Effects publish every piece of text the model streams to
//! [`crate::subject::live_subject`] as a [`LiveDelta`] (JSON), at once and
//! without journaling it; projections turn it into `conv.out.message.delta`
//! events for stream readers. Nothing on this lane is durable or replayed:
//! the durable lane (coalesced `conv.in.llm.delta` chunks through the
//! runtime, ADR 0007) is what the timeline, replay and crash-resume read, and
//! a reader that misses live deltas gets the same bytes from it.
//!
//! The lane also carries **cancel hints** ([`LiveCancel`], on
//! [`crate::subject::live_cancel_subject`]): the runtime sends one the moment
//! it takes an abort or stop off the journal, naming what the reducer will
//! cancel, so effects stop at once instead of after the abort's group
//! commit. The journaled `conv.effect.cancel.requested` stays the source of
//! truth (a lost hint only costs speed); a hint never names anything the
//! journaled cancel would not.

use serde::{Deserialize, Serialize};

use crate::payload::CancelMode;

/// A cancel ahead of its journaled directive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCancel {
    /// The abort or stop input this anticipates.
    pub input_id: String,
    pub mode: CancelMode,
    /// Effect ids, as in `CancelRequested::effect_ids`.
    pub effect_ids: Vec<String>,
    /// When the input was accepted (its `time`), for the abort latency metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<chrono::DateTime<chrono::Utc>>,
}

impl LiveCancel {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, an enum and a timestamp: serialization cannot fail.
        crate::json::bytes(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

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
    /// When effects had the text from the provider, for the delta lag
    /// metric (`conv_stream_delta_lag_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<chrono::DateTime<chrono::Utc>>,
}

impl LiveDelta {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, integers and a timestamp: serialization cannot fail.
        crate::json::bytes(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

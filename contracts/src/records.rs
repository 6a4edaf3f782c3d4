//! Records that services keep in JetStream KV for one another (not events):
//! every instance of a service reads what another instance wrote, across
//! versions, so their shape is a contract like an event's.

use serde::{Deserialize, Serialize};

/// A timer in the `conv_timers` bucket, under [`timer_key`]: effects stores
/// it when a `timer` tool call runs, and whichever effects instance watches
/// the bucket when it is due journals `timer.fired`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub conversation_id: String,
    pub timer_id: String,
    /// Unix milliseconds.
    pub fire_at_ms: i64,
    /// The directive that scheduled it (the fired event's cause).
    pub directive_id: String,
    /// The directive's causal chain (the fired event stays in its trace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// The key of a timer: `<conversation>.<timer id>`.
pub fn timer_key(conversation: &str, timer_id: &str) -> String {
    format!("{conversation}.{timer_id}")
}

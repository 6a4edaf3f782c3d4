//! Per-conversation state: what the reducer folds the journal into.
//!
//! Serialized (JSON) only as the runtime's own snapshot format in the
//! `conv_snapshots` bucket — never on the wire between services. The hash of
//! that serialization is the state hash in every applied marker, so field
//! order and map types (`BTreeMap`, `Vec`) are chosen to be deterministic.

use std::collections::{BTreeMap, VecDeque};

use conv_contracts::payload::{BusyPolicy, EntryRole, EntryStatus, RunStatus, ToolCall};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Version of the snapshot format; a snapshot of another version is ignored
/// and the state rebuilt from the journal.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// How many recently applied input ids are remembered for dedupe.
pub const RECENT_IDS: usize = 4096;

/// One line of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub role: EntryRole,
    pub text: String,
    pub status: EntryStatus,
    /// For `tool` entries: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `assistant` entries: the tools the model asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// The current (or last) run: one answer to the user, possibly several LLM steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: String,
    /// Number of the current LLM step (from 1).
    pub step_no: u32,
}

/// An LLM step in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmStep {
    pub run_id: String,
    pub attempt: u32,
    /// The assistant entry this attempt streams into.
    pub entry_id: String,
    /// Next expected delta position.
    pub next_seq: u64,
}

/// A tool call in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInFlight {
    pub run_id: String,
    pub step_id: String,
    pub name: String,
    pub args: Value,
}

/// What `retry` re-runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPoint {
    pub run_id: String,
    pub step_no: u32,
    pub attempt: u32,
}

/// Where the outputs of this conversation stand (for projections).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pointers {
    /// Number of `conv.out.*` events emitted so far.
    pub outputs: u64,
    /// Number of directives emitted so far.
    pub directives: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub conversation_id: String,
    /// Number of inputs applied.
    pub version: u64,
    pub run_status: RunStatus,
    pub run: Option<Run>,
    /// Runs started so far (run ids are `r<n>`).
    pub runs: u64,
    pub entries: Vec<Entry>,
    /// LLM steps in flight, by step id.
    pub llm: BTreeMap<String, LlmStep>,
    /// Tool calls in flight, by tool call id.
    pub tools: BTreeMap<String, ToolInFlight>,
    /// Timers scheduled and not yet fired or canceled, by timer id (delay in ms).
    pub timers: BTreeMap<String, u64>,
    pub policy: BusyPolicy,
    /// User entries waiting for the current run to end.
    pub queued: Vec<String>,
    pub retry: Option<RetryPoint>,
    pub pointers: Pointers,
    /// Ids of the most recent applied inputs, oldest first (dedupe).
    pub recent_ids: VecDeque<String>,
}

impl State {
    pub fn new(conversation_id: &str) -> Self {
        Self {
            format: SNAPSHOT_FORMAT,
            conversation_id: conversation_id.to_owned(),
            version: 0,
            run_status: RunStatus::Idle,
            run: None,
            runs: 0,
            entries: Vec::new(),
            llm: BTreeMap::new(),
            tools: BTreeMap::new(),
            timers: BTreeMap::new(),
            policy: BusyPolicy::default(),
            queued: Vec::new(),
            retry: None,
            pointers: Pointers::default(),
            recent_ids: VecDeque::new(),
        }
    }

    /// True when an input with this id was applied recently.
    pub fn has_applied(&self, event_id: &str) -> bool {
        self.recent_ids.iter().any(|id| id == event_id)
    }

    pub(crate) fn remember(&mut self, event_id: &str) {
        self.recent_ids.push_back(event_id.to_owned());
        while self.recent_ids.len() > RECENT_IDS {
            self.recent_ids.pop_front();
        }
    }

    /// The snapshot bytes (also what the hash covers).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice::<State>(bytes).ok().filter(|s| s.format == SNAPSHOT_FORMAT)
    }

    /// Hex SHA-256 of the snapshot bytes.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.to_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn entry_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.id == id)
    }
}

//! Per-conversation state: what the reducer folds the journal into.
//!
//! Serialized (JSON) only as the runtime's own snapshot format in the
//! `conv_snapshots` bucket — never on the wire between services. Field order
//! and map types (`BTreeMap`, `Vec`) are chosen to be deterministic.
//!
//! Two hashes, so that applying an input costs the same at turn 1 and at
//! turn 1 000:
//! * [`State::hash`], the **chain**: each applied input extends it with
//!   SHA-256(previous chain, the input's id and type, every event it
//!   emitted). O(size of the input and its output), never of the state. It is
//!   the `state_hash` of every applied marker; replay recomputes it.
//! * [`State::digest`]: SHA-256 of the whole snapshot bytes, for comparing a
//!   live state with a replayed one (`convctl replay`), not per input.

use std::collections::{BTreeMap, HashSet, VecDeque};

use conv_contracts::payload::{BusyPolicy, EntryRole, EntryStatus, RunStatus, ToolCall};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Version of the snapshot format; a snapshot of another version is ignored
/// and the state rebuilt from the journal.
pub const SNAPSHOT_FORMAT: u32 = 2;

/// The reducer rules a new conversation starts under. A conversation keeps
/// the rules it started with for life (they are in its snapshot and its
/// markers), so replaying its journal gives exactly the output it gave:
/// * 1: a user entry is `u<inputs applied>` (`u1`, `u17`, …);
/// * 2: a user entry is `u<user entries so far>` (`u1`, `u2`, …).
pub const RULES: u32 = 2;

fn first_rules() -> u32 {
    1
}

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
    /// The reducer rules this conversation runs under ([`RULES`]; 1 in
    /// snapshots of versions before rules existed).
    #[serde(default = "first_rules")]
    pub rules: u32,
    /// User entries so far (rules 2 number them).
    #[serde(default)]
    pub user_entries: u64,
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
    /// Ids of the most recent applied inputs (dedupe).
    pub recent_ids: RecentIds,
    /// The hash chain over every applied input and its output (hex).
    pub chain: String,
    /// Entry id → place, a cache (not serialized, not compared).
    #[serde(skip)]
    index: EntryIndex,
    /// Places of the entries added or changed since [`State::take_touched`]
    /// was last called: what a snapshot or a context flush must write
    /// (not serialized, not compared).
    #[serde(skip)]
    touched: Touched,
}

/// Places of entries changed since they were last written out.
#[derive(Debug, Clone, Default)]
struct Touched(std::collections::BTreeSet<usize>);

impl PartialEq for Touched {
    fn eq(&self, _: &Self) -> bool {
        true // bookkeeping of the writer: never part of what a state is
    }
}

/// Entry id → place in `entries`, built lazily as entries are added (they
/// are never removed), so finding an entry is O(1).
#[derive(Debug, Clone, Default)]
struct EntryIndex {
    places: std::collections::HashMap<String, usize>,
    /// Entries indexed so far.
    upto: usize,
}

impl PartialEq for EntryIndex {
    fn eq(&self, _: &Self) -> bool {
        true // a cache: never part of what a state is
    }
}

/// The most recent applied input ids: in order (for the window) and as a set
/// (for an O(1) lookup). Serialized as the ordered list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl RecentIds {
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn push(&mut self, id: &str, keep: usize) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
        }
        while self.order.len() > keep {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

impl Serialize for RecentIds {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.order.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RecentIds {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let order = VecDeque::<String>::deserialize(deserializer)?;
        let set = order.iter().cloned().collect();
        Ok(Self { order, set })
    }
}

impl State {
    /// The applied marker of `input` (stored at `seq` in `CONV_IN`) once
    /// this state has applied it: its version, hash and rules.
    pub fn marker(&self, input: &conv_contracts::Envelope, seq: u64) -> conv_contracts::payload::Applied {
        conv_contracts::payload::Applied {
            input_id: input.id().to_owned(),
            input_type: input.event_type().as_str().to_owned(),
            input_seq: seq,
            applied_index: self.version,
            state_version: self.version,
            state_hash: self.hash(),
            rules: Some(self.rules),
        }
    }

    /// A new conversation, under the current [`RULES`].
    pub fn new(conversation_id: &str) -> Self {
        Self::with_rules(conversation_id, RULES)
    }

    /// A conversation that started under `rules` (replaying an older one).
    pub fn with_rules(conversation_id: &str, rules: u32) -> Self {
        Self {
            format: SNAPSHOT_FORMAT,
            conversation_id: conversation_id.to_owned(),
            version: 0,
            rules,
            user_entries: 0,
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
            recent_ids: RecentIds::default(),
            chain: String::new(),
            index: EntryIndex::default(),
            touched: Touched::default(),
        }
    }

    /// Appends an entry (the reducer adds entries only through this).
    pub(crate) fn push_entry(&mut self, entry: Entry) {
        self.touched.0.insert(self.entries.len());
        self.entries.push(entry);
    }

    /// The places of the entries added or changed since the last call, in
    /// order; the set is emptied. A writer that stores entries one by one
    /// (`conv-store`) writes exactly these.
    pub fn take_touched(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.touched.0).into_iter().filter(|&i| i < self.entries.len()).collect()
    }

    /// Marks the entry at `place` as changed again (its write failed).
    pub fn retouch(&mut self, place: usize) {
        self.touched.0.insert(place);
    }

    /// True when an input with this id was applied recently.
    pub fn has_applied(&self, event_id: &str) -> bool {
        self.recent_ids.contains(event_id)
    }

    pub(crate) fn remember(&mut self, event_id: &str) {
        self.recent_ids.push(event_id, RECENT_IDS);
    }

    /// The snapshot bytes (also what the hash covers).
    pub fn to_bytes(&self) -> Vec<u8> {
        conv_contracts::json::bytes(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice::<State>(bytes).ok().filter(|s| s.format == SNAPSHOT_FORMAT)
    }

    /// The state hash of applied markers: the chain (see the module docs).
    pub fn hash(&self) -> String {
        self.chain.clone()
    }

    /// Hex SHA-256 of the whole snapshot bytes (O(state); for replay checks).
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.to_bytes()))
    }

    /// Extends the chain with an applied input and what it emitted.
    pub(crate) fn extend_chain(&mut self, input_id: &str, input_type: &str, emitted: &[conv_contracts::Envelope]) {
        let mut h = Sha256::new();
        h.update(self.chain.as_bytes());
        h.update(b"\n");
        h.update(input_id.as_bytes());
        h.update(b"\n");
        h.update(input_type.as_bytes());
        for e in emitted {
            h.update(b"\n");
            h.update(e.id().as_bytes());
            h.update(b" ");
            h.update(e.event_type().as_str().as_bytes());
            h.update(b" ");
            h.update(e.data().to_json().to_string().as_bytes());
        }
        self.chain = hex(&h.finalize());
    }

    pub fn entry_mut(&mut self, id: &str) -> Option<&mut Entry> {
        let index = &mut self.index;
        if index.upto > self.entries.len() {
            *index = EntryIndex::default();
        }
        for (i, e) in self.entries.iter().enumerate().skip(index.upto) {
            // The first entry with an id wins, as a scan from the start would.
            index.places.entry(e.id.clone()).or_insert(i);
        }
        index.upto = self.entries.len();
        let at = *index.places.get(id)?;
        let entry = self.entries.get_mut(at).filter(|e| e.id == id)?;
        self.touched.0.insert(at);
        Some(entry)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

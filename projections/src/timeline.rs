//! The timeline projection: a pure fold of a conversation's `conv.out.*`
//! events (in `CONV_OUT` order) into what a user sees.

use conv_contracts::Payload;
use conv_contracts::payload::{EntryRole, EntryStatus, RunStatus, ToolOutcome};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub role: EntryRole,
    pub text: String,
    pub status: EntryStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub conversation_id: String,
    pub run_status: RunStatus,
    pub entries: Vec<Entry>,
    /// `CONV_OUT` sequence of the last event folded in (events at or below
    /// it are repeats and ignored).
    pub last_seq: u64,
}

impl Timeline {
    pub fn new(conversation_id: &str) -> Self {
        Self {
            conversation_id: conversation_id.to_owned(),
            run_status: RunStatus::Idle,
            entries: Vec::new(),
            last_seq: 0,
        }
    }

    fn entry(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    /// Folds one output event stored at `seq`. Returns false for a repeat.
    pub fn apply(&mut self, seq: u64, data: &Payload) -> bool {
        if seq <= self.last_seq {
            return false;
        }
        self.last_seq = seq;
        match data {
            Payload::OutMessageAppended(m) => match self.entry(&m.entry_id) {
                Some(e) => {
                    e.text = m.text.clone();
                    e.status = m.status;
                }
                None => self.entries.push(Entry {
                    id: m.entry_id.clone(),
                    role: m.role,
                    text: m.text.clone(),
                    status: m.status,
                    tool_call_id: None,
                    tool_name: None,
                }),
            },
            Payload::OutMessageDelta(d) => {
                if let Some(e) = self.entry(&d.entry_id)
                    && e.status == EntryStatus::Streaming
                {
                    e.text.push_str(&d.text);
                }
            }
            Payload::OutMessageFinished(f) => {
                if let Some(e) = self.entry(&f.entry_id) {
                    e.status = f.status;
                    e.text = f.text.clone();
                }
            }
            Payload::OutRunStatus(r) => self.run_status = r.status,
            Payload::OutToolCalled(c) => self.entries.push(Entry {
                id: format!("call.{}", c.tool_call_id),
                role: EntryRole::Tool,
                text: format!("{}({})", c.name, c.args),
                status: EntryStatus::Streaming,
                tool_call_id: Some(c.tool_call_id.clone()),
                tool_name: Some(c.name.clone()),
            }),
            Payload::OutToolResult(r) => {
                let status = match r.outcome {
                    ToolOutcome::Completed => EntryStatus::Completed,
                    ToolOutcome::Failed => EntryStatus::Failed,
                    ToolOutcome::Canceled => EntryStatus::Aborted,
                };
                let id = format!("call.{}", r.tool_call_id);
                match self.entry(&id) {
                    Some(e) => {
                        e.status = status;
                        e.text = r.result.to_string();
                    }
                    None => self.entries.push(Entry {
                        id,
                        role: EntryRole::Tool,
                        text: r.result.to_string(),
                        status,
                        tool_call_id: Some(r.tool_call_id.clone()),
                        tool_name: None,
                    }),
                }
            }
            _ => {}
        }
        true
    }
}

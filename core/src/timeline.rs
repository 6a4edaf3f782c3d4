//! The timeline projection: a pure fold of a conversation's `conv.out.*`
//! events, in the order of their output position, into what a user sees.
//!
//! [`Indexed::apply`] folds one event; it is O(1) in the size of the
//! timeline (entries are found through an index, text is appended). The
//! order is the caller's business: [`fold`] sorts stored events by position
//! (what `convctl projections verify` and rebuilds use), the views' partition
//! workers hold back early arrivals until the gap before them is filled.

use std::collections::{BTreeMap, HashMap};

use conv_contracts::payload::{EntryRole, EntryStatus, RunStatus, ToolOutcome};
use conv_contracts::{Envelope, Payload};

pub use conv_contracts::api::{Entry, Timeline};

/// A timeline with an index from entry id to place, for O(1) updates.
#[derive(Debug, Clone)]
pub struct Indexed {
    pub timeline: Timeline,
    index: HashMap<String, usize>,
}

/// What one fold step changed (so a store can write only that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    /// Nothing but the position.
    Nothing,
    /// The run status.
    Header,
    /// The entry at this place (added or changed).
    Entry(usize),
}

impl Indexed {
    pub fn new(conversation_id: &str) -> Self {
        Self::from_timeline(Timeline {
            conversation_id: conversation_id.to_owned(),
            run_status: RunStatus::Idle,
            entries: Vec::new(),
            position: 0,
        })
    }

    pub fn from_timeline(timeline: Timeline) -> Self {
        let index = timeline.entries.iter().enumerate().map(|(i, e)| (e.id.clone(), i)).collect();
        Self { timeline, index }
    }

    fn find(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The entry with this id.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.find(id).map(|i| &self.timeline.entries[i])
    }

    fn push(&mut self, entry: Entry) -> Touched {
        let at = self.timeline.entries.len();
        self.index.insert(entry.id.clone(), at);
        self.timeline.entries.push(entry);
        Touched::Entry(at)
    }

    /// Folds the event at output position `position` (the caller folds
    /// positions in order, each once).
    pub fn apply(&mut self, position: u64, data: &Payload) -> Touched {
        self.timeline.position = self.timeline.position.max(position);
        match data {
            Payload::OutMessageAppended(m) => match self.index.get(&m.entry_id).copied() {
                Some(i) => {
                    self.timeline.entries[i].text.clone_from(&m.text);
                    self.timeline.entries[i].status = m.status;
                    Touched::Entry(i)
                }
                None => self.push(Entry {
                    id: m.entry_id.clone(),
                    role: m.role,
                    text: m.text.clone(),
                    status: m.status,
                    tool_call_id: None,
                    tool_name: None,
                }),
            },
            Payload::OutMessageDelta(d) => match self.find(&d.entry_id) {
                Some(i) if self.timeline.entries[i].status == EntryStatus::Streaming => {
                    self.timeline.entries[i].text.push_str(&d.text);
                    Touched::Entry(i)
                }
                _ => Touched::Nothing,
            },
            Payload::OutMessageFinished(f) => match self.find(&f.entry_id) {
                Some(i) => {
                    self.timeline.entries[i].status = f.status;
                    self.timeline.entries[i].text.clone_from(&f.text);
                    Touched::Entry(i)
                }
                None => Touched::Nothing,
            },
            Payload::OutRunStatus(r) => {
                self.timeline.run_status = r.status;
                Touched::Header
            }
            Payload::OutToolCalled(c) => {
                let call = Entry {
                    id: format!("call.{}", c.tool_call_id),
                    role: EntryRole::Tool,
                    text: format!("{}({})", c.name, c.args),
                    status: EntryStatus::Streaming,
                    tool_call_id: Some(c.tool_call_id.clone()),
                    tool_name: Some(c.name.clone()),
                };
                // A step that only called tools finished an empty assistant
                // entry just before: its first call takes that place, so
                // the view shows no empty answer.
                match self.timeline.entries.last() {
                    Some(last) if is_empty_answer(last) => {
                        let at = self.timeline.entries.len() - 1;
                        let empty = std::mem::replace(&mut self.timeline.entries[at], call);
                        self.index.remove(&empty.id);
                        self.index.insert(self.timeline.entries[at].id.clone(), at);
                        Touched::Entry(at)
                    }
                    _ => self.push(call),
                }
            }
            Payload::OutToolResult(r) => {
                let status = match r.outcome {
                    ToolOutcome::Completed => EntryStatus::Completed,
                    ToolOutcome::Failed => EntryStatus::Failed,
                    ToolOutcome::Canceled => EntryStatus::Aborted,
                };
                let id = format!("call.{}", r.tool_call_id);
                match self.find(&id) {
                    Some(i) => {
                        self.timeline.entries[i].status = status;
                        self.timeline.entries[i].text = r.result.to_string();
                        Touched::Entry(i)
                    }
                    None => self.push(Entry {
                        id,
                        role: EntryRole::Tool,
                        text: r.result.to_string(),
                        status,
                        tool_call_id: Some(r.tool_call_id.clone()),
                        tool_name: None,
                    }),
                }
            }
            _ => Touched::Nothing,
        }
    }
}

/// An assistant entry that finished without text (the model only called tools).
fn is_empty_answer(e: &Entry) -> bool {
    e.role == EntryRole::Assistant && e.status == EntryStatus::Completed && e.text.is_empty()
}

/// The fold of a conversation's stored output: events ordered by position
/// (the first stored copy of a position wins; events without a position are
/// not output of the runtime and are left out), folded up to `upto`.
pub fn fold<'a>(conversation_id: &str, events: impl IntoIterator<Item = &'a Envelope>, upto: Option<u64>) -> Timeline {
    let mut by_position: BTreeMap<u64, &Envelope> = BTreeMap::new();
    for e in events {
        if let Some(p) = e.position() {
            by_position.entry(p).or_insert(e);
        }
    }
    let mut view = Indexed::new(conversation_id);
    for (p, e) in by_position {
        if upto.is_some_and(|u| p > u) {
            break;
        }
        view.apply(p, e.data());
    }
    view.timeline
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::ConversationId;
    use conv_contracts::payload::*;
    use serde_json::json;

    fn out(position: u64, data: impl Into<Payload>) -> Envelope {
        let conv = ConversationId::parse("c").expect("id");
        Envelope::new(format!("e{position}"), "/t", conv, data).expect("valid event").with_position(position)
    }

    fn reply() -> Vec<Envelope> {
        vec![
            out(
                1,
                OutMessageAppended {
                    entry_id: "u1".into(),
                    role: EntryRole::User,
                    text: "hi".into(),
                    status: EntryStatus::Completed,
                },
            ),
            out(2, OutRunStatus { run_id: "r1".into(), status: RunStatus::Running }),
            out(
                3,
                OutMessageAppended {
                    entry_id: "a1".into(),
                    role: EntryRole::Assistant,
                    text: String::new(),
                    status: EntryStatus::Streaming,
                },
            ),
            out(4, OutMessageDelta { entry_id: "a1".into(), seq: 0, text: "Hel".into(), offset: Some(0) }),
            out(5, OutMessageDelta { entry_id: "a1".into(), seq: 1, text: "lo".into(), offset: Some(3) }),
            out(6, OutMessageFinished { entry_id: "a1".into(), status: EntryStatus::Completed, text: "Hello".into() }),
            out(7, OutRunStatus { run_id: "r1".into(), status: RunStatus::Idle }),
        ]
    }

    #[test]
    fn folds_a_reply() {
        let t = fold("c", &reply(), None);
        assert_eq!(t.position, 7);
        assert_eq!(t.run_status, RunStatus::Idle);
        assert_eq!(t.entries.len(), 2);
        assert_eq!((t.entries[1].text.as_str(), t.entries[1].status), ("Hello", EntryStatus::Completed));
    }

    #[test]
    fn order_and_repeats_do_not_matter() {
        let mut shuffled = reply();
        shuffled.reverse();
        shuffled.extend(reply());
        assert_eq!(fold("c", &shuffled, None), fold("c", &reply(), None));
    }

    #[test]
    fn folds_up_to_a_position() {
        let t = fold("c", &reply(), Some(4));
        assert_eq!(t.position, 4);
        assert_eq!((t.entries[1].text.as_str(), t.entries[1].status), ("Hel", EntryStatus::Streaming));
    }

    #[test]
    fn a_step_that_only_calls_tools_leaves_no_empty_answer() {
        let appended = |id: &str| OutMessageAppended {
            entry_id: id.into(),
            role: EntryRole::Assistant,
            text: String::new(),
            status: EntryStatus::Streaming,
        };
        let finished = |id: &str, text: &str| OutMessageFinished {
            entry_id: id.into(),
            status: EntryStatus::Completed,
            text: text.into(),
        };
        let called = |id: &str| OutToolCalled { tool_call_id: id.into(), name: "echo".into(), args: json!({}) };
        let result =
            |id: &str| OutToolResult { tool_call_id: id.into(), outcome: ToolOutcome::Completed, result: json!(1) };
        let mut events = reply()[..2].to_vec();
        events.extend([
            out(3, appended("a1")),
            out(4, finished("a1", "")),
            out(5, called("t1")),
            out(6, called("t2")),
            out(7, result("t1")),
            out(8, result("t2")),
            out(9, appended("a2")),
            out(10, finished("a2", "done")),
        ]);
        let t = fold("c", &events, None);
        let ids: Vec<&str> = t.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["u1", "call.t1", "call.t2", "a2"], "the empty answer's place went to the first call");
        assert_eq!(t.entries[1].status, EntryStatus::Completed, "results find their calls: {t:?}");
        // The index follows: a late event of the replaced entry changes nothing.
        let mut v = Indexed::from_timeline(t.clone());
        assert_eq!(v.apply(11, &finished("a1", "late").into()), Touched::Nothing);
        assert_eq!(v.timeline, Timeline { position: 11, ..t });
        // An answer with text keeps its entry before its calls.
        let mut spoken = reply()[..2].to_vec();
        spoken.extend([out(3, appended("a1")), out(4, finished("a1", "let me look")), out(5, called("t1"))]);
        let ids: Vec<String> = fold("c", &spoken, None).entries.into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["u1", "a1", "call.t1"]);
    }

    #[test]
    fn a_delta_after_the_end_of_its_entry_changes_nothing() {
        let mut v = Indexed::new("c");
        for e in reply() {
            v.apply(e.position().expect("position"), e.data());
        }
        let late = OutMessageDelta { entry_id: "a1".into(), seq: 9, text: "!".into(), offset: Some(5) };
        assert_eq!(v.apply(8, &late.into()), Touched::Nothing);
        assert_eq!(v.timeline.entries[1].text, "Hello");
    }
}

//! A conversation's events (`convctl trace`, `convctl events`, the console's
//! trace page) across `CONV_IN`, `CONV_EFFECT`,
//! `CONV_APPLIED`, `CONV_OUT` and `CONV_AUDIT`, with its dead letters.
//!
//! Every read is indexed: the journals by the conversation's subject filter
//! (headers only), so the cost is the conversation's own size, never a scan
//! of a whole stream. Dead letters are matched to the events they came from
//! (`CONV_DLQ` is read whole, but it holds only what failed). An event id
//! names its conversation when it starts with `<conversation>.` (ids from
//! ingress and everything derived from them); for other ids (a UUID given
//! out without an `Idempotency-Key`) pass `--conversation`.
//!
//! `trace` prints the cause tree: causes follow `causationid` upward,
//! effects are the events whose `causationid` is this one, recursively; for
//! a conversation, every root (an event without a cause in the journal)
//! with its tree. `events` prints the same events as a flat list in time
//! order, each with its id.

use std::collections::{BTreeMap, HashMap, HashSet};

use conv_contracts::subject::{STREAM_APPLIED, STREAM_AUDIT, STREAM_DLQ, STREAM_EFFECT, STREAM_IN, STREAM_OUT};
use conv_contracts::{ConversationId, Kind};
use conv_nats::read::{self, Stored};
use serde::Serialize;

/// Why a trace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The argument names neither a conversation nor an event of one.
    #[error("{0}")]
    Target(String),
    /// No such conversation or event in the journal.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Read(#[from] conv_nats::read::ReadError),
    #[error(transparent)]
    DeadLetters(#[from] conv_nats::dlq::Error),
}

const STREAMS: [(&str, Kind); 5] = [
    (STREAM_IN, Kind::In),
    (STREAM_EFFECT, Kind::Effect),
    (STREAM_APPLIED, Kind::Applied),
    (STREAM_OUT, Kind::Out),
    (STREAM_AUDIT, Kind::Audit),
];
/// Most events shown in a tree (a long reply has many delta chunks).
pub const MAX_NODES: usize = 5000;

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub stream: String,
    pub seq: u64,
    pub time: Option<String>,
    pub causation_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<Node>,
}

fn node(m: &Stored) -> Option<Node> {
    Some(Node {
        id: m.header("ce-id")?.to_owned(),
        ty: m.header("ce-type").unwrap_or("?").to_owned(),
        stream: m.stream.clone(),
        seq: m.seq,
        time: m.header("ce-time").map(str::to_owned),
        causation_id: m.header("ce-causationid").map(str::to_owned),
        effects: Vec::new(),
    })
}

/// What `trace` was asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Conversation(ConversationId),
    Event { id: String, conversation: ConversationId },
}

/// Reads `arg` (with `--conversation`, if given) as a conversation or an
/// event id. A conversation id has no dots; an event id from ingress starts
/// with `<conversation>.`.
pub fn target(arg: &str, conversation: Option<&str>) -> Result<Target, Error> {
    let parse = |c: &str| ConversationId::parse(c).map_err(|e| Error::Target(format!("conversation id {c:?}: {e}")));
    if let Some(c) = conversation {
        return Ok(Target::Event { id: arg.to_owned(), conversation: parse(c)? });
    }
    if let Ok(c) = ConversationId::parse(arg) {
        return Ok(Target::Conversation(c));
    }
    match arg.split_once('.').map(|(c, _)| ConversationId::parse(c)) {
        Some(Ok(conversation)) => Ok(Target::Event { id: arg.to_owned(), conversation }),
        _ => Err(Error::Target(format!(
            "{arg:?} is neither a conversation id nor an event id that names its conversation; \
             for such an event id add --conversation <id>"
        ))),
    }
}

/// A conversation's events, by id, and who each one caused.
#[derive(Debug, Default)]
struct Events {
    nodes: HashMap<String, Node>,
    /// Cause id → (stream, seq, id) of its effects.
    children: BTreeMap<String, Vec<(String, u64, String)>>,
}

impl Events {
    fn add(&mut self, n: Node) {
        if let Some(c) = &n.causation_id {
            self.children.entry(c.clone()).or_default().push((n.stream.clone(), n.seq, n.id.clone()));
        }
        self.nodes.entry(n.id.clone()).or_insert(n);
    }

    /// In time order. What an input caused carries the input's time, so
    /// ties go in pipeline order (the input, its directives, its output,
    /// its marker), then by sequence.
    fn in_order(&self) -> Vec<&Node> {
        let rank = |stream: &str| {
            [STREAM_IN, STREAM_EFFECT, STREAM_OUT, STREAM_APPLIED, STREAM_AUDIT, STREAM_DLQ]
                .iter()
                .position(|s| *s == stream)
                .unwrap_or(usize::MAX)
        };
        // Parsed: `ce-time` comes with 0 to 9 fraction digits and any offset.
        let time = |n: &Node| n.time.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let mut all: Vec<&Node> = self.nodes.values().collect();
        all.sort_by_key(|n| (time(n), rank(&n.stream), n.seq));
        all
    }
}

async fn load(js: &async_nats::jetstream::Context, conversation: &ConversationId) -> Result<Events, Error> {
    let mut events = Events::default();
    for (stream, kind) in STREAMS {
        let filter = conv_contracts::subject::kind_conversation_filter(kind, conversation);
        for m in read::all(js, stream, &filter, true).await? {
            if let Some(n) = node(&m) {
                events.add(n);
            }
        }
    }
    // Dead letters hang under the event that died (the original's id).
    for d in conv_nats::dlq::list(js).await? {
        let Some(original) = &d.original else { continue };
        let ours = original.event_id.as_ref().is_some_and(|id| events.nodes.contains_key(id))
            || original.conversation_id.as_deref() == Some(conversation.as_str());
        if !ours {
            continue;
        }
        let cause = format!("{:?}", d.cause).to_lowercase();
        events.add(Node {
            id: format!("dlq:{}", d.id),
            ty: format!("dead letter ({cause}{})", d.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()),
            stream: STREAM_DLQ.to_owned(),
            seq: d.id,
            time: Some(d.time.clone()),
            causation_id: original.event_id.clone(),
            effects: Vec::new(),
        });
    }
    Ok(events)
}

fn grow(mut n: Node, events: &Events, seen: &mut HashSet<String>, budget: &mut usize, truncated: &mut bool) -> Node {
    let mut kids: Vec<(String, u64, String)> = events.children.get(&n.id).cloned().unwrap_or_default();
    kids.sort();
    for (_, _, id) in kids {
        if *budget == 0 {
            *truncated = true;
            break;
        }
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(child) = events.nodes.get(&id).cloned() {
            *budget -= 1;
            n.effects.push(grow(child, events, seen, budget, truncated));
        }
    }
    n
}

/// One event's place in its conversation.
#[derive(Debug, Serialize)]
pub struct Branch {
    /// From the root cause down to the event's direct cause.
    pub causes: Vec<Node>,
    /// A cause named by `causationid` that is not in the journal (an external event).
    pub external_cause: Option<String>,
    /// The event, with its effects as a tree.
    pub event: Node,
}

#[derive(Debug, Serialize)]
pub struct Trace {
    pub conversation_id: String,
    /// `trace <event-id>`: that event's branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<Branch>,
    /// `trace <conversation>`: every root event with its effects.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<Node>,
    /// Events in the conversation (dead letters included).
    pub events: usize,
    pub truncated: bool,
}

/// The cause tree of a conversation, or one event's branch of it.
pub async fn trace(js: &async_nats::jetstream::Context, target: &Target) -> Result<Trace, Error> {
    let conversation = match target {
        Target::Conversation(c) | Target::Event { conversation: c, .. } => c,
    };
    let events = load(js, conversation).await?;
    let (mut budget, mut truncated) = (MAX_NODES, false);
    let mut trace = Trace {
        conversation_id: conversation.to_string(),
        branch: None,
        roots: Vec::new(),
        events: events.nodes.len(),
        truncated: false,
    };
    match target {
        Target::Conversation(c) => {
            if events.nodes.is_empty() {
                return Err(Error::NotFound(format!(
                    "no events of conversation {c:?} in the journal (for an event id that is also a valid \
                     conversation id, add --conversation <id>)"
                )));
            }
            let mut seen = HashSet::new();
            for n in events.in_order() {
                let root = n.causation_id.as_ref().is_none_or(|c| !events.nodes.contains_key(c));
                if root && seen.insert(n.id.clone()) {
                    trace.roots.push(grow(n.clone(), &events, &mut seen, &mut budget, &mut truncated));
                }
            }
        }
        Target::Event { id, conversation } => {
            let event = events.nodes.get(id).cloned().ok_or_else(|| {
                Error::NotFound(format!(
                    "no event {id:?} among the {} events of conversation {conversation} (if the id does not start \
                     with its conversation, add --conversation <id>)",
                    events.nodes.len()
                ))
            })?;
            let (mut causes, mut external_cause) = (Vec::new(), None);
            let mut seen = HashSet::from([event.id.clone()]);
            let mut cursor = event.causation_id.clone();
            while let Some(id) = cursor {
                if !seen.insert(id.clone()) {
                    break;
                }
                match events.nodes.get(&id) {
                    Some(n) => {
                        cursor = n.causation_id.clone();
                        causes.push(n.clone());
                    }
                    None => {
                        external_cause = Some(id);
                        break;
                    }
                }
            }
            causes.reverse();
            let event = grow(event, &events, &mut seen, &mut budget, &mut truncated);
            trace.branch = Some(Branch { causes, external_cause, event });
        }
    }
    trace.truncated = truncated;
    Ok(trace)
}

/// One row of `convctl events`.
#[derive(Debug, Serialize)]
pub struct Row {
    pub time: Option<String>,
    pub stream: String,
    pub seq: u64,
    #[serde(rename = "type")]
    pub ty: String,
    pub id: String,
    pub causation_id: Option<String>,
}

/// A conversation's events (dead letters included) in time order.
pub async fn events(js: &async_nats::jetstream::Context, conversation: &ConversationId) -> Result<Vec<Row>, Error> {
    let events = load(js, conversation).await?;
    if events.nodes.is_empty() {
        return Err(Error::NotFound(format!("no events of conversation {conversation:?} in the journal")));
    }
    Ok(events
        .in_order()
        .into_iter()
        .map(|n| Row {
            time: n.time.clone(),
            stream: n.stream.clone(),
            seq: n.seq,
            ty: n.ty.clone(),
            id: n.id.clone(),
            causation_id: n.causation_id.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_go_in_time_order_whatever_the_precision_and_offset() {
        let node = |id: &str, time: &str, stream: &str| Node {
            id: id.into(),
            ty: "t".into(),
            stream: stream.into(),
            seq: 1,
            time: Some(time.into()),
            causation_id: None,
            effects: Vec::new(),
        };
        let mut events = Events::default();
        events.add(node("c", "2026-11-28T10:00:00.123456Z", STREAM_IN));
        events.add(node("b", "2026-11-28T10:00:00.123Z", STREAM_IN));
        events.add(node("a", "2026-11-28T11:00:00+02:00", STREAM_IN));
        events.add(node("b-marker", "2026-11-28T10:00:00.123Z", STREAM_APPLIED));
        let order: Vec<&str> = events.in_order().iter().map(|n| n.id.as_str()).collect();
        assert_eq!(order, ["a", "b", "b-marker", "c"]);
    }

    #[test]
    fn targets_are_conversations_or_event_ids_that_name_theirs() {
        let c = |s: &str| ConversationId::parse(s).expect("id");
        assert_eq!(target("demo", None).expect("conversation"), Target::Conversation(c("demo")));
        assert_eq!(
            target("demo.message.received.key.k1", None).expect("event"),
            Target::Event { id: "demo.message.received.key.k1".into(), conversation: c("demo") }
        );
        assert_eq!(
            target("0190a1b2-c3d4", Some("demo")).expect("event with its conversation"),
            Target::Event { id: "0190a1b2-c3d4".into(), conversation: c("demo") }
        );
        assert_eq!(
            target("demo.message.received.key.k1~0", None).expect("a derived id"),
            Target::Event { id: "demo.message.received.key.k1~0".into(), conversation: c("demo") },
            "a derived id starts with its input's conversation"
        );
        for unnamed in ["0190a1b2-c3d4~0", "not a thing"] {
            let err = target(unnamed, None).expect_err("names no conversation");
            assert!(err.to_string().contains("--conversation"), "{err}");
        }
    }
}

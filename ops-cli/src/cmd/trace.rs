//! `convctl trace <event-id>`: the cause/effect chain of an event, both
//! directions, across `CONV_IN`, `CONV_EFFECT`, `CONV_APPLIED` and `CONV_OUT`.
//! Causes follow `causationid` upward; effects are every event whose
//! `causationid` is this one, recursively.

use std::collections::{BTreeMap, HashMap, HashSet};

use conv_contracts::subject::{STREAM_APPLIED, STREAM_EFFECT, STREAM_IN, STREAM_OUT};
use conv_contracts::{ConversationId, Kind};
use conv_nats::read::{self, Stored};
use serde::Serialize;

use crate::cli::Global;
use crate::{Error, Outcome};

const STREAMS: [&str; 4] = [STREAM_IN, STREAM_EFFECT, STREAM_APPLIED, STREAM_OUT];
/// Most effects shown (a long reply has many deltas).
const MAX_NODES: usize = 2000;

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

#[derive(Debug, Serialize)]
pub struct Trace {
    pub conversation_id: String,
    /// From the root cause down to the event's direct cause.
    pub causes: Vec<Node>,
    /// A cause named by `causationid` that is not in the journal (an external event).
    pub external_cause: Option<String>,
    /// The event, with its effects as a tree.
    pub event: Node,
    pub truncated: bool,
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

fn filter(stream: &str, conversation: &str) -> String {
    let kind = match stream {
        STREAM_IN => Kind::In,
        STREAM_EFFECT => Kind::Effect,
        STREAM_APPLIED => Kind::Applied,
        _ => Kind::Out,
    };
    match ConversationId::parse(conversation) {
        Ok(c) => conv_contracts::subject::kind_conversation_filter(kind, &c),
        // Not a conversation id: match nothing rather than everything.
        Err(_) => format!("{}.none", conv_contracts::subject::kind_wildcard(kind).trim_end_matches(".>")),
    }
}

pub async fn trace(g: &Global, event_id: &str) -> Result<Trace, Error> {
    let js = crate::connect(g).await?;
    // Find the event (headers only) to learn its conversation.
    let mut found = None;
    for stream in STREAMS {
        let all = read::all(&js, stream, "", true).await.map_err(Error::JetStream)?;
        if let Some(m) = all.iter().find(|m| m.header("ce-id") == Some(event_id)) {
            found = Some(m.header("ce-subject").unwrap_or_default().to_owned());
            break;
        }
    }
    let conversation = found.ok_or_else(|| Error::Invalid(format!("no event with id {event_id:?} in the journal")))?;

    let mut nodes: HashMap<String, Node> = HashMap::new();
    let mut children: BTreeMap<String, Vec<(String, u64, String)>> = BTreeMap::new();
    for stream in STREAMS {
        for m in read::all(&js, stream, &filter(stream, &conversation), true).await.map_err(Error::JetStream)? {
            let Some(n) = node(&m) else { continue };
            if let Some(c) = &n.causation_id {
                children.entry(c.clone()).or_default().push((n.stream.clone(), n.seq, n.id.clone()));
            }
            nodes.entry(n.id.clone()).or_insert(n);
        }
    }
    let event = nodes.get(event_id).cloned().ok_or_else(|| Error::Invalid(format!("event {event_id:?} vanished")))?;

    let mut causes = Vec::new();
    let mut external_cause = None;
    let mut seen = HashSet::from([event.id.clone()]);
    let mut cursor = event.causation_id.clone();
    while let Some(id) = cursor {
        if !seen.insert(id.clone()) {
            break;
        }
        match nodes.get(&id) {
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

    let mut budget = MAX_NODES;
    let mut truncated = false;
    let event = grow(event, &nodes, &children, &mut seen, &mut budget, &mut truncated);
    Ok(Trace { conversation_id: conversation, causes, external_cause, event, truncated })
}

fn grow(
    mut n: Node,
    nodes: &HashMap<String, Node>,
    children: &BTreeMap<String, Vec<(String, u64, String)>>,
    seen: &mut HashSet<String>,
    budget: &mut usize,
    truncated: &mut bool,
) -> Node {
    let mut kids: Vec<(String, u64, String)> = children.get(&n.id).cloned().unwrap_or_default();
    kids.sort();
    for (_, _, id) in kids {
        if *budget == 0 {
            *truncated = true;
            break;
        }
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(child) = nodes.get(&id).cloned() {
            *budget -= 1;
            n.effects.push(grow(child, nodes, children, seen, budget, truncated));
        }
    }
    n
}

fn print(n: &Node, depth: usize, out: &mut String) {
    out.push_str(&format!("{}{} {} ({}#{})\n", "  ".repeat(depth), n.ty, n.id, n.stream, n.seq));
    for e in &n.effects {
        print(e, depth + 1, out);
    }
}

pub async fn run(g: &Global, event_id: &str) -> Result<Outcome, Error> {
    let t = trace(g, event_id).await?;
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&t)));
    }
    let mut out = format!("conversation {}\ncauses:\n", t.conversation_id);
    if let Some(ext) = &t.external_cause {
        out.push_str(&format!("  (external) {ext}\n"));
    }
    for c in &t.causes {
        out.push_str(&format!("  {} {} ({}#{})\n", c.ty, c.id, c.stream, c.seq));
    }
    if t.causes.is_empty() && t.external_cause.is_none() {
        out.push_str("  (none: this is a root event)\n");
    }
    out.push_str("event and effects:\n");
    print(&t.event, 1, &mut out);
    if t.truncated {
        out.push_str(&format!("  … more than {MAX_NODES} effects; see --json\n"));
    }
    Ok(Outcome::ok(out.trim_end()))
}

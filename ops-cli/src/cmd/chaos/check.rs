//! What a chaos run checks afterwards, from the journal and the views —
//! never from what the services say about themselves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use conv_contracts::subject::{self, STREAM_DLQ, STREAM_OUT};
use conv_contracts::{ConversationId, Limits};
use serde::Serialize;

use crate::Error;

/// Violations found, by invariant; every list must be empty.
#[derive(Debug, Default, Serialize)]
pub struct Violations {
    /// Accepted messages (202 with an event id) with no applied marker.
    pub lost: Vec<String>,
    /// Inputs with more than one applied marker, and gaps or repeats in a
    /// conversation's applied order.
    pub applied_twice: Vec<String>,
    /// Output events stored twice (same id, or same position).
    pub duplicate_outputs: Vec<String>,
    /// Timelines that do not show every accepted message answered, run idle.
    pub incomplete: Vec<String>,
    /// Stored views that differ from the fold of the journal.
    pub views_differ: Vec<String>,
    /// Conversations whose replayed state differs from the live one.
    pub replay_mismatch: Vec<String>,
    /// Entries in `CONV_DLQ`.
    pub dead_letters: u64,
    /// Messages not accepted, replies that never came, services that died.
    pub other: Vec<String>,
}

impl Violations {
    /// One line per invariant with its count and the first details.
    pub fn table(&self) -> String {
        let rows: [(&str, &[String]); 7] = [
            ("accepted messages lost", &self.lost),
            ("inputs applied twice", &self.applied_twice),
            ("duplicate outputs", &self.duplicate_outputs),
            ("incomplete timelines", &self.incomplete),
            ("views differing from the journal", &self.views_differ),
            ("replay mismatches", &self.replay_mismatch),
            ("other problems", &self.other),
        ];
        let mut s = String::new();
        for (what, details) in rows {
            s.push_str(&format!("{:>6}  {what}\n", details.len()));
            for d in details.iter().take(10) {
                s.push_str(&format!("          {d}\n"));
            }
        }
        s.push_str(&format!("{:>6}  dead letters\n", self.dead_letters));
        s
    }

    /// The table, then the verdict: `passed` (what held) or FAILED, and
    /// where the run left its data and logs.
    pub fn verdict(&self, passed: bool, held: &str, dir: &std::path::Path) -> String {
        let verdict = if passed { format!("PASSED: {held}") } else { "FAILED".to_owned() };
        format!("{}\n{verdict} (data and logs in {})", self.table(), dir.display())
    }

    pub fn total(&self) -> usize {
        self.lost.len()
            + self.applied_twice.len()
            + self.duplicate_outputs.len()
            + self.incomplete.len()
            + self.views_differ.len()
            + self.replay_mismatch.len()
            + usize::try_from(self.dead_letters).unwrap_or(usize::MAX)
            + self.other.len()
    }
}

/// What clients sent to one conversation and ingress accepted (event ids,
/// in order).
#[derive(Debug, Default, Clone)]
pub struct Sent {
    pub messages: Vec<String>,
    /// Retries asked for after visible failures.
    pub retries: Vec<String>,
}

impl Sent {
    /// Every accepted input.
    fn inputs(&self) -> impl Iterator<Item = &String> {
        self.messages.iter().chain(&self.retries)
    }
}

/// Groups the turns by conversation.
pub fn sent<'a>(turns: impl IntoIterator<Item = &'a super::load::Turn>) -> BTreeMap<String, Sent> {
    let mut out: BTreeMap<String, Sent> = BTreeMap::new();
    for t in turns {
        let s = out.entry(t.conversation.clone()).or_default();
        s.messages.push(t.event_id.clone());
        s.retries.extend(t.retries.iter().cloned());
    }
    out
}

/// Checks every conversation in `accepted` (conversation → what ingress
/// accepted for it). The stored views are read through `client` first, each
/// given time (30 s for all of them) to show its messages answered.
pub async fn check(
    js: &jetstream::Context,
    client: &super::load::Client,
    accepted: &BTreeMap<String, Sent>,
) -> Result<Violations, Error> {
    let mut timelines = HashMap::new();
    let settle = std::time::Instant::now() + Duration::from_secs(30);
    for (conv, sent) in accepted {
        client.wait_answered(conv, sent.messages.len(), settle).await;
        timelines.insert(conv.clone(), client.timeline(conv).await);
    }
    let mut v = Violations::default();
    for (conv, sent) in accepted {
        let id = ConversationId::parse(conv).map_err(|e| Error::Invalid(format!("{conv}: {e}")))?;
        // Applied exactly once, in an order without gaps.
        let markers = conv_store::journal::markers_after(js, &id, 0).await.map_err(Error::js("the applied markers"))?;
        let mut applied: HashMap<&str, usize> = HashMap::new();
        for (_, m) in &markers {
            *applied.entry(m.input_id.as_str()).or_default() += 1;
        }
        for e in sent.inputs() {
            if !applied.contains_key(e.as_str()) {
                v.lost.push(format!("{conv}: accepted message {e} was never applied"));
            }
        }
        for (input, n) in &applied {
            if *n > 1 {
                v.applied_twice.push(format!("{conv}: input {input} applied {n} times"));
            }
        }
        for (i, (seq, m)) in markers.iter().enumerate() {
            let want = u64::try_from(i).unwrap_or(u64::MAX) + 1;
            if m.applied_index != want {
                v.applied_twice
                    .push(format!("{conv}: marker #{seq} has applied index {}, expected {want}", m.applied_index));
                break;
            }
        }
        // Each output stored once.
        let out = conv_nats::read::all(js, STREAM_OUT, &subject::out_conversation_filter(&id), false).await?;
        let (mut ids_seen, mut positions) = (HashSet::new(), HashSet::new());
        for m in &out {
            let Ok(event) = conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default())
            else {
                v.other.push(format!("{conv}: CONV_OUT #{} is not a readable event", m.seq));
                continue;
            };
            if !ids_seen.insert(event.id().to_owned()) {
                v.duplicate_outputs.push(format!("{conv}: output {} stored twice", event.id()));
            }
            if let Some(p) = event.position()
                && !positions.insert(p)
            {
                v.duplicate_outputs.push(format!("{conv}: two outputs at position {p}"));
            }
        }
        // The timeline shows every accepted message answered.
        match timelines.get(conv).and_then(Option::as_ref) {
            Some(t) => match super::load::answered(t) {
                Some(n) if n == sent.messages.len() => {}
                Some(n) => {
                    v.incomplete.push(format!("{conv}: {n} messages in the timeline, {} accepted", sent.messages.len()))
                }
                None => v.incomplete.push(format!("{conv}: a message is not answered (run {})", t["run_status"])),
            },
            None => v.incomplete.push(format!("{conv}: no timeline")),
        }
        // The stored view is the fold of the journal.
        let verified = conv_store::views::verify(js, &id, Duration::from_secs(10)).await?;
        for d in verified.differences {
            v.views_differ.push(format!("{conv}: {d}"));
        }
        // Replay from the journal alone gives the live state.
        match crate::cmd::replay::report_on(js, &id).await {
            Ok(r) if r.matches => {}
            Ok(r) => v.replay_mismatch.push(format!(
                "{conv}: live {} replay {} (markers {:?})",
                r.live_hash, r.replay_hash, r.mismatched_markers
            )),
            Err(e) => v.replay_mismatch.push(format!("{conv}: {e}")),
        }
    }
    let mut dlq = js.get_stream(STREAM_DLQ).await.map_err(Error::js(STREAM_DLQ))?;
    v.dead_letters = dlq.info().await.map_err(Error::js(STREAM_DLQ))?.state.messages;
    Ok(v)
}

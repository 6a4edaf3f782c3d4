//! Reading a conversation back from the journal: its applied markers in
//! `CONV_APPLIED` (the order the runtime actually applied inputs in) and the
//! inputs they name in `CONV_IN`. Restore after eviction or failover and
//! `convctl replay` both use this; neither calls a model or a tool again —
//! their results are inputs in the journal.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self};
use conv_contracts::payload::Applied as Marker;
use conv_contracts::subject::{STREAM_APPLIED, STREAM_IN};
use conv_contracts::{ConversationId, Envelope, EventType, Limits, Payload};
use futures::StreamExt;

use conv_core::reducer;
use conv_core::snapshot::Snapshot;
use conv_core::state::State;

use conv_nats::service::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("journal: {doing}: {source}")]
    JetStream { doing: &'static str, source: BoxError },
    #[error("applied marker #{seq} is not readable: {detail}")]
    BadMarker { seq: u64, detail: String },
    #[error("output CONV_OUT #{seq} is not readable: {detail}")]
    BadOutput { seq: u64, detail: String },
    #[error("input CONV_IN #{seq} named by an applied marker is not readable: {detail}")]
    MissingInput { seq: u64, detail: String },
}

/// `map_err(failed("reading X"))`: a JetStream failure and what was being done.
fn failed<E: Into<BoxError>>(doing: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::JetStream { doing, source: e.into() }
}

/// Subject of a conversation's applied markers.
pub fn marker_subject(conversation: &ConversationId) -> String {
    conv_contracts::subject::for_event(EventType::Applied, conversation)
}

/// The conversation's markers after `after_seq` (a `CONV_APPLIED` sequence),
/// in order, with their sequences.
pub async fn markers_after(
    js: &jetstream::Context,
    conversation: &ConversationId,
    after_seq: u64,
) -> Result<Vec<(u64, Marker)>, Error> {
    Ok(markers_and_last(js, conversation, after_seq).await?.0)
}

/// [`markers_after`], and the sequence of the conversation's last marker in
/// `CONV_APPLIED` (0: none stored, or all aged out).
async fn markers_and_last(
    js: &jetstream::Context,
    conversation: &ConversationId,
    after_seq: u64,
) -> Result<(Vec<(u64, Marker)>, u64), Error> {
    let subject = marker_subject(conversation);
    let stream = js.get_stream_no_info(STREAM_APPLIED).await.map_err(failed("opening CONV_APPLIED"))?;
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => m.sequence,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(failed("reading the last applied marker")(e)),
    };
    if last <= after_seq {
        return Ok((Vec::new(), last));
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after_seq + 1 },
            ..Default::default()
        })
        .await
        .map_err(failed("reading applied markers"))?;
    let mut messages = consumer.messages().await.map_err(failed("reading applied markers"))?;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(failed("reading applied markers (10 s)"))?;
        let Some(message) = next else { break };
        let message = message.map_err(failed("reading applied markers"))?;
        let seq = message.info().map(|i| i.stream_sequence).map_err(failed("reading an applied marker's sequence"))?;
        let event =
            conv_nats::headers::decode(&message.subject, message.headers.as_ref(), &message.payload, Limits::default())
                .map_err(|e| Error::BadMarker { seq, detail: e.to_string() })?;
        match event.into_data() {
            Payload::Applied(m) => out.push((seq, m)),
            other => return Err(Error::BadMarker { seq, detail: format!("not a marker: {:?}", other.event_type()) }),
        }
        if seq >= last {
            break;
        }
    }
    Ok((out, last))
}

/// The input a marker names.
pub async fn input(js: &jetstream::Context, seq: u64) -> Result<Envelope, Error> {
    let stream = js.get_stream_no_info(STREAM_IN).await.map_err(failed("opening CONV_IN"))?;
    let m = stream.get_raw_message(seq).await.map_err(|e| Error::MissingInput { seq, detail: e.to_string() })?;
    conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default())
        .map_err(|e| Error::MissingInput { seq, detail: e.to_string() })
}

/// The outcome of a rebuild.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub snapshot: Snapshot,
    /// Markers read and applied.
    pub applied: u64,
    /// The last marker's recorded state hash (what the live runtime had), if any.
    pub recorded_hash: Option<String>,
    /// Markers whose recorded hash differs from the rebuilt state's.
    pub mismatches: Vec<u64>,
    /// The conversation's last marker in `CONV_APPLIED` (0: none): what the
    /// next marker expects as the last one on its subject.
    pub last_marker_seq: u64,
}

/// Rebuilds a conversation: from `from` (a snapshot) or from scratch, applying
/// every later marker's input in applied order and checking each recorded hash.
pub async fn rebuild(
    js: &jetstream::Context,
    conversation: &ConversationId,
    from: Option<Snapshot>,
) -> Result<Rebuilt, Error> {
    let after = from.as_ref().map_or(0, |s| s.applied_seq);
    let (markers, last_marker_seq) = markers_and_last(js, conversation, after).await?;
    // From scratch: under the rules the conversation started with (those
    // of its first marker; 1 before markers named them).
    let mut snapshot = from.unwrap_or_else(|| {
        let rules = markers.first().map_or(conv_core::state::RULES, |(_, m)| m.rules.unwrap_or(1));
        Snapshot { applied_seq: 0, state: State::with_rules(conversation.as_str(), rules) }
    });
    let (mut applied, mut recorded_hash, mut mismatches) = (0, None, Vec::new());
    for (seq, marker) in markers {
        if marker.applied_index <= snapshot.state.version {
            snapshot.applied_seq = seq; // already in the snapshot
            continue;
        }
        let event = input(js, marker.input_seq).await?;
        reducer::apply(&mut snapshot.state, &event);
        snapshot.applied_seq = seq;
        applied += 1;
        if snapshot.state.hash() != marker.state_hash {
            mismatches.push(seq);
        }
        recorded_hash = Some(marker.state_hash);
    }
    Ok(Rebuilt { snapshot, applied, recorded_hash, mismatches, last_marker_seq })
}

/// Output a previous owner stored for inputs that have no applied marker:
/// it applied them and published what they emitted, but their markers were
/// not stored (the stream of the markers was unavailable, for example while
/// a cluster elected its leader) before it lost the conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orphans {
    /// The inputs, in the order they were applied: `(CONV_IN sequence, id)`.
    pub inputs: Vec<(u64, String)>,
    /// Ids of the output events already stored (not to be published again).
    pub stored: std::collections::HashSet<String>,
}

/// How far before the last marker's store time orphaned output may lie: a
/// batch publishes its output within the publish timeout before its markers;
/// the rest is room for the clocks of different cluster nodes.
const ORPHAN_LOOKBACK: time::Duration = time::Duration::seconds(60);

/// Finds [`Orphans`] of a conversation whose rebuilt state has emitted
/// `outputs` positions and whose last applied marker is `CONV_APPLIED`
/// sequence `marker_seq` (0: none). One direct read when there are none (the
/// usual case); otherwise the conversation's output since shortly before
/// that marker, or all of it when that marker is gone or the output found
/// does not start right after `outputs`. Output that does not name its
/// input (written before inputs were named) cannot be adopted: it is
/// logged and left.
pub async fn orphans(
    js: &jetstream::Context,
    conversation: &ConversationId,
    outputs: u64,
    marker_seq: u64,
) -> Result<Option<Orphans>, Error> {
    let filter = conv_contracts::subject::out_conversation_filter(conversation);
    let out = js.get_stream_no_info(conv_contracts::subject::STREAM_OUT).await.map_err(failed("opening CONV_OUT"))?;
    let last = match out.get_last_raw_message_by_subject(&filter).await {
        Ok(m) => m,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(failed("reading the last output")(e)),
    };
    let position = conv_nats::headers::header(&last.headers, &format!("ce-{}", conv_contracts::envelope::POSITION))
        .and_then(|v| v.parse::<u64>().ok());
    if position.is_none_or(|p| p <= outputs) {
        return Ok(None);
    }
    let since = match marker_seq {
        0 => None,
        seq => {
            let applied = js.get_stream_no_info(STREAM_APPLIED).await.map_err(failed("opening CONV_APPLIED"))?;
            applied.get_raw_message(seq).await.ok().map(|m| m.time - ORPHAN_LOOKBACK)
        }
    };
    let mut found = beyond(js, &filter, outputs, since).await?;
    if since.is_some() && found.first().is_none_or(|(p, _)| *p != outputs + 1) {
        // The window missed the start (an earlier adoption stopped half way
        // long ago): read all of the conversation's output.
        found = beyond(js, &filter, outputs, None).await?;
    }
    let mut orphans = Orphans::default();
    for (p, event) in found {
        let input_seq = event.input_seq();
        let (Some(input_id), Some(input_seq)) = (event.causation_id().map(str::to_owned), input_seq) else {
            tracing::warn!(
                message = "Output without a marker does not name its input; it cannot be adopted.",
                conversation_id = %conversation,
                event_id = %event.id(),
                position = p
            );
            continue;
        };
        if orphans.inputs.last().is_none_or(|(_, id)| *id != input_id) {
            orphans.inputs.push((input_seq, input_id));
        }
        orphans.stored.insert(event.id().to_owned());
    }
    if orphans.inputs.is_empty() {
        return Ok(None);
    }
    Ok(Some(orphans))
}

/// The conversation's output at positions after `outputs`, by position,
/// read from `since` (server time; `None`: from the start).
async fn beyond(
    js: &jetstream::Context,
    filter: &str,
    outputs: u64,
    since: Option<time::OffsetDateTime>,
) -> Result<Vec<(u64, Envelope)>, Error> {
    let out = conv_contracts::subject::STREAM_OUT;
    let stored = match since {
        Some(t) => conv_nats::read::stored_since(js, out, filter, t, false).await,
        None => conv_nats::read::all(js, out, filter, false).await,
    }
    .map_err(failed("reading CONV_OUT"))?;
    let mut found = Vec::new();
    for m in stored {
        let event = conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default())
            .map_err(|e| Error::BadOutput { seq: m.seq, detail: e.to_string() })?;
        if let Some(p) = event.position().filter(|p| *p > outputs) {
            found.push((p, event));
        }
    }
    found.sort_by_key(|(p, _)| *p);
    Ok(found)
}

//! The dead-letter queue: reading `CONV_DLQ` and re-driving its entries.
//!
//! `CONV_DLQ` holds three kinds of records:
//! * JetStream **max-deliveries** advisories and **terminated** advisories of
//!   every `CONV_*` consumer (they name the stream and sequence of the
//!   original, which is fetched from its stream: journals keep events at
//!   least as long as the DLQ keeps advisories);
//! * **stray** inputs: anything published under `conv.in` that is not
//!   `conv.in.<family>.<id>` lands here directly, and is its own original.
//!
//! A dead letter's id is its `CONV_DLQ` sequence. Re-drive decodes and
//! validates the original like any input, republishes it to its proper
//! subject with a fresh message id (`<event id>~redrive~<dlq id>`) and the
//! headers `Conv-Redrive-Of` / `Conv-Original`, records a
//! `conv.audit.dlq.redriven` event, and only then removes the entry.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use chrono::{DateTime, SecondsFormat, Utc};
use conv_contracts::payload::DlqRedriven;
use conv_contracts::subject::{self, STREAM_DLQ};
use conv_contracts::{Envelope, Limits, Rejection, binding};
use serde::{Deserialize, Serialize};

use crate::journal::{self, AppendError};

/// Header naming the dead letter a re-driven message came from (`CONV_DLQ:<id>`).
pub const REDRIVE_OF: &str = "Conv-Redrive-Of";
/// Header naming the original message (`<stream>:<seq>`).
pub const ORIGINAL: &str = "Conv-Original";
/// CloudEvents `source` of audit events written by re-drive.
pub const AUDIT_SOURCE: &str = "/conv/convctl/dlq";

/// What put a message into the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The consumer failed it `max_deliver` times.
    MaxDeliveries,
    /// The consumer terminated it (invalid input), with a reason.
    Terminated,
    /// Published under `conv.in` with a subject that is not `conv.in.<family>.<id>`.
    StraySubject,
    /// Something else on a `CONV_DLQ` subject.
    Other,
}

/// The original message of a dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Original {
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    /// The payload as text (lossy for non-UTF-8 bytes).
    pub payload: String,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub conversation_id: Option<String>,
}

/// One entry of `CONV_DLQ`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its `CONV_DLQ` sequence.
    pub id: u64,
    /// When it entered the DLQ (RFC 3339).
    pub time: String,
    pub cause: Cause,
    /// Stream and consumer that gave up on the original (advisories only).
    pub stream: Option<String>,
    pub consumer: Option<String>,
    pub deliveries: Option<u64>,
    pub reason: Option<String>,
    /// `None` when the original is no longer stored.
    pub original: Option<Original>,
    /// Why the original could not be read, if it could not.
    pub original_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Advisory {
    #[serde(rename = "type")]
    kind: String,
    stream: String,
    consumer: String,
    stream_seq: u64,
    #[serde(default)]
    deliveries: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// Why the DLQ could not be read or an entry not re-driven.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream: {doing}: {source}")]
    JetStream { doing: &'static str, source: crate::service::BoxError },
    #[error("dead letter {id}: the advisory is not readable: {detail}")]
    BadAdvisory { id: u64, detail: String },
    #[error("dead letter {0} does not exist")]
    NotFound(u64),
    #[error("dead letter {id}: the original is no longer stored ({detail})")]
    OriginalGone { id: u64, detail: String },
    #[error("dead letter {id} is not re-drivable: {rejection}")]
    Invalid { id: u64, rejection: Rejection },
    #[error("dead letter {id}: {source}")]
    Append { id: u64, source: AppendError },
    #[error(
        "dead letter {id} was stored under {subject} but names conversation {conversation} (ce-subject); \
         re-driving it would put it into that conversation — pass --force if that is what you want"
    )]
    SubjectMismatch { id: u64, subject: String, conversation: String },
}

/// `map_err(failed("reading X"))`: a JetStream failure and what was being done.
fn failed<E: Into<crate::service::BoxError>>(doing: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::JetStream { doing, source: e.into() }
}

fn rfc3339(msg: &StreamMessage) -> String {
    let nanos = msg.time.unix_timestamp_nanos();
    let secs = i64::try_from(nanos.div_euclid(1_000_000_000)).unwrap_or_default();
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or_default();
    DateTime::<Utc>::from_timestamp(secs, sub)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn headers_map(h: &async_nats::HeaderMap) -> BTreeMap<String, String> {
    crate::headers::pairs(Some(h)).into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn original_of(stream: &str, msg: &StreamMessage) -> Original {
    let headers = headers_map(&msg.headers);
    let find = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let mut original = Original {
        stream: stream.to_owned(),
        seq: msg.sequence,
        subject: msg.subject.to_string(),
        payload: String::from_utf8_lossy(&msg.payload).into_owned(),
        event_id: find("ce-id"),
        event_type: find("ce-type"),
        conversation_id: find("ce-subject"),
        headers,
    };
    // Structured mode: the attributes are in the body.
    if original.event_id.is_none()
        && let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(&msg.payload)
    {
        let get = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        original.event_id = get("id");
        original.event_type = get("type");
        original.conversation_id = get("subject");
    }
    original
}

/// Reads one dead letter (and its original) by id.
pub async fn get(js: &jetstream::Context, id: u64) -> Result<DeadLetter, Error> {
    let dlq = js.get_stream_no_info(STREAM_DLQ).await.map_err(failed("opening CONV_DLQ"))?;
    let msg = dlq.get_raw_message(id).await.map_err(|e| {
        if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound {
            Error::NotFound(id)
        } else {
            failed("reading a dead letter")(e)
        }
    })?;
    let time = rfc3339(&msg);
    let subject = msg.subject.to_string();
    if subject.starts_with("$JS.EVENT.ADVISORY.") {
        let advisory: Advisory =
            serde_json::from_slice(&msg.payload).map_err(|e| Error::BadAdvisory { id, detail: e.to_string() })?;
        let cause = if advisory.kind.ends_with(".max_deliver") { Cause::MaxDeliveries } else { Cause::Terminated };
        let (original, original_error) = match js.get_stream_no_info(&advisory.stream).await {
            Ok(stream) => match stream.get_raw_message(advisory.stream_seq).await {
                Ok(m) => (Some(original_of(&advisory.stream, &m)), None),
                Err(e) => (None, Some(format!("{}#{}: {e}", advisory.stream, advisory.stream_seq))),
            },
            Err(e) => (None, Some(e.to_string())),
        };
        return Ok(DeadLetter {
            id,
            time,
            cause,
            stream: Some(advisory.stream),
            consumer: Some(advisory.consumer),
            deliveries: advisory.deliveries,
            reason: advisory.reason.filter(|r| !r.is_empty()),
            original,
            original_error,
        });
    }
    let stray = subject::is_input(&subject);
    Ok(DeadLetter {
        id,
        time,
        cause: if stray { Cause::StraySubject } else { Cause::Other },
        stream: None,
        consumer: None,
        deliveries: None,
        reason: stray.then(|| format!("subject {subject:?} is not conv.in.<family>.<conversation_id>")),
        original: Some(original_of(STREAM_DLQ, &msg)),
        original_error: None,
    })
}

/// Every dead letter, oldest first.
pub async fn list(js: &jetstream::Context) -> Result<Vec<DeadLetter>, Error> {
    let mut dlq = js.get_stream(STREAM_DLQ).await.map_err(failed("opening CONV_DLQ"))?;
    let state = dlq.info().await.map_err(failed("reading CONV_DLQ's state"))?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        match get(js, seq).await {
            Ok(d) => out.push(d),
            Err(Error::NotFound(_)) => {} // deleted (re-driven) entries leave gaps
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What re-drive did (or, in a dry run, would do) with one entry.
#[derive(Debug, Clone, Serialize)]
pub struct Redriven {
    pub id: u64,
    pub event_id: String,
    pub conversation_id: String,
    /// The subject it was (or would be) republished to.
    pub subject: String,
    /// Sequence in the target stream (`None` in a dry run).
    pub stream_seq: Option<u64>,
    /// The republish hit the dedupe window (re-driven moments ago already).
    pub duplicate: bool,
    pub dry_run: bool,
}

/// Decodes an original for re-drive: the same validation as any input, on
/// its proper subject (a stray's subject is exactly what was wrong with it).
pub fn validate_original(dead: &DeadLetter, limits: Limits) -> Result<Envelope, Error> {
    let id = dead.id;
    let Some(original) = &dead.original else {
        return Err(Error::OriginalGone { id, detail: dead.original_error.clone().unwrap_or_default() });
    };
    let pairs: Vec<(&str, &str)> = original.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let event = match binding::detect_mode(pairs.iter().copied()) {
        binding::Mode::Binary => binding::decode_binary(pairs, original.payload.as_bytes(), limits),
        binding::Mode::Structured => binding::decode_structured(original.payload.as_bytes(), limits),
    }
    .map_err(|rejection| Error::Invalid { id, rejection })?;
    // An advisory's original must belong to the stream it came from.
    let expected = if dead.cause == Cause::StraySubject { subject::STREAM_IN } else { original.stream.as_str() };
    if event.event_type().kind().stream() != expected {
        let rejection = Rejection::SubjectTypeMismatch {
            subject: original.subject.clone(),
            event_type: event.event_type().to_string(),
            conversation: event.conversation_id().to_string(),
        };
        return Err(Error::Invalid { id, rejection });
    }
    Ok(event)
}

/// The conversation the subject an original was stored under names (its
/// last token), when that differs from the event's `ce-subject`: a message
/// published under one conversation's subject that claims another.
pub fn subject_mismatch(dead: &DeadLetter, event: &Envelope) -> Option<String> {
    let subject = &dead.original.as_ref()?.subject;
    let named = subject.rsplit('.').next()?;
    (named != event.conversation_id().as_str()).then(|| subject.clone())
}

/// Re-drives one dead letter (see the module docs). A dry run validates and
/// reports, changing nothing. An original whose subject names another
/// conversation than its `ce-subject` is refused unless `force`.
pub async fn redrive(
    js: &jetstream::Context,
    id: u64,
    dry_run: bool,
    force: bool,
    timeout: Duration,
) -> Result<Redriven, Error> {
    let dead = get(js, id).await?;
    let event = validate_original(&dead, Limits::default())?;
    if let Some(subject) = subject_mismatch(&dead, &event).filter(|_| !force) {
        return Err(Error::SubjectMismatch { id, subject, conversation: event.conversation_id().to_string() });
    }
    let mut done = Redriven {
        id,
        event_id: event.id().to_owned(),
        conversation_id: event.conversation_id().to_string(),
        subject: event.nats_subject(),
        stream_seq: None,
        duplicate: false,
        dry_run,
    };
    if dry_run {
        return Ok(done);
    }
    let original = dead.original.as_ref().map(|o| format!("{}:{}", o.stream, o.seq)).unwrap_or_default();
    let redrive_of = format!("{STREAM_DLQ}:{id}");
    let msg_id = format!("{}~redrive~{id}", event.id());
    let appended = journal::append(js, &event, &msg_id, &[(REDRIVE_OF, &redrive_of), (ORIGINAL, &original)], timeout)
        .await
        .map_err(|source| Error::Append { id, source })?;
    done.stream_seq = Some(appended.seq);
    done.duplicate = appended.duplicate;

    let (original_stream, original_seq, original_subject) =
        dead.original.as_ref().map(|o| (o.stream.clone(), o.seq, o.subject.clone())).unwrap_or_default();
    let audit = Envelope::service(
        format!("{}.audit.dlq.{id}.redriven", event.conversation_id()),
        AUDIT_SOURCE,
        event.conversation_id().clone(),
        DlqRedriven {
            dlq_seq: id,
            original_stream,
            original_seq,
            original_subject,
            original_event_id: Some(event.id().to_owned()),
            redrive_msg_id: msg_id,
        },
    )
    .caused_by(&event)
    .with_time(Utc::now());
    let audit_msg_id = conv_contracts::trust::derived_msg_id(audit.conversation_id(), audit.id());
    journal::append(js, &audit, &audit_msg_id, &[], timeout).await.map_err(|source| Error::Append { id, source })?;

    let dlq = js.get_stream_no_info(STREAM_DLQ).await.map_err(failed("opening CONV_DLQ"))?;
    dlq.delete_message(id).await.map_err(failed("deleting the re-driven dead letter"))?;
    tracing::info!(message = "Re-driven.", dlq_id = id, event_id = %event.id(), conversation_id = %event.conversation_id());
    Ok(done)
}

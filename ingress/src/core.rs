//! The ingest path every adapter shares: normalize → validate → append to
//! `CONV_IN` (deduped by conversation, source and id:
//! `conv_contracts::trust::ingress_msg_id`) → answer. Transport code
//! (HTTP, NATS) only turns requests into [`Meta`] + body and answers with
//! [`Accepted`] or [`IngestError`].

use std::time::Instant;

use chrono::Utc;
use conv_contracts::id::check_event_id;
use conv_contracts::{ConversationId, Envelope, EventType, Limits, Payload, Rejection, binding};
use conv_nats::journal::{self, AppendError};
use serde_json::{Map, Value};

use crate::metrics::{self, Metrics};
use crate::options::IngressOptions;

/// CloudEvents `source` of events that ingress builds from plain requests.
pub const SOURCE_HTTP: &str = "/conv/ingress/http";
pub const SOURCE_NATS: &str = "/conv/ingress/nats";

pub use conv_contracts::api::Accepted;

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// NATS/JetStream unavailable: retry later (503 with `Retry-After`).
    #[error("{0}")]
    Unavailable(String),
    /// Larger than the NATS server takes (`max_payload`), headers included.
    #[error("{0}")]
    TooLarge(String),
    /// JetStream refused the message for good.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    /// A request header that cannot be used (400), e.g. `Idempotency-Key`.
    #[error("header {name}: {detail}")]
    BadHeader { name: String, detail: String },
    /// No valid client API key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A key or token that does not cover this (403); nothing is journaled.
    #[error("{0}")]
    Forbidden(String),
    /// Over the key's request rate (429 with `Retry-After`).
    #[error("too many requests for this API key; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: std::time::Duration },
    /// The body did not arrive in time (408).
    #[error("{0}")]
    TimedOut(String),
    /// The pipeline lags: new work is shed for now (503 with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
}

impl IngestError {
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Rejected(r) => r.code(),
            IngestError::Unavailable(_) => metrics::UNAVAILABLE,
            IngestError::TooLarge(_) => "oversize",
            IngestError::Refused(_) => "journal_refused",
            IngestError::NotFound(_) => "not_found",
            IngestError::BadHeader { .. } => "bad_header",
            IngestError::Unauthorized(_) => "unauthorized",
            IngestError::Forbidden(_) => "forbidden",
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::TimedOut(_) => "request_timeout",
            IngestError::Overloaded(_) => "overloaded",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            IngestError::Rejected(r) => r.http_status(),
            IngestError::Unavailable(_) => 503,
            IngestError::TooLarge(_) => 413,
            IngestError::Refused(_) => 500,
            IngestError::NotFound(_) => 404,
            IngestError::BadHeader { .. } => 400,
            IngestError::Unauthorized(_) => 401,
            IngestError::Forbidden(_) => 403,
            IngestError::RateLimited { .. } => 429,
            IngestError::TimedOut(_) => 408,
            IngestError::Overloaded(_) => 503,
        }
    }
}

/// Request metadata that adapters turn into envelope attributes.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// `Idempotency-Key`: repeats with the same key (same conversation and
    /// event type) get the same event id, so JetStream stores one.
    pub idempotency_key: Option<String>,
    /// Optional `causationid` / `correlationid` for events caused by others.
    pub causation_id: Option<String>,
    pub correlation_id: Option<String>,
    /// `Content-Type` of the body, if any.
    pub content_type: Option<String>,
    /// CloudEvents `source` to stamp.
    pub source: &'static str,
}

/// Bytes an output event may need beyond the input it comes from (its
/// envelope, position and headers).
pub const OUTPUT_HEADROOM: usize = 8 * 1024;

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Checks an `Idempotency-Key`: 1–256 printable ASCII characters, no spaces.
pub fn check_idempotency_key(key: &str) -> Result<(), IngestError> {
    let bad = |detail: String| IngestError::BadHeader { name: "Idempotency-Key".into(), detail };
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(bad(format!("must be 1-{MAX_IDEMPOTENCY_KEY_LEN} characters, got {}", key.len())));
    }
    if key.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(bad("must be printable ASCII without spaces".into()));
    }
    if key.contains('~') {
        return Err(bad("`~` is reserved for ids conv derives".into()));
    }
    Ok(())
}

/// The ingest service state, cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingress {
    pub js: async_nats::jetstream::Context,
    pub metrics: Metrics,
    pub options: IngressOptions,
    pub auth: std::sync::Arc<crate::auth::Auth>,
    pub rates: std::sync::Arc<crate::guard::RateLimits>,
    pub shedding: std::sync::Arc<crate::guard::Shedding>,
    /// A span per journaled event: the root of a user message's trace.
    pub tracer: conv_telemetry::Tracer,
}

impl Ingress {
    /// The largest event taken: the body limit, and no more than what the
    /// connected server's `max_payload` leaves for the *outputs* the event
    /// becomes (a message's text is journaled again in its timeline entry),
    /// so nothing is accepted that could not be shown.
    pub fn limits(&self) -> Limits {
        let journal = conv_nats::connect::max_payload(&self.js.client()).saturating_sub(OUTPUT_HEADROOM);
        Limits { max_event_bytes: self.options.max_body_bytes.min(journal) }
    }

    /// Validates a complete event and journals it.
    pub async fn accept(&self, event: Envelope) -> Result<Accepted, IngestError> {
        let family = event.event_type().family();
        let span = self.tracer.event(&event, None, std::time::SystemTime::now());
        let result = self.accept_inner(event).await;
        match &result {
            Ok(a) if a.duplicate => self.metrics.duplicates.inc(),
            Ok(_) => self.metrics.accepted.with_label_values(&[family]).inc(),
            Err(e) => self.metrics.reject(e.code()),
        }
        // Only a newly journaled event has a span: a repeat is the same event.
        if let (Some(span), Ok(a)) = (span, &result)
            && !a.duplicate
        {
            self.tracer
                .finish(span.kind(conv_telemetry::Kind::Server).attr(conv_telemetry::attr::STREAM_SEQ, a.stream_seq));
        }
        result
    }

    async fn accept_inner(&self, event: Envelope) -> Result<Accepted, IngestError> {
        let event = binding::require_input(event)?;
        self.shedding.check(event.data())?;
        let ty = event.event_type();
        // Checked as the bytes it is published as: encoded once.
        let encoded = binding::check(&event, self.limits())?;
        let started = Instant::now();
        let msg_id = conv_contracts::trust::ingress_msg_id(event.conversation_id(), event.source(), event.id());
        let timeout = self.options.publish_timeout();
        let appended = journal::append_encoded(&self.js, event.nats_subject(), encoded, &msg_id, &[], timeout).await;
        self.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
        let appended = appended.map_err(|e| match e {
            AppendError::Unavailable(m) => IngestError::Unavailable(m),
            AppendError::TooLarge(m) => IngestError::TooLarge(m),
            AppendError::Refused(m) => IngestError::Refused(m),
        })?;
        tracing::debug!(
            message = "Journaled.",
            event_id = %event.id(),
            conversation_id = %event.conversation_id(),
            event_type = %ty,
            stream_seq = appended.seq,
            duplicate = appended.duplicate,
        );
        Ok(Accepted {
            event_id: event.id().to_owned(),
            conversation_id: event.conversation_id().to_string(),
            stream_seq: appended.seq,
            duplicate: appended.duplicate,
        })
    }

    /// Validates an event whose id the client chose (a CloudEvent): the id
    /// must stay out of the namespaces conv derives ids in.
    pub fn check_client_event(&self, event: &Envelope) -> Result<(), IngestError> {
        conv_contracts::trust::check_client_id(event.conversation_id(), event.id())
            .map_err(|detail| Rejection::BadAttribute { name: "id".into(), detail: detail.to_string() }.into())
    }

    /// Authenticates the request that carries `event` and applies the
    /// client key's rate limit.
    pub fn authorize(&self, event: &Envelope, presented: crate::auth::Presented<'_>) -> Result<(), IngestError> {
        if let Some(key) = self.auth.check(event, presented)?
            && let Err(retry_after) = self.rates.take(key, std::time::Instant::now())
        {
            return Err(IngestError::RateLimited { retry_after });
        }
        Ok(())
    }

    /// Counts a request refused before an event could be built.
    pub fn refuse(&self, error: IngestError) -> IngestError {
        self.metrics.reject(error.code());
        error
    }
}

/// Builds an input event of type `ty` from a family-specific JSON body.
///
/// `path_fields` are values the URL carries (`tool_call_id`, `step_id`,
/// `timer_id`); they are merged into the body, which must not disagree.
pub fn build(
    ty: EventType,
    conversation: &str,
    path_fields: &[(&str, &str)],
    body: &[u8],
    meta: &Meta,
) -> Result<Envelope, Rejection> {
    let conversation_id = ConversationId::parse(conversation)
        .map_err(|e| Rejection::BadConversationId { found: conversation.to_owned(), detail: e.to_string() })?;
    let mut object = json_object(body, meta.content_type.as_deref(), ty)?;
    for (field, value) in path_fields {
        match object.get(*field) {
            Some(Value::String(v)) if v != value => {
                return Err(Rejection::PayloadSchema {
                    event_type: ty,
                    detail: format!("`{field}` is {v:?} in the body but {value:?} in the URL"),
                });
            }
            _ => {
                object.insert((*field).to_owned(), Value::String((*value).to_owned()));
            }
        }
    }
    let data = Payload::from_json(ty, Value::Object(object))
        .map_err(|detail| Rejection::PayloadSchema { event_type: ty, detail: detail.to_string() })?;
    let id = event_id(ty, &conversation_id, &data, meta.idempotency_key.as_deref())?;
    let event = Envelope::new(id, meta.source, conversation_id, data)?
        .with_time(Utc::now())
        .with_causation(meta.causation_id.clone(), meta.correlation_id.clone())?;
    Ok(event)
}

/// The body as a JSON object (`{}` when empty).
fn json_object(body: &[u8], content_type: Option<&str>, ty: EventType) -> Result<Map<String, Value>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    if let Some(ct) = content_type {
        let media = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if media != "application/json" && !(media.starts_with("application/") && media.ends_with("+json")) {
            return Err(Rejection::UnsupportedContentType { found: ct.to_owned() });
        }
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Rejection::PayloadSchema { event_type: ty, detail: "the body must be a JSON object".into() }),
        Err(e) => Err(Rejection::Malformed { detail: format!("the body is not JSON: {e}") }),
    }
}

/// The event id: from the `Idempotency-Key`, else from the payload's
/// natural key (so callbacks that retry dedupe by themselves), else a fresh
/// time-ordered UUID.
pub fn event_id(
    ty: EventType,
    conversation: &ConversationId,
    data: &Payload,
    idempotency_key: Option<&str>,
) -> Result<String, Rejection> {
    let short = ty.as_str().rsplit('.').next().unwrap_or_default();
    if let Some(key) = idempotency_key {
        let bad = |detail: String| Rejection::BadAttribute { name: "Idempotency-Key".into(), detail };
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(bad(format!("must be 1-{MAX_IDEMPOTENCY_KEY_LEN} characters")));
        }
        if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(bad(format!("contains {c:?}; use printable ASCII without spaces")));
        }
        let id = format!("{conversation}.{}.{short}.key.{key}", ty.family());
        if id.len() <= conv_contracts::id::MAX_EVENT_ID_LEN {
            return Ok(id);
        }
        // A long key: its digest keeps the id within the limit.
        let digest = conv_contracts::trust::ingress_msg_id(conversation, ty.as_str(), key);
        return Ok(format!("{conversation}.{}.{short}.keyh.{}", ty.family(), digest.trim_start_matches("in1.")));
    }
    if let Some(natural) = data.natural_key() {
        let id = format!("{conversation}.{natural}");
        check_event_id(&id).map_err(|e| Rejection::BadAttribute {
            name: "id".into(),
            detail: format!("{e} (it is derived from the ids in the URL or body: {natural:?})"),
        })?;
        return Ok(id);
    }
    Ok(uuid::Uuid::now_v7().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta { source: SOURCE_HTTP, ..Default::default() }
    }

    #[test]
    fn builds_a_message() {
        let e = build(EventType::MessageReceived, "c1", &[], br#"{"text":"hi"}"#, &meta()).unwrap();
        assert_eq!(e.event_type(), EventType::MessageReceived);
        assert_eq!(e.conversation_id().as_str(), "c1");
        assert!(e.time().is_some());
        assert!(binding::check(&e, Limits::default()).is_ok());
    }

    #[test]
    fn idempotency_keys_give_stable_ids() {
        let m = Meta { idempotency_key: Some("k-1".into()), ..meta() };
        let a = build(EventType::MessageReceived, "c1", &[], br#"{"text":"hi"}"#, &m).unwrap();
        let b = build(EventType::MessageReceived, "c1", &[], br#"{"text":"hi"}"#, &m).unwrap();
        assert_eq!(a.id(), b.id());
        let other = build(EventType::AbortRequested, "c1", &[], b"", &m).unwrap();
        assert_ne!(a.id(), other.id(), "keys are scoped by event type");
        let bad = Meta { idempotency_key: Some("has space".into()), ..meta() };
        let err = build(EventType::MessageReceived, "c1", &[], br#"{"text":"hi"}"#, &bad).unwrap_err();
        assert_eq!(err.code(), "bad_attribute");
    }

    #[test]
    fn callbacks_get_natural_ids_and_path_fields() {
        let a =
            build(EventType::ToolCompleted, "c1", &[("tool_call_id", "call_1")], br#"{"result":{"ok":true}}"#, &meta())
                .unwrap();
        assert_eq!(a.id(), "c1.tool.call_1.completed");
        let err = build(
            EventType::ToolCompleted,
            "c1",
            &[("tool_call_id", "call_1")],
            br#"{"tool_call_id":"call_2"}"#,
            &meta(),
        )
        .unwrap_err();
        assert_eq!(err.code(), "payload_schema");
    }

    #[test]
    fn body_errors() {
        let m = Meta { content_type: Some("text/plain".into()), ..meta() };
        assert_eq!(
            build(EventType::MessageReceived, "c1", &[], b"hi", &m).unwrap_err().code(),
            "unsupported_content_type"
        );
        assert_eq!(build(EventType::MessageReceived, "c1", &[], b"{nope", &meta()).unwrap_err().code(), "malformed");
        assert_eq!(build(EventType::MessageReceived, "c1", &[], b"[1]", &meta()).unwrap_err().code(), "payload_schema");
        assert_eq!(build(EventType::MessageReceived, "c1", &[], b"{}", &meta()).unwrap_err().code(), "payload_schema");
        assert_eq!(
            build(EventType::MessageReceived, "c.1", &[], br#"{"text":"x"}"#, &meta()).unwrap_err().code(),
            "bad_conversation_id"
        );
        assert!(build(EventType::StopRequested, "c1", &[], b"", &meta()).is_ok());
    }
}

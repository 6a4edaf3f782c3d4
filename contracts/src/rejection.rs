//! Typed reasons for refusing an event.

use crate::types::EventType;

/// Why an event was refused. Every malformed input maps to exactly one of these;
/// [`Rejection::code`] is the stable machine-readable name used in HTTP error
/// bodies, DLQ records and metrics labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The bytes are not a CloudEvent at all (not JSON, not an object, bad header encoding).
    #[error("malformed event: {detail}")]
    Malformed { detail: String },
    /// A required attribute is absent.
    #[error("missing required attribute `{field}`")]
    MissingField { field: &'static str },
    #[error("specversion {found:?} is not supported; only \"1.0\" is")]
    BadSpecVersion { found: String },
    /// An attribute is present but has the wrong JSON type or an invalid value.
    #[error("attribute `{name}` is invalid: {detail}")]
    BadAttribute { name: String, detail: String },
    #[error("unknown event type {found:?}")]
    UnknownType { found: String },
    #[error("bad conversation id {found:?}: {detail}")]
    BadConversationId { found: String, detail: String },
    /// The NATS subject (or URL) does not agree with the event's type or subject.
    #[error("subject {subject:?} does not match event type {event_type} / conversation {conversation:?}")]
    SubjectTypeMismatch { subject: String, event_type: String, conversation: String },
    #[error("data of {event_type} does not match its schema: {detail}")]
    PayloadSchema { event_type: EventType, detail: String },
    #[error("event is {size} bytes; the limit is {limit}")]
    Oversize { size: usize, limit: usize },
    #[error("content type {found:?} is not supported; send application/json data or application/cloudevents+json")]
    UnsupportedContentType { found: String },
    #[error("{event_type} version {version} is newer than this reader supports (v{supported})")]
    UnsupportedVersion { event_type: EventType, version: u32, supported: u32 },
    /// A valid event of a kind the receiver does not take (ingress takes `conv.in.*` only).
    #[error("{event_type} is not an input; only conv.in.* events can be sent to a conversation")]
    NotAnInput { event_type: EventType },
}

impl Rejection {
    /// Stable, low-cardinality code of the reason.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Malformed { .. } => "malformed",
            Rejection::MissingField { .. } => "missing_field",
            Rejection::BadSpecVersion { .. } => "bad_specversion",
            Rejection::BadAttribute { .. } => "bad_attribute",
            Rejection::UnknownType { .. } => "unknown_type",
            Rejection::BadConversationId { .. } => "bad_conversation_id",
            Rejection::SubjectTypeMismatch { .. } => "subject_type_mismatch",
            Rejection::PayloadSchema { .. } => "payload_schema",
            Rejection::Oversize { .. } => "oversize",
            Rejection::UnsupportedContentType { .. } => "unsupported_content_type",
            Rejection::UnsupportedVersion { .. } => "unsupported_version",
            Rejection::NotAnInput { .. } => "not_an_input",
        }
    }

    /// All codes, for metrics pre-registration and docs.
    pub const CODES: [&'static str; 12] = [
        "malformed",
        "missing_field",
        "bad_specversion",
        "bad_attribute",
        "unknown_type",
        "bad_conversation_id",
        "subject_type_mismatch",
        "payload_schema",
        "oversize",
        "unsupported_content_type",
        "unsupported_version",
        "not_an_input",
    ];

    /// The HTTP status an edge answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Rejection::Malformed { .. } => 400,
            Rejection::Oversize { .. } => 413,
            Rejection::UnsupportedContentType { .. } => 415,
            _ => 422,
        }
    }
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted encoded event (headers plus body), in bytes.
    pub max_event_bytes: usize,
}

/// 1 MiB, the pinned body limit.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self { max_event_bytes: DEFAULT_MAX_EVENT_BYTES }
    }
}

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

/// `code()` and `CODES` from one list.
macro_rules! codes {
    ($($variant:ident => $code:literal),* $(,)?) => {
        impl Rejection {
            /// Stable, low-cardinality code of the reason.
            pub fn code(&self) -> &'static str {
                match self {
                    $(Rejection::$variant { .. } => $code,)*
                }
            }

            /// All codes, for metrics pre-registration and docs.
            pub const CODES: &'static [&'static str] = &[$($code),*];
        }
    };
}

codes! {
    Malformed => "malformed", MissingField => "missing_field", BadSpecVersion => "bad_specversion",
    BadAttribute => "bad_attribute", UnknownType => "unknown_type", BadConversationId => "bad_conversation_id",
    SubjectTypeMismatch => "subject_type_mismatch", PayloadSchema => "payload_schema", Oversize => "oversize",
    UnsupportedContentType => "unsupported_content_type", UnsupportedVersion => "unsupported_version",
    NotAnInput => "not_an_input",
}

impl Rejection {
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

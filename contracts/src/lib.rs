//! # conv-contracts
//!
//! The only crate that defines conv's wire types. Everything that crosses a
//! process boundary — the CloudEvents envelope, the type taxonomy, payloads,
//! priorities, subjects, validation and the version policy — lives here.
//!
//! Architecture invariant: this crate knows nothing of NATS, HTTP or tokio.
//! Transports hand it `(name, value)` header pairs and byte slices.
//!
//! The typed [`Envelope`] is what the rest of conv works with; the
//! `cloudevents-sdk` [`cloudevents::Event`] is accepted and produced at the
//! edges (see [`cloudevent`]).

pub mod api;
pub mod binding;
pub mod cloudevent;
pub mod envelope;
pub mod id;
pub mod json;
pub mod live;
pub mod payload;
pub mod records;
pub mod rejection;
pub mod subject;
pub mod trust;
pub mod types;
pub mod version;

pub use binding::{decode_binary, decode_nats, decode_structured, encode_binary, encode_structured};
pub use envelope::Envelope;
pub use id::ConversationId;
pub use payload::Payload;
pub use rejection::{Limits, Rejection};
pub use types::{EventType, Kind, Priority};

/// Something that is not valid — a field, an id, a setting — and why, in
/// words for whoever sent it (never repeating a value that may be secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<&str> for Invalid {
    fn from(why: &str) -> Self {
        Invalid(why.to_owned())
    }
}

impl From<String> for Invalid {
    fn from(why: String) -> Self {
        Invalid(why)
    }
}

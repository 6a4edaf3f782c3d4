//! The typed event inside conv: a validated CloudEvents 1.0 envelope.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::id::ConversationId;
use crate::payload::Payload;
use crate::types::{EventType, Priority};

pub const SPEC_VERSION: &str = "1.0";
pub const CAUSATION_ID: &str = "causationid";
pub const CORRELATION_ID: &str = "correlationid";
/// Extension carried by every `conv.out.*` event: its position (1, 2, 3, …)
/// in the conversation's output, in the order the runtime emitted it. Views
/// fold output in this order, whatever order the stream or a redelivery
/// shows it in (ADR 0006).
pub const POSITION: &str = "position";
/// Extension the runtime adds to what it emits for an input: the input's
/// sequence in `CONV_IN`. A new owner that finds output the applied markers
/// do not explain (the old owner stored it, then lost the stream of its
/// markers) applies those inputs first, in the same order (ADR 0003).
pub const INPUT_SEQ: &str = "inputseq";
/// `datacontenttype` of every event conv writes.
pub const JSON: &str = "application/json";
/// Content type of structured-mode events.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// A validated event. Construct one with [`Envelope::new`] or by decoding (see
/// [`crate::binding`]); every instance satisfies the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// CloudEvents `id`; also the `Nats-Msg-Id` used for dedupe.
    pub id: String,
    /// CloudEvents `source` (a URI-reference naming the producer).
    pub source: String,
    /// CloudEvents `subject`: the conversation this event belongs to.
    pub conversation_id: ConversationId,
    pub time: Option<DateTime<Utc>>,
    pub dataschema: Option<String>,
    /// `id` of the event that caused this one.
    pub causation_id: Option<String>,
    /// Id shared by every event of one causal chain (the root's id).
    pub correlation_id: Option<String>,
    /// Other CloudEvents extensions, kept verbatim (as strings) so nothing a
    /// producer sent is lost when an event is re-published.
    pub extensions: BTreeMap<String, String>,
    pub data: Payload,
}

impl Envelope {
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        conversation_id: ConversationId,
        data: impl Into<Payload>,
    ) -> Self {
        Self {
            id: id.into(),
            source: source.into(),
            conversation_id,
            time: None,
            dataschema: None,
            causation_id: None,
            correlation_id: None,
            extensions: BTreeMap::new(),
            data: data.into(),
        }
    }

    /// Marks this event as caused by `cause`: `causationid` is the cause's id
    /// and `correlationid` is inherited (or starts at the cause).
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causation_id = Some(cause.id.clone());
        self.correlation_id = Some(cause.correlation_id.clone().unwrap_or_else(|| cause.id.clone()));
        self
    }

    pub fn with_time(mut self, time: DateTime<Utc>) -> Self {
        self.time = Some(time);
        self
    }

    pub fn event_type(&self) -> EventType {
        self.data.event_type()
    }

    pub fn priority(&self) -> Priority {
        self.event_type().priority()
    }

    /// The output position (extension [`POSITION`]), if present and numeric.
    pub fn position(&self) -> Option<u64> {
        self.extensions.get(POSITION).and_then(|p| p.parse().ok())
    }

    /// Sets the output position (extension [`POSITION`]).
    pub fn with_position(mut self, position: u64) -> Self {
        self.extensions.insert(POSITION.to_owned(), position.to_string());
        self
    }

    /// The NATS subject to publish this event to.
    pub fn nats_subject(&self) -> String {
        crate::subject::for_event(self.event_type(), &self.conversation_id)
    }
}

//! The typed event inside conv: a validated CloudEvents 1.0 envelope.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::id::{ConversationId, check_event_id, derived_id, fit_event_id};
use crate::payload::Payload;
use crate::rejection::Rejection;
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

/// A validated event: every instance satisfies the contract. Outside this
/// crate one is made only by [`Envelope::new`] (which checks the id, source
/// and data), [`Envelope::service`] (an id fitted from trusted parts),
/// [`Envelope::derived`] (an id derived from a valid cause), or by decoding
/// ([`crate::binding`]); the `with_*` methods keep it valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// CloudEvents `id`; also the `Nats-Msg-Id` used for dedupe.
    pub(crate) id: String,
    /// CloudEvents `source` (a URI-reference naming the producer).
    pub(crate) source: String,
    /// CloudEvents `subject`: the conversation this event belongs to.
    pub(crate) conversation_id: ConversationId,
    pub(crate) time: Option<DateTime<Utc>>,
    pub(crate) dataschema: Option<String>,
    /// `id` of the event that caused this one.
    pub(crate) causation_id: Option<String>,
    /// Id shared by every event of one causal chain (the root's id).
    pub(crate) correlation_id: Option<String>,
    /// Other CloudEvents extensions, kept verbatim (as strings) so nothing a
    /// producer sent is lost when an event is re-published.
    pub(crate) extensions: BTreeMap<String, String>,
    pub(crate) data: Payload,
}

fn bad(name: &str, detail: impl std::fmt::Display) -> Rejection {
    Rejection::BadAttribute { name: name.to_owned(), detail: detail.to_string() }
}

fn checked_id(name: &str, id: String) -> Result<String, Rejection> {
    check_event_id(&id).map_err(|e| bad(name, e))?;
    Ok(id)
}

impl Envelope {
    /// An event of `conversation_id`. Refused: an id that is not a valid
    /// CloudEvents id ([`check_event_id`]), a blank source, or data that
    /// breaks its type's rules ([`Payload::check`]).
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        conversation_id: ConversationId,
        data: impl Into<Payload>,
    ) -> Result<Self, Rejection> {
        let source = source.into();
        if source.trim().is_empty() {
            return Err(bad("source", "must not be empty"));
        }
        let data = data.into();
        data.check()
            .map_err(|detail| Rejection::PayloadSchema { event_type: data.event_type(), detail: detail.to_string() })?;
        Ok(Self::bare(checked_id("id", id.into())?, source, conversation_id, data))
    }

    /// The event with no optional attribute set; the caller vouches for `id`
    /// and `source`.
    fn bare(id: String, source: String, conversation_id: ConversationId, data: Payload) -> Self {
        Self {
            id,
            source,
            conversation_id,
            time: None,
            dataschema: None,
            causation_id: None,
            correlation_id: None,
            extensions: BTreeMap::new(),
            data,
        }
    }

    /// An event a service makes from ids it trusts: `readable_id` when that
    /// is a valid id, otherwise `<conversation>.h<hash>` ([`fit_event_id`]):
    /// the same arguments always give the same id.
    pub fn service(
        readable_id: String,
        source: &'static str,
        conversation_id: ConversationId,
        data: impl Into<Payload>,
    ) -> Self {
        Self::bare(fit_event_id(&conversation_id, readable_id), source.to_owned(), conversation_id, data.into())
    }

    /// An event `cause` leads to: its id is [`derived_id`] of the cause's
    /// id and `tag` (deterministic, so a replay emits the same ids), in the
    /// cause's conversation, at the cause's time, caused by it.
    pub fn derived(
        cause: &Envelope,
        tag: impl std::fmt::Display,
        source: &'static str,
        data: impl Into<Payload>,
    ) -> Self {
        // `derived_id` always gives a valid id: no fitting needed.
        Self::bare(derived_id(&cause.id, tag), source.to_owned(), cause.conversation_id.clone(), data.into())
            .with_time(cause.time)
            .caused_by(cause)
    }

    /// Marks this event as caused by `cause`: `causationid` is the cause's id
    /// and `correlationid` is inherited (or starts at the cause).
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causation_id = Some(cause.id.clone());
        self.correlation_id = Some(cause.correlation_id.clone().unwrap_or_else(|| cause.id.clone()));
        self
    }

    /// Sets `causationid` and `correlationid` (each must be a valid id).
    pub fn with_causation(mut self, causation: Option<String>, correlation: Option<String>) -> Result<Self, Rejection> {
        self.causation_id = causation.map(|c| checked_id(CAUSATION_ID, c)).transpose()?;
        self.correlation_id = correlation.map(|c| checked_id(CORRELATION_ID, c)).transpose()?;
        Ok(self)
    }

    /// Adds a CloudEvents extension. Refused: a name that is not 1-20
    /// characters of `[a-z0-9]`, or one an attribute of the envelope already
    /// has (context attributes, `data`, `causationid`, `correlationid`).
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Result<Self, Rejection> {
        let name = name.into();
        let taken = crate::binding::CONTEXT_ATTRIBUTES.contains(&name.as_str())
            || [CAUSATION_ID, CORRELATION_ID, "data"].contains(&name.as_str());
        if !crate::binding::is_extension_name(&name) || taken {
            return Err(bad(
                &name,
                "extension names are 1-20 characters of [a-z0-9], not a context attribute's, `data`, \
                 `causationid` or `correlationid`",
            ));
        }
        self.extensions.insert(name, value.into());
        Ok(self)
    }

    /// Sets (or with `None` clears) the event time.
    pub fn with_time(mut self, time: impl Into<Option<DateTime<Utc>>>) -> Self {
        self.time = time.into();
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn conversation_id(&self) -> &ConversationId {
        &self.conversation_id
    }

    pub fn time(&self) -> Option<DateTime<Utc>> {
        self.time
    }

    pub fn dataschema(&self) -> Option<&str> {
        self.dataschema.as_deref()
    }

    pub fn causation_id(&self) -> Option<&str> {
        self.causation_id.as_deref()
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// Extensions other than the context attributes, verbatim.
    pub fn extensions(&self) -> &BTreeMap<String, String> {
        &self.extensions
    }

    pub fn data(&self) -> &Payload {
        &self.data
    }

    pub fn into_data(self) -> Payload {
        self.data
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

    /// The input's `CONV_IN` sequence (extension [`INPUT_SEQ`]), if present
    /// and numeric.
    pub fn input_seq(&self) -> Option<u64> {
        self.extensions.get(INPUT_SEQ).and_then(|p| p.parse().ok())
    }

    /// Sets the input's `CONV_IN` sequence (extension [`INPUT_SEQ`]).
    pub fn with_input_seq(mut self, seq: u64) -> Self {
        self.extensions.insert(INPUT_SEQ.to_owned(), seq.to_string());
        self
    }

    /// The NATS subject to publish this event to.
    pub fn nats_subject(&self) -> String {
        crate::subject::for_event(self.event_type(), &self.conversation_id)
    }
}

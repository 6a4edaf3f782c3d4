//! Conversions between the typed [`Envelope`] and the `cloudevents-sdk`
//! [`Event`], the representation used at the edges (and by other CloudEvents
//! tooling). Both directions go through the structured JSON format, so an
//! SDK event is validated exactly like one that arrived as bytes.

use cloudevents::Event;

use crate::binding::{decode_structured, to_structured_json};
use crate::envelope::Envelope;
use crate::rejection::{Limits, Rejection};

/// The event as a `cloudevents-sdk` event.
pub fn to_event(envelope: &Envelope) -> Result<Event, Rejection> {
    serde_json::from_value(to_structured_json(envelope))
        .map_err(|e| Rejection::Malformed { detail: format!("cloudevents-sdk refused the event: {e}") })
}

/// Validates a `cloudevents-sdk` event into an [`Envelope`].
pub fn from_event(event: &Event, limits: Limits) -> Result<Envelope, Rejection> {
    let bytes = serde_json::to_vec(event)
        .map_err(|e| Rejection::Malformed { detail: format!("cannot encode the event: {e}") })?;
    decode_structured(&bytes, limits)
}

impl TryFrom<&Envelope> for Event {
    type Error = Rejection;

    fn try_from(envelope: &Envelope) -> Result<Self, Self::Error> {
        to_event(envelope)
    }
}

impl TryFrom<&Event> for Envelope {
    type Error = Rejection;

    fn try_from(event: &Event) -> Result<Self, Self::Error> {
        from_event(event, Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConversationId;
    use crate::payload::MessageReceived;
    use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};

    #[test]
    fn sdk_event_round_trip() {
        let conv = ConversationId::parse("demo").unwrap();
        let env = Envelope::new(
            "e1",
            "/test",
            conv,
            MessageReceived { text: "hi".into(), role: None, channel: None, sender: None },
        )
        .expect("valid event");
        let event = to_event(&env).unwrap();
        assert_eq!(event.ty(), "conv.in.message.received");
        assert_eq!(event.subject(), Some("demo"));
        assert_eq!(from_event(&event, Limits::default()).unwrap(), env);
    }

    #[test]
    fn sdk_built_event_is_validated() {
        let event = EventBuilderV10::new()
            .id("x1")
            .source("urn:other")
            .ty("conv.in.timer.fired")
            .subject("c-1")
            .extension("causationid", "cause-1")
            .data("application/json", serde_json::json!({"timer_id": "t1"}))
            .build()
            .unwrap();
        let env = Envelope::try_from(&event).unwrap();
        assert_eq!(env.causation_id.as_deref(), Some("cause-1"));
        let bad = EventBuilderV10::new()
            .id("x1")
            .source("urn:other")
            .ty("conv.in.timer.fired")
            .subject("c 1")
            .data("application/json", serde_json::json!({"timer_id": "t1"}))
            .build()
            .unwrap();
        assert_eq!(Envelope::try_from(&bad).unwrap_err().code(), "bad_conversation_id");
    }
}

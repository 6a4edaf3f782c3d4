//! The NATS binary-mode binding of [`Envelope`]s: `ce-` headers plus
//! `Nats-Msg-Id` for server-side dedupe (scoped to the conversation).

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use bytes::Bytes;
use conv_contracts::{Envelope, Limits, Rejection};

/// JetStream's dedupe header.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// Encodes an event in binary mode, with `Nats-Msg-Id` =
/// `conv_contracts::trust::derived_msg_id` (its id, scoped to its
/// conversation).
pub fn encode(event: &Envelope) -> (HeaderMap, Bytes) {
    let (pairs, body) = conv_contracts::encode_binary(event);
    let mut headers = header_map(&pairs);
    headers.insert(MSG_ID, conv_contracts::trust::derived_msg_id(event.conversation_id(), event.id()).as_str());
    (headers, Bytes::from(body))
}

/// NATS headers from `(name, value)` pairs.
pub fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.insert(name.as_str(), value.as_str());
    }
    headers
}

/// Header pairs of a message, first value of each name.
pub fn pairs(headers: Option<&HeaderMap>) -> Vec<(&str, &str)> {
    headers
        .map(|h| h.iter().filter_map(|(name, values)| values.first().map(|v| (name.as_ref(), v.as_str()))).collect())
        .unwrap_or_default()
}

/// First value of header `name`, case-insensitively.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    pairs(Some(headers)).into_iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// Decodes and validates a NATS message (either content mode) received on `subject`.
pub fn decode(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    limits: Limits,
) -> Result<Envelope, Rejection> {
    conv_contracts::decode_nats(subject, pairs(headers), payload, limits)
}

/// Publishes an event to its subject; await the returned future for the
/// JetStream ack (the event is durable only then).
pub async fn publish(js: &async_nats::jetstream::Context, event: &Envelope) -> Result<PublishAckFuture, PublishError> {
    let (headers, body) = encode(event);
    js.publish_with_headers(event.nats_subject(), headers, body).await
}

/// JetStream's per-subject optimistic concurrency header.
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// [`publish`], stored only if the last message on the event's subject is
/// at stream sequence `last` (0: the subject has none): a writer that lost
/// track of the subject is refused (`wrong last sequence`) instead of
/// writing beside another one.
pub async fn publish_expecting(
    js: &async_nats::jetstream::Context,
    event: &Envelope,
    last: u64,
) -> Result<PublishAckFuture, PublishError> {
    let (mut headers, body) = encode(event);
    headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, last.to_string().as_str());
    js.publish_with_headers(event.nats_subject(), headers, body).await
}

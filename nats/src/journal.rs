//! Appending events to the journal: the one publish path that ingress and
//! DLQ re-drive share. An event counts as appended only once JetStream has
//! acknowledged it; every failure says whether retrying can help.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use conv_contracts::Envelope;

use crate::headers::{self, MSG_ID};

/// Where an event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Stream that stored it (`CONV_IN` for inputs).
    pub stream: String,
    /// Its sequence in that stream (the first one, for a duplicate).
    pub seq: u64,
    /// True when the message id was seen inside the dedupe window: nothing was written.
    pub duplicate: bool,
}

/// Why an event was not appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// NATS or JetStream is not answering (disconnected, timed out, no
    /// stream): the event may be retried later with the same message id.
    #[error("journal unavailable: {0}")]
    Unavailable(String),
    /// The message is larger than the server takes (`max_payload`).
    #[error("the event is larger than the journal takes: {0}")]
    TooLarge(String),
    /// JetStream refused the message for good.
    #[error("journal refused the event: {0}")]
    Refused(String),
}

/// Publishes `event` in binary mode with `Nats-Msg-Id: msg_id` and
/// `extra` headers, and waits (up to `timeout`) for the JetStream ack.
///
/// Refuses at once while the client is disconnected, so a publish is never
/// left in the client's buffer to be written after the caller was told it failed.
pub async fn append(
    js: &async_nats::jetstream::Context,
    event: &Envelope,
    msg_id: &str,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Result<Appended, AppendError> {
    let (headers, body) = conv_contracts::encode_binary(event);
    let encoded = conv_contracts::binding::Encoded { headers, body };
    append_encoded(js, event.nats_subject(), encoded, msg_id, extra, timeout).await
}

/// [`append`] of an event already encoded (and checked:
/// `conv_contracts::binding::check`) for `subject`: nothing is encoded
/// again.
pub async fn append_encoded(
    js: &async_nats::jetstream::Context,
    subject: String,
    encoded: conv_contracts::binding::Encoded,
    msg_id: &str,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Result<Appended, AppendError> {
    if js.client().connection_state() != async_nats::connection::State::Connected {
        return Err(AppendError::Unavailable("not connected to NATS".into()));
    }
    let mut hdrs: HeaderMap = headers::header_map(&encoded.headers);
    hdrs.insert(MSG_ID, msg_id);
    for (name, value) in extra {
        hdrs.insert(*name, *value);
    }
    let body = bytes::Bytes::from(encoded.body);
    let publish = async {
        let ack = js.publish_with_headers(subject, hdrs, body).await.map_err(|e| classify(e.kind(), e.to_string()))?;
        crate::connect::unless_disconnected(ack)
            .await
            .ok_or_else(|| AppendError::Unavailable("the NATS connection dropped before the ack".into()))?
            .map_err(|e| classify(e.kind(), e.to_string()))
    };
    let ack = tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| AppendError::Unavailable(format!("no JetStream ack within {}ms", timeout.as_millis())))??;
    Ok(Appended { stream: ack.stream, seq: ack.sequence, duplicate: ack.duplicate })
}

fn classify(kind: PublishErrorKind, detail: String) -> AppendError {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => AppendError::TooLarge(detail),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => AppendError::Refused(detail),
        PublishErrorKind::StreamNotFound => AppendError::Unavailable(format!(
            "{detail}: no stream answered for this subject (a cluster electing its leader, or `convctl setup` not run)"
        )),
        // Timeouts, a broken connection, JetStream busy or out of resources: retry later.
        _ => AppendError::Unavailable(detail),
    }
}

//! The NATS request adapter, built on the async-nats service API so it shows
//! up in `$SRV` discovery (`nats micro ls`). Endpoints (queue group
//! `conv-ingress`, so instances share the load):
//!
//! * `conv.ingress.event` — one CloudEvent, structured (body) or binary
//!   (`ce-` headers + JSON body);
//! * `conv.ingress.message` — `{"conversation_id", "text", ...}`, optional
//!   `Idempotency-Key` header;
//! * `conv.ingress.control` — `{"conversation_id", "action": "abort"|"stop"|"retry", "reason"?}`.
//!
//! Replies are the HTTP 202 body as JSON; errors set `Nats-Service-Error`
//! (`<code>: <message>`) and `Nats-Service-Error-Code` (the HTTP status).

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use conv_contracts::{EventType, Rejection, binding};
use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::core::{IngestError, Ingress, Meta, SOURCE_NATS, build};

pub const GROUP: &str = conv_contracts::subject::INGRESS_API_GROUP;

/// Why the NATS API could not run.
#[derive(Debug, thiserror::Error)]
#[error("NATS service API: {0}")]
pub struct Error(#[source] async_nats::Error);

/// Serves the endpoints until `shutdown`.
pub async fn serve(client: async_nats::Client, ingress: Ingress, shutdown: CancellationToken) -> Result<(), Error> {
    let service = client
        .service_builder()
        .description("conv ingress: validate and append events to CONV_IN")
        .start("conv-ingress", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(Error)?;
    let group = service.group_with_queue_group(GROUP, "conv-ingress");
    let mut event = group.endpoint("event").await.map_err(Error)?;
    let mut message = group.endpoint("message").await.map_err(Error)?;
    let mut control = group.endpoint("control").await.map_err(Error)?;
    loop {
        let (kind, request) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(r) = event.next() => (Endpoint::Event, r),
            Some(r) = message.next() => (Endpoint::Message, r),
            Some(r) = control.next() => (Endpoint::Control, r),
            else => break,
        };
        let ingress = ingress.clone();
        tokio::spawn(async move {
            let result = match handle(&ingress, kind, &request.message).await {
                Ok(event) => ingress.accept(event).await,
                Err(e) => Err(ingress.refuse(e)),
            };
            let reply = match result {
                Ok(accepted) => Ok(Bytes::from(conv_contracts::json::bytes(&accepted))),
                Err(e) => Err(service::error::Error {
                    status: format!("{}: {e}", e.code()),
                    code: usize::from(e.http_status()),
                }),
            };
            if let Err(error) = request.respond(reply).await {
                tracing::warn!(message = "Failed to answer a NATS request.", %error);
            }
        });
    }
    service.stop().await.map_err(Error)
}

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Event,
    Message,
    Control,
}

fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned())
}

async fn handle(
    ing: &Ingress,
    kind: Endpoint,
    message: &async_nats::Message,
) -> Result<conv_contracts::Envelope, IngestError> {
    let limits = ing.limits();
    if message.payload.len() > limits.max_event_bytes {
        return Err(Rejection::Oversize { size: message.payload.len(), limit: limits.max_event_bytes }.into());
    }
    match kind {
        Endpoint::Event => {
            let pairs = conv_nats::headers::pairs(message.headers.as_ref());
            let event = match binding::detect_mode(pairs.iter().copied()) {
                binding::Mode::Binary => binding::decode_binary(pairs.clone(), &message.payload, limits)?,
                binding::Mode::Structured => binding::decode_structured(&message.payload, limits)?,
            };
            ing.check_client_event(&event)?;
            // Who may request here is the NATS permissions' business; an
            // outcome still needs its effect's callback token.
            ing.auth.check_if_callback(&event, crate::auth::Presented::from_pairs(pairs.iter().copied()))?;
            Ok(event)
        }
        Endpoint::Message | Endpoint::Control => {
            let mut body: serde_json::Map<String, Value> = match serde_json::from_slice(&message.payload) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(Rejection::Malformed { detail: "the request must be a JSON object".into() }.into());
                }
                Err(e) => {
                    return Err(Rejection::Malformed { detail: format!("the request is not JSON: {e}") }.into());
                }
            };
            let conversation = match body.remove("conversation_id") {
                Some(Value::String(c)) => c,
                _ => {
                    return Err(Rejection::MissingField { field: "conversation_id" }.into());
                }
            };
            let ty = match kind {
                Endpoint::Message => EventType::MessageReceived,
                _ => match body.remove("action").as_ref().and_then(Value::as_str) {
                    Some("abort") => EventType::AbortRequested,
                    Some("stop") => EventType::StopRequested,
                    Some("retry") => EventType::RetryRequested,
                    other => {
                        return Err(Rejection::BadAttribute {
                            name: "action".into(),
                            detail: format!("must be abort, stop or retry, got {other:?}"),
                        }
                        .into());
                    }
                },
            };
            let meta = Meta {
                idempotency_key: match header(message, "Idempotency-Key") {
                    Some(key) => {
                        crate::core::check_idempotency_key(&key)?;
                        Some(key)
                    }
                    None => None,
                },
                causation_id: header(message, "Causation-Id"),
                correlation_id: header(message, "Correlation-Id"),
                content_type: None,
                source: SOURCE_NATS,
            };
            let bytes = conv_contracts::json::bytes(&Value::Object(body));
            Ok(build(ty, &conversation, &[], &bytes, &meta)?)
        }
    }
}

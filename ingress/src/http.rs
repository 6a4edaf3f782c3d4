//! The HTTP adapter: pinned routes of the ingress API, mapped onto
//! [`crate::core`]. Every error is `{"error": {"code", "message"}}`.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::{Bytes, BytesMut};
use conv_contracts::{EventType, Rejection, binding};
use futures::StreamExt;

use crate::auth::Presented;
use crate::core::{Accepted, IngestError, Ingress, Meta, SOURCE_HTTP, build};

/// How many bytes past the limit are still counted to report the real size.
const COUNT_PAST_LIMIT: usize = 4 * 1024 * 1024;

/// How long a request body may take to arrive once its head has (a client
/// trickling a body must not hold a connection for ever).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the body within [`BODY_TIMEOUT`].
async fn read_body_in_time(ingress: &Ingress, headers: &HeaderMap, body: Body) -> Result<Bytes, IngestError> {
    tokio::time::timeout(BODY_TIMEOUT, read_body(ingress, headers, body)).await.map_err(|_| {
        IngestError::TimedOut(format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs()))
    })?
}

pub fn router(ingress: Ingress) -> Router {
    Router::new()
        .route("/v1/conversations/{id}/messages", post(message))
        .route("/v1/conversations/{id}/abort", post(abort))
        .route("/v1/conversations/{id}/stop", post(stop))
        .route("/v1/conversations/{id}/retry", post(retry))
        .route(
            "/v1/conversations/{id}/tools/{tool_call_id}/{outcome}",
            post(|State(ing), Path(p), headers, body| Callback::Tool.handle(ing, p, headers, body)),
        )
        .route(
            "/v1/conversations/{id}/llm/{step_id}/{outcome}",
            post(|State(ing), Path(p), headers, body| Callback::Llm.handle(ing, p, headers, body)),
        )
        .route("/v1/conversations/{id}/timers/{timer_id}/fired", post(timer))
        .route("/v1/events", post(event))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(ingress)
}

/// The 202 or the error answer.
fn respond(result: Result<Accepted, IngestError>) -> Response {
    match result {
        Ok(accepted) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Err(error) => error_response(&error),
    }
}

pub fn error_response(error: &IngestError) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = conv_nats::http::error(status, error.code(), error.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let IngestError::RateLimited { retry_after } = error {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn presented(headers: &HeaderMap) -> Presented<'_> {
    Presented::from_pairs(headers.iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))))
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn meta(headers: &HeaderMap) -> Result<Meta, IngestError> {
    // A key that is not visible ASCII is refused, never ignored (ignoring
    // it would store every retry).
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v.to_str().map_err(|_| IngestError::BadHeader {
                name: "Idempotency-Key".into(),
                detail: "must be printable ASCII without spaces".into(),
            })?;
            crate::core::check_idempotency_key(key)?;
            Some(key.to_owned())
        }
    };
    Ok(Meta {
        idempotency_key,
        causation_id: header_str(headers, "causation-id"),
        correlation_id: header_str(headers, "correlation-id"),
        content_type: header_str(headers, "content-type"),
        source: SOURCE_HTTP,
    })
}

/// Reads the body up to the limit; past it, keeps counting (to a point) so
/// the 413 names the real size.
async fn read_body(ingress: &Ingress, headers: &HeaderMap, body: Body) -> Result<Bytes, IngestError> {
    let limit = ingress.options.max_body_bytes;
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared.filter(|size| *size > limit) {
        return Err(Rejection::Oversize { size, limit }.into());
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Rejection::Malformed { detail: format!("cannot read the body: {e}") })?;
        size += chunk.len();
        if size <= limit {
            buf.extend_from_slice(&chunk);
        } else if size > limit + COUNT_PAST_LIMIT {
            break;
        }
    }
    if size > limit {
        return Err(Rejection::Oversize { size, limit }.into());
    }
    Ok(buf.freeze())
}

async fn ingest(
    ingress: Ingress,
    ty: EventType,
    conversation: &str,
    path_fields: &[(&str, &str)],
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        ingress.auth.precheck(Some(ty), conversation, presented(&headers))?;
        let bytes = read_body_in_time(&ingress, &headers, body).await?;
        let event = build(ty, conversation, path_fields, &bytes, &meta(&headers)?)?;
        ingress.authorize(&event, presented(&headers))?;
        Ok::<_, IngestError>(event)
    }
    .await;
    match result {
        Ok(event) => respond(ingress.accept(event).await),
        Err(e) => respond(Err(ingress.refuse(e))),
    }
}

async fn message(State(ing): State<Ingress>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Response {
    ingest(ing, EventType::MessageReceived, &id, &[], headers, body).await
}

async fn abort(State(ing): State<Ingress>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Response {
    ingest(ing, EventType::AbortRequested, &id, &[], headers, body).await
}

async fn stop(State(ing): State<Ingress>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Response {
    ingest(ing, EventType::StopRequested, &id, &[], headers, body).await
}

async fn retry(State(ing): State<Ingress>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Response {
    ingest(ing, EventType::RetryRequested, &id, &[], headers, body).await
}

/// The two families of lifecycle callbacks: `tools/{tool_call_id}/{outcome}`
/// and `llm/{step_id}/{outcome}`.
#[derive(Debug, Clone, Copy)]
enum Callback {
    Tool,
    Llm,
}

impl Callback {
    /// The attribute the URL's second segment fills.
    fn key(self) -> &'static str {
        match self {
            Callback::Tool => "tool_call_id",
            Callback::Llm => "step_id",
        }
    }

    /// The family's name in error messages.
    fn name(self) -> &'static str {
        match self {
            Callback::Tool => "tool",
            Callback::Llm => "llm",
        }
    }

    /// The outcomes (the last URL segment) and their event types.
    fn outcomes(self) -> [(&'static str, EventType); 5] {
        use EventType::*;
        let (names, types) = match self {
            Callback::Tool => (
                ["started", "progress", "completed", "failed", "canceled"],
                [ToolStarted, ToolProgress, ToolCompleted, ToolFailed, ToolCanceled],
            ),
            Callback::Llm => (
                ["started", "delta", "completed", "failed", "canceled"],
                [LlmStarted, LlmDelta, LlmCompleted, LlmFailed, LlmCanceled],
            ),
        };
        std::array::from_fn(|i| (names[i], types[i]))
    }

    /// `POST /v1/conversations/{id}/<family>/{key}/{outcome}`.
    async fn handle(
        self,
        ing: Ingress,
        (id, key, outcome): (String, String, String),
        headers: HeaderMap,
        body: Body,
    ) -> Response {
        let outcomes = self.outcomes();
        match outcomes.iter().find(|(name, _)| *name == outcome) {
            Some((_, ty)) => ingest(ing, *ty, &id, &[(self.key(), &key)], headers, body).await,
            None => {
                let allowed = outcomes.map(|(name, _)| name).join(", ");
                let family = self.name();
                let error = IngestError::NotFound(format!("unknown {family} outcome {outcome:?}; one of: {allowed}"));
                respond(Err(ing.refuse(error)))
            }
        }
    }
}

async fn timer(
    State(ing): State<Ingress>,
    Path((id, timer_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    ingest(ing, EventType::TimerFired, &id, &[("timer_id", &timer_id)], headers, body).await
}

/// Decodes a CloudEvent from an HTTP request in either content mode.
pub fn decode_cloudevent(
    ing: &Ingress,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<conv_contracts::Envelope, IngestError> {
    let content_type = header_str(headers, "content-type").unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if media == "application/cloudevents+json" {
        return Ok(binding::decode_structured(body, ing.limits())?);
    }
    if headers.contains_key("ce-specversion") {
        let mut pairs = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let value = value
                .to_str()
                .map_err(|_| Rejection::Malformed { detail: format!("header {name} is not visible ASCII") })?;
            pairs.push((name.as_str(), value));
        }
        return Ok(binding::decode_binary(pairs, body, ing.limits())?);
    }
    let found = if content_type.is_empty() { "none".to_owned() } else { content_type };
    Err(Rejection::UnsupportedContentType { found }.into())
}

async fn event(State(ing): State<Ingress>, headers: HeaderMap, body: Body) -> Response {
    let decoded = async {
        ing.auth.precheck(None, "", presented(&headers))?;
        let bytes = read_body_in_time(&ing, &headers, body).await?;
        let event = decode_cloudevent(&ing, &headers, &bytes)?;
        ing.check_client_event(&event)?;
        ing.authorize(&event, presented(&headers))?;
        Ok(event)
    }
    .await;
    match decoded {
        Ok(event) => respond(ing.accept(event).await),
        Err(e) => respond(Err(ing.refuse(e))),
    }
}

async fn not_found(State(ing): State<Ingress>) -> Response {
    respond(Err(ing.refuse(IngestError::NotFound(
        "no such endpoint; see POST /v1/conversations/{id}/messages|abort|stop|retry and POST /v1/events".into(),
    ))))
}

async fn method_not_allowed() -> Response {
    let body = axum::Json(conv_contracts::api::ErrorBody::new("method_not_allowed", "this endpoint takes POST"));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}

//! The web console at `/`: one page embedded in the binary (no CDN, no
//! build step) that lists conversations, chats with streamed replies,
//! aborts, stops and retries, and shows a conversation's timeline and its
//! output events as they arrive. It reads through this service's own
//! endpoints (the stream with `fetch`, which can send the API key where
//! `EventSource` cannot); what it writes is forwarded to ingress
//! (`CONV_INGRESS_URL`) with the caller's `Authorization`, so the page needs
//! one origin and ingress still decides what is accepted.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use conv_contracts::ConversationId;
use conv_nats::http::error;
use conv_nats::keys::{ApiKeys, KeyError};
use conv_nats::topology::KV_PROJECTIONS;
use serde::Deserialize;
use serde_json::json;

/// The page.
pub const PAGE: &str = include_str!("console/index.html");

/// Inline script and style only, talking to this origin only.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `GET /`.
pub async fn page() -> Response {
    let mut r = axum::response::Html(PAGE).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// Where writes go.
#[derive(Debug, Clone)]
pub struct Forward {
    http: reqwest::Client,
    /// Ingress's base URL, without a trailing slash.
    base: String,
}

impl Forward {
    pub fn new(base: &str) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned() })
    }
}

/// Request headers passed on to ingress.
const FORWARDED: [header::HeaderName; 2] = [header::AUTHORIZATION, header::CONTENT_TYPE];

/// `POST /v1/conversations/{id}/{messages|abort|stop|retry}`: forwarded to
/// ingress as it came (body, `Authorization`, `Content-Type`,
/// `Idempotency-Key`); ingress's answer goes back as it is.
pub async fn forward(
    State(f): State<Arc<Forward>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !matches!(action.as_str(), "messages" | "abort" | "stop" | "retry") {
        return error(StatusCode::NOT_FOUND, "not_found", format!("no such action {action:?}"));
    }
    if let Err(e) = ConversationId::parse(&id) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "bad_conversation_id", format!("{id:?}: {e}"));
    }
    // JSON only: a cross-site form cannot send it without a CORS preflight,
    // which this origin never answers.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
    if !json {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "send application/json");
    }
    let mut request = f.http.post(format!("{}/v1/conversations/{id}/{action}", f.base)).body(body);
    for name in FORWARDED.iter().chain(std::iter::once(&header::HeaderName::from_static("idempotency-key"))) {
        if let Some(v) = headers.get(name) {
            request = request.header(name, v);
        }
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
            let retry_after = answer.headers().get(header::RETRY_AFTER).cloned();
            let bytes = match answer.bytes().await {
                Ok(b) => b,
                Err(e) => return unreachable(&f.base, &e),
            };
            let mut r = Response::new(Body::from(bytes));
            *r.status_mut() = status;
            if let Some(v) = content_type {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            if let Some(v) = retry_after {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        Err(e) => unreachable(&f.base, &e),
    }
}

fn unreachable(base: &str, e: &reqwest::Error) -> Response {
    // The details (the internal address, the error) go to the log, not to clients.
    tracing::warn!(message = "Ingress did not answer a forwarded request (check CONV_INGRESS_URL).", ingress = base, error = %e);
    let mut r = error(StatusCode::BAD_GATEWAY, "ingress_unavailable", "ingress did not answer; try again");
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// What the list needs.
#[derive(Debug, Clone)]
pub struct Lister {
    pub js: async_nats::jetstream::Context,
    pub keys: Arc<ApiKeys>,
    /// The last read of the view headers: (when, (sequence, id) newest first).
    /// Shared by every caller for [`LIST_CACHE`], so open consoles cost one
    /// read per instance, not one each.
    pub cache: Arc<tokio::sync::Mutex<Option<(std::time::Instant, Listed)>>>,
}

/// (stream sequence of the view header, conversation id), newest first.
type Listed = Arc<Vec<(u64, String)>>;

/// How long a read of the view headers serves the list.
pub const LIST_CACHE: Duration = Duration::from_secs(5);

impl Lister {
    pub fn new(js: async_nats::jetstream::Context, keys: Arc<ApiKeys>) -> Self {
        Self { js, keys, cache: Arc::default() }
    }

    /// Every conversation with a view, newest first (cached for [`LIST_CACHE`]).
    async fn all(&self) -> Result<Listed, conv_nats::read::ReadError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, ids)) = cache.as_ref()
            && at.elapsed() < LIST_CACHE
        {
            return Ok(ids.clone());
        }
        let stream = format!("KV_{KV_PROJECTIONS}");
        // One token after the bucket: the view headers (blocks are `<id>.b<k>`).
        let filter = format!("$KV.{KV_PROJECTIONS}.*");
        let stored = conv_nats::read::all(&self.js, &stream, &filter, true).await?;
        let mut ids: Vec<(u64, String)> = stored
            .into_iter()
            .filter(|m| !matches!(conv_nats::headers::header(&m.headers, "KV-Operation"), Some("DEL" | "PURGE")))
            .filter_map(|m| Some((m.seq, m.subject.rsplit('.').next()?.to_owned())))
            .collect();
        ids.sort_unstable_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        let ids = Arc::new(ids);
        *cache = Some((std::time::Instant::now(), ids.clone()));
        Ok(ids)
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// At most this many, most recently changed first (default 100, at most 1 000).
    limit: Option<usize>,
}

/// `GET /v1/conversations?limit=N`: conversations with a stored view, most
/// recently changed first, limited to what the caller's key covers. It reads
/// the latest header of every view (one per conversation, values left out;
/// one read per [`LIST_CACHE`] per instance, whoever asks), so its cost grows
/// with the number of conversations: a console's list, not an API to poll at
/// scale.
pub async fn list(State(l): State<Lister>, Query(q): Query<ListQuery>, headers: HeaderMap) -> Response {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(conv_nats::keys::bearer);
    let prefixes = match l.keys.prefixes(bearer) {
        Ok(p) => p,
        Err(KeyError::Unauthorized(m)) => {
            let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", m);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        Err(KeyError::Forbidden(m)) => return error(StatusCode::FORBIDDEN, "forbidden", m),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let all = match l.all().await {
        Ok(ids) => ids,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    };
    let ids: Vec<&(u64, String)> = all
        .iter()
        .filter(|(_, id)| prefixes.as_ref().is_none_or(|p| p.iter().any(|p| id.starts_with(p.as_str()))))
        .collect();
    let more = ids.len() > limit;
    let conversations: Vec<_> = ids.into_iter().take(limit).map(|(_, id)| json!({"conversation_id": id})).collect();
    axum::Json(json!({"conversations": conversations, "more": more})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_whole_and_needs_nothing_from_elsewhere() {
        assert!(PAGE.starts_with("<!doctype html>"));
        assert!(PAGE.trim_end().ends_with("</html>"));
        for outside in ["http://", "https://", "//cdn", "<script src", "<link "] {
            assert!(!PAGE.contains(outside), "the page loads {outside}");
        }
        // The events it folds are the ones the contract names.
        use conv_contracts::EventType as T;
        for event in [
            T::OutMessageAppended,
            T::OutMessageDelta,
            T::OutMessageReset,
            T::OutMessageFinished,
            T::OutRunStatus,
            T::OutToolCalled,
            T::OutToolResult,
        ] {
            assert!(PAGE.contains(event.as_str()), "{event}");
        }
    }
}

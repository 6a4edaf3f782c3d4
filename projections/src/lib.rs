//! # conv-projections
//!
//! The read side of conv, on `CONV_PROJECTIONS_ADDR` (127.0.0.1:8081):
//!
//! * **timeline** — view workers ([`views`]) own `CONV_OUT` partitions like
//!   the runtime owns `CONV_IN` ones, fold each conversation's output in
//!   position order into an in-memory view and write it in batches to the
//!   `conv_projections` bucket ([`conv_store::views`]); `GET
//!   /v1/conversations/{id}/timeline` reads it from any instance. The view
//!   is the fold of `CONV_OUT` ([`conv_core::timeline::fold`]); `convctl
//!   projections verify` checks exactly that (`conv_store::views::verify`).
//! * **context** — `GET /v1/conversations/{id}/context`: the LLM thread (role /
//!   content messages, an aborted tool call with its canceled result), rebuilt
//!   from the runtime's snapshot and journal tail with the same function the
//!   reducer uses for `llm.requested`.
//! * **stream** — `GET /v1/conversations/{id}/stream`: Server-Sent Events
//!   from one subscription per conversation per instance shared by every
//!   reader ([`hub`]): output in position order and the reply's text at
//!   token rate from the live lane; `Last-Event-ID` resumes exactly.

pub mod admin;
pub mod console;
pub mod hub;
pub mod metrics;
pub mod options;
pub mod outbound;
pub mod views;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use conv_contracts::ConversationId;
use conv_contracts::subject::STREAM_OUT;
use conv_nats::service::{self, Identity, Settings};
use conv_nats::topology::{KV_LEASES, KV_PROJECTIONS};
use prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use conv_store::views as store;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-projections",
    about: "Projections of conv: timeline, LLM context and the resumable client stream.",
    addr_env: "CONV_PROJECTIONS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081),
    options_help: concat!(
        "  CONV_OUTBOUND_WEBHOOK_URL       deliver finished assistant messages to this URL (channel adapter)\n",
        "  CONV_OUTBOUND_WEBHOOK_RETRIES   delivery retries with backoff (default 5)\n",
        "  CONV_OUTBOUND_WEBHOOK_TIMEOUT_MS  timeout of one delivery (default 5000)\n",
        "  CONV_PROJECTIONS_INSTANCE       instance id among view owners (default: a fresh UUID)\n",
        "  CONV_PROJECTIONS_HEARTBEAT_MS   view partition lease refresh (default 500)\n",
        "  CONV_PROJECTIONS_FLUSH_MS       a changed view is written after this delay (default 200)\n",
        "  CONV_SSE_BUFFER                 events buffered per conversation; slower readers are closed (default 4096)\n",
        "  CONV_SSE_HEARTBEAT_MS           heartbeat comment on idle streams (default 15000)\n",
        "  CONV_SSE_LINGER_MS              subscriptions outlive a conversation's last reader (default 10000)\n",
        "  CONV_INGRESS_API_KEYS           client keys that may read (as at ingress); none: open, loopback only\n",
        "  CONV_INGRESS_URL                ingress, where the console's writes are forwarded (default http://127.0.0.1:8080)\n",
    ),
};

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings<options::ProjectionsOptions>;

/// Why the service stopped with an error.
pub type Error = service::ServiceError;

/// What the HTTP handlers need once the topology exists.
#[derive(Debug)]
struct Ready {
    store: kv::Store,
    hub: hub::Hub,
}

#[derive(Debug, Clone)]
struct AppState {
    js: async_nats::jetstream::Context,
    ready: Arc<OnceLock<Ready>>,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let keys = conv_nats::keys::ApiKeys::new(&config.options.api_keys).map_err(|e| Error::Refused(e.0))?;
    let addr = config.http_addr();
    if keys.is_open() && !addr.ip().is_loopback() {
        return Err(Error::Refused(format!(
            "refusing to serve conversations on {addr} without client keys: set CONV_INGRESS_API_KEYS, or listen on a loopback address"
        )));
    }
    let registry = Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let o = &config.options;
    let outbound =
        outbound::Outbound::new(o, metrics.dispatch_failures.clone()).map_err(Error::part("outbound webhook"))?;
    let ready = Arc::new(OnceLock::new());
    let keys = Arc::new(keys);
    let forward =
        Arc::new(console::Forward::new(&o.ingress_url).map_err(Error::part("console forwarding to ingress"))?);
    let admin = admin::Admin::new(&config.nats, &config.topology, addr, shutdown.clone());
    let (running, ()) = service::Running::start_with(&IDENTITY, &config, registry, &shutdown, |booted| {
        let writes = Router::new()
            .route("/v1/conversations/{id}/{action}", axum::routing::post(console::forward))
            .route_layer(axum::middleware::from_fn_with_state(keys.clone(), authorize))
            .with_state(forward);
        let list = Router::new()
            .route("/v1/conversations", get(console::list))
            .with_state(console::Lister::new(booted.js.clone(), keys.clone()));
        let router = Router::new()
            .route("/v1/conversations/{id}/timeline", get(timeline))
            .route("/v1/conversations/{id}/context", get(context))
            .route("/v1/conversations/{id}/stream", get(stream))
            .route_layer(axum::middleware::from_fn_with_state(keys, authorize))
            .with_state(AppState { js: booted.js.clone(), ready: ready.clone() })
            .merge(writes)
            .merge(list)
            .merge(admin.router())
            .route("/", get(console::page));
        (router, ())
    })
    .await?;
    let booted = &running.booted;

    let attached = service::wait_for(&shutdown, || async {
        let store = booted.js.get_key_value(KV_PROJECTIONS).await.ok()?;
        let leases = booted.js.get_key_value(KV_LEASES).await.ok()?;
        booted.js.get_stream_no_info(STREAM_OUT).await.ok()?;
        Some((store, leases))
    })
    .await;
    if let Some((store, leases)) = attached {
        let hub = hub::Hub::new(
            booted.client.clone(),
            booted.js.clone(),
            store.clone(),
            metrics.clone(),
            hub::HubConfig {
                buffer: o.sse_buffer,
                heartbeat: Duration::from_millis(o.sse_heartbeat_ms),
                linger: Duration::from_millis(o.sse_linger_ms),
                ..Default::default()
            },
            shutdown.clone(),
        );
        let _ = ready.set(Ready { store: store.clone(), hub });
        let instance = conv_nats::ownership::instance_id(&o.instance);
        tracing::info!(message = "Projections instance up.", instance = %instance);
        let ownership = conv_nats::ownership::OwnershipConfig::of(
            &config.topology,
            o.heartbeat_ms,
            "views.",
            metrics.ownership.clone(),
        );
        let shared = Arc::new(views::Shared {
            js: booted.js.clone(),
            max_value: store::max_value(&booted.js),
            store,
            outbound,
            metrics,
            tracer: booted.tracer.clone(),
            config: views::ViewsConfig { flush_delay: Duration::from_millis(o.flush_ms), ..Default::default() },
        });
        let workers = move |partition, stop, _lease| views::start(&shared, partition, stop);
        conv_nats::ownership::run(instance, leases, Arc::new(workers), ownership, shutdown.clone()).await;
    }
    running.stop().await
}

/// Why a request is answered with an error: `{"error": {"code", "message"}}`.
#[derive(Debug)]
enum ApiError {
    BadId(String),
    BadLastEventId,
    NotFound(String),
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadId(m) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_conversation_id", m),
            ApiError::BadLastEventId => (
                StatusCode::BAD_REQUEST,
                "bad_last_event_id",
                "Last-Event-ID must be an id this stream sent: <position> or <position>:<entry>:<offset>".to_owned(),
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        };
        let mut r = conv_nats::http::error(status, code, message);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// Reading a conversation takes a client key that covers it (the same keys
/// as ingress's; none configured: open, and then only on loopback).
async fn authorize(
    State(keys): State<Arc<conv_nats::keys::ApiKeys>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if keys.is_open() {
        return next.run(request).await;
    }
    let conversation = request.uri().path().split('/').nth(3).unwrap_or_default().to_owned();
    match keys.check(&conversation, conv_nats::http::bearer(request.headers())) {
        Ok(_) => next.run(request).await,
        Err(e) => conv_nats::http::refused(e),
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

fn parse_id(id: &str) -> Result<ConversationId, ApiError> {
    ConversationId::parse(id).map_err(|e| ApiError::BadId(format!("{id:?}: {e}")))
}

fn ready(app: &AppState) -> Result<&Ready, ApiError> {
    app.ready.get().ok_or_else(|| unavailable("the topology is not there yet (run `convctl setup`)"))
}

async fn timeline(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let conv = parse_id(&id)?;
    match store::read(&ready(&app)?.store, conv.as_str()).await {
        Ok(Some(view)) => Ok(axum::Json(view).into_response()),
        Ok(None) => Err(ApiError::NotFound(format!("no conversation {id:?}"))),
        Err(e) => Err(unavailable(e)),
    }
}

async fn context(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let conv = parse_id(&id)?;
    let current = conv_store::current(&app.js, &conv).await.map_err(unavailable)?;
    let state = &current.snapshot.state;
    if state.version == 0 {
        return Err(ApiError::NotFound(format!("no conversation {id:?}")));
    }
    Ok(axum::Json(json!({
        "conversation_id": id,
        "version": state.version,
        "messages": conv_core::context::of(state),
    }))
    .into_response())
}

async fn stream(State(app): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let conv = parse_id(&id)?;
    let ready = ready(&app)?;
    let cursor = match headers.get("last-event-id") {
        None => hub::Cursor::default(),
        Some(v) => v.to_str().ok().and_then(hub::Cursor::parse).ok_or(ApiError::BadLastEventId)?,
    };
    let body = ready.hub.stream(&conv, cursor).await.map_err(unavailable)?;
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .map_err(unavailable)
}

//! # conv-projections
//!
//! The read side of conv, on `CONV_PROJECTIONS_ADDR` (127.0.0.1:8081):
//!
//! * **timeline** — the durable `projections` consumer folds every
//!   `conv.out.*` event into a per-conversation view ([`timeline`]) stored in
//!   the `conv_projections` bucket (revision-checked writes, so instances can
//!   share the consumer); `GET /v1/conversations/{id}/timeline` reads it.
//!   The view is rebuildable: it is a fold of `CONV_OUT`.
//! * **context** — `GET /v1/conversations/{id}/context`: the LLM thread (role /
//!   content messages, an aborted tool call with its canceled result), rebuilt
//!   from the runtime's snapshot and journal tail with the same function the
//!   reducer uses for `llm.requested`.
//! * **stream** — `GET /v1/conversations/{id}/stream`: Server-Sent Events
//!   straight from `CONV_OUT` in order; every event's `id:` is its `CONV_OUT`
//!   sequence, so `Last-Event-ID` resumes exactly after it, however long the
//!   client was away. Each reader is an ordered consumer; disconnecting stops
//!   only the reader.

pub mod outbound;
pub mod timeline;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use conv_contracts::subject::STREAM_OUT;
use conv_contracts::{ConversationId, Envelope, Limits, binding};
use conv_nats::consume::{self, HandlerError, Options};
use conv_nats::service::{self, BootError, Identity, ServeError, Settings};
use conv_nats::topology::{KV_PROJECTIONS, PROJECTIONS_CONSUMER};
use futures::StreamExt;
use prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::timeline::Timeline;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-projections",
    about: "Projections of conv: timeline, LLM context and the resumable client stream.",
    addr_env: "CONV_PROJECTIONS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081),
    options_help: concat!(
        "  CONV_OUTBOUND_WEBHOOK_URL       deliver finished assistant messages to this URL (channel adapter)\n",
        "  CONV_OUTBOUND_WEBHOOK_RETRIES   delivery retries with backoff (default 5)\n",
    ),
};

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings<outbound::OutboundOptions>;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("outbound webhook: {0}")]
    Outbound(String),
}

#[derive(Debug, Clone)]
struct AppState {
    js: async_nats::jetstream::Context,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let booted = service::boot(&IDENTITY, &config, Registry::new()).await?;
    let outbound = outbound::Outbound::new(&config.options).map_err(|e| Error::Outbound(e.to_string()))?;
    let folder = tokio::spawn(fold(booted.js.clone(), outbound, shutdown.clone()));
    let router = Router::new()
        .route("/v1/conversations/{id}/timeline", get(timeline))
        .route("/v1/conversations/{id}/context", get(context))
        .route("/v1/conversations/{id}/stream", get(stream))
        .with_state(AppState { js: booted.js.clone() })
        .merge(booted.health.router());
    let served = service::serve(config.http_addr(), router, shutdown.clone(), None).await;
    shutdown.cancel();
    let _ = folder.await;
    service::flush(&booted.client).await;
    served?;
    Ok(())
}

/// Folds `CONV_OUT` into the timeline views until shutdown (waiting for the
/// topology first).
async fn fold(js: async_nats::jetstream::Context, outbound: Option<outbound::Outbound>, shutdown: CancellationToken) {
    let attached = service::wait_for(&shutdown, || async {
        let store = js.get_key_value(KV_PROJECTIONS).await.ok()?;
        let stream = js.get_stream_no_info(STREAM_OUT).await.ok()?;
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(PROJECTIONS_CONSUMER).await.ok()?;
        Some((store, consumer.messages().await.ok()?))
    })
    .await;
    let Some((store, messages)) = attached else { return };
    consume::run_validated(
        messages,
        |event: Envelope, message: async_nats::jetstream::Message| {
            let store = store.clone();
            let outbound = outbound.clone();
            async move {
                let seq = message.info().map(|i| i.stream_sequence).unwrap_or_default();
                update(&store, &event, seq, outbound.as_ref()).await
            }
        },
        Options::default(),
        Limits::default(),
        shutdown,
    )
    .await;
}

/// Folds one event into its conversation's view with a revision-checked write.
async fn update(
    store: &kv::Store,
    event: &Envelope,
    seq: u64,
    outbound: Option<&outbound::Outbound>,
) -> Result<(), HandlerError> {
    let key = event.conversation_id.as_str();
    for _ in 0..5 {
        let entry = store.entry(key).await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        let (mut view, revision) = match &entry {
            Some(e) => {
                (serde_json::from_slice::<Timeline>(&e.value).unwrap_or_else(|_| Timeline::new(key)), Some(e.revision))
            }
            None => (Timeline::new(key), None),
        };
        if !view.apply(seq, &event.data) {
            return Ok(()); // a repeat
        }
        // The channel adapter: a finished assistant message goes out before
        // the view records it, so a failed write means another delivery
        // (deduped by the receiver on `Idempotency-Key`), never none.
        if let (Some(out), conv_contracts::Payload::OutMessageFinished(f)) = (outbound, &event.data)
            && view
                .entries
                .iter()
                .any(|e| e.id == f.entry_id && e.role == conv_contracts::payload::EntryRole::Assistant)
        {
            out.deliver(event, f).await;
        }
        let bytes = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
        let written = match revision {
            Some(r) => store.update(key, bytes, r).await.map(drop).map_err(|e| e.to_string()),
            None => store.create(key, bytes).await.map(drop).map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => return Ok(()),
            Err(_) => continue, // someone else wrote first: read again
        }
    }
    Err(HandlerError::Transient(format!("could not update the view of {key}")))
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"code": "not_found", "message": what}}))).into_response()
}

fn bad_id(id: &str, e: impl std::fmt::Display) -> Response {
    let body = json!({"error": {"code": "bad_conversation_id", "message": format!("{id:?}: {e}")}});
    (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    let body = json!({"error": {"code": "unavailable", "message": e.to_string()}});
    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], axum::Json(body)).into_response()
}

async fn timeline(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    if let Err(e) = ConversationId::parse(&id) {
        return bad_id(&id, e);
    }
    let store = match app.js.get_key_value(KV_PROJECTIONS).await {
        Ok(s) => s,
        Err(e) => return unavailable(e),
    };
    match store.get(&id).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<Timeline>(&bytes) {
            Ok(view) => axum::Json(view).into_response(),
            Err(e) => unavailable(format!("unreadable view: {e}")),
        },
        Ok(None) => not_found(&format!("no conversation {id:?}")),
        Err(e) => unavailable(e),
    }
}

async fn context(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    let conv = match ConversationId::parse(&id) {
        Ok(c) => c,
        Err(e) => return bad_id(&id, e),
    };
    let snapshots = match conv_runtime::snapshot::Snapshots::open(&app.js).await {
        Ok(s) => s,
        Err(e) => return unavailable(e),
    };
    let from = match snapshots.load(conv.as_str()).await {
        Ok((snapshot, _)) => snapshot,
        Err(e) => return unavailable(e),
    };
    match conv_runtime::journal::rebuild(&app.js, &conv, from).await {
        Ok(r) if r.snapshot.state.version == 0 => not_found(&format!("no conversation {id:?}")),
        Ok(r) => axum::Json(json!({
            "conversation_id": id,
            "version": r.snapshot.state.version,
            "messages": conv_runtime::reducer::context(&r.snapshot.state),
        }))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn stream(State(app): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(e) = ConversationId::parse(&id) {
        return bad_id(&id, e);
    }
    let after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let deliver = match after {
        Some(seq) => DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
        None => DeliverPolicy::All,
    };
    let consumer = async {
        let stream = app.js.get_stream_no_info(STREAM_OUT).await.map_err(|e| e.to_string())?;
        let c = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("conv.out.*.{id}"),
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        c.messages().await.map_err(|e| e.to_string())
    };
    let messages = match consumer.await {
        Ok(m) => m,
        Err(e) => return unavailable(e),
    };
    let events = messages.filter_map(|m| async move {
        let m = m.ok()?;
        let seq = m.info().ok()?.stream_sequence;
        let event = conv_nats::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, Limits::default()).ok()?;
        let data = serde_json::to_string(&binding::to_structured_json(&event)).ok()?;
        Some(Ok::<_, Infallible>(Event::default().id(seq.to_string()).event(event.event_type().as_str()).data(data)))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Rebuilds a conversation's timeline from scratch (a fold of all its
/// `CONV_OUT` events) and stores it, unless the stored view is already
/// further along. Returns the view and the number of events folded.
pub async fn rebuild(
    js: &async_nats::jetstream::Context,
    conversation: &ConversationId,
) -> Result<(Timeline, usize), String> {
    let store = js.get_key_value(KV_PROJECTIONS).await.map_err(|e| e.to_string())?;
    let stored = conv_nats::read::all(js, STREAM_OUT, &format!("conv.out.*.{conversation}"), false).await?;
    let mut view = Timeline::new(conversation.as_str());
    let mut folded = 0;
    for m in &stored {
        if let Ok(e) = conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default())
            && view.apply(m.seq, &e.data)
        {
            folded += 1;
        }
    }
    let bytes = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
    for _ in 0..5 {
        let entry = store.entry(conversation.as_str()).await.map_err(|e| e.to_string())?;
        let written = match &entry {
            Some(e) => {
                let current = serde_json::from_slice::<Timeline>(&e.value).map(|t| t.last_seq).unwrap_or(0);
                if current > view.last_seq {
                    return Ok((view, folded)); // the live fold is ahead: keep it
                }
                store
                    .update(conversation.as_str(), bytes.clone(), e.revision)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            None => store.create(conversation.as_str(), bytes.clone()).await.map(drop).map_err(|e| e.to_string()),
        };
        if written.is_ok() {
            return Ok((view, folded));
        }
    }
    Err(format!("the view of {conversation} kept changing; try again"))
}

/// Every conversation with output in `CONV_OUT`.
pub async fn conversations(js: &async_nats::jetstream::Context) -> Result<Vec<ConversationId>, String> {
    let mut ids: Vec<ConversationId> = conv_nats::read::all(js, STREAM_OUT, "", true)
        .await?
        .iter()
        .filter_map(|m| m.header("ce-subject").and_then(|s| ConversationId::parse(s).ok()))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

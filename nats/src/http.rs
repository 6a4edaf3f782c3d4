//! The HTTP server of every service: axum on hyper, with the limits a
//! listener open to clients needs.
//!
//! - **Header read timeout** (`CONV_HTTP_HEADER_TIMEOUT_MS`, 30 s): a
//!   connection that has not sent a complete request head within this time
//!   is closed — a slowloris client, and an idle keep-alive connection
//!   between requests, alike. A response being streamed (SSE) is not idle.
//! - **Connection limit** (`CONV_HTTP_MAX_CONNECTIONS`, 4 096): past it new
//!   connections are closed at once, so a flood cannot exhaust file
//!   descriptors and starve every request.
//! - **URI and header size**: a request line over 8 KiB gets `414`, headers
//!   over 64 KiB get `431`, each with the JSON error body
//!   (`{"error": {"code", "message"}}`) like every other error — up to
//!   hyper's own parser limits (about 400 KB of head, 100 headers), past
//!   which hyper answers a bare `431` itself.
//!
//! Shutdown stops accepting, lets open requests finish (at most 10 s) and
//! closes idle connections at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::service::ServeError;

/// Longest request target (path and query) taken.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header bytes a request may send.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Limits of the HTTP listener (`[service]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// A request head must arrive within this (also between keep-alive
    /// requests). Files of older versions call it `header_read_timeout_ms`.
    #[serde(alias = "header_read_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { header_timeout_ms: 30_000, max_connections: 4096 }
    }
}

impl HttpLimits {
    pub fn validate(&self) -> Result<(), crate::service::Invalid> {
        if self.header_timeout_ms == 0 || self.max_connections == 0 {
            return Err("service.header_timeout_ms and service.max_connections must be positive".into());
        }
        Ok(())
    }
}

/// The bearer token of a request's `Authorization` header, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(crate::keys::bearer)
}

/// The answer to a client key that does not cover a request: 401 with
/// `WWW-Authenticate: Bearer`, or 403.
pub fn refused(e: crate::keys::KeyError) -> Response {
    match e {
        crate::keys::KeyError::Unauthorized(m) => {
            let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", m);
            r.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
            r
        }
        crate::keys::KeyError::Forbidden(m) => error(StatusCode::FORBIDDEN, "forbidden", m),
    }
}

/// An error answer with the JSON error body of every endpoint
/// ([`conv_contracts::api::ErrorBody`]).
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, axum::Json(conv_contracts::api::ErrorBody::new(code, message))).into_response()
}

/// Refuses oversized request lines and headers with the JSON error body.
async fn guard(request: Request, next: Next) -> Response {
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {target} bytes; at most {MAX_URI_BYTES}"),
        );
    }
    let headers: usize = request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if headers > MAX_HEADER_BYTES {
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request headers take {headers} bytes; at most {MAX_HEADER_BYTES}"),
        );
    }
    next.run(request).await
}

/// Binds `addr` (reporting the actual address through `bound`) and serves
/// `router` with `limits` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(
        message = "Listening.",
        addr = %local,
        header_timeout_ms = limits.header_timeout_ms,
        max_connections = limits.max_connections
    );
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let router = router.layer(axum::middleware::from_fn(guard));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.header_timeout_ms));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: back off a moment.
                    tracing::warn!(message = "Accept failed.", %error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    message = "Connection limit reached; closing new connections.",
                    refused,
                    max = limits.max_connections
                );
            }
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(message = "Cannot set TCP_NODELAY.", %peer, %error);
        }
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(message = "Connection ended with an error.", %peer, %error);
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!(message = "Open requests did not finish within 10 s of shutdown; closing them.");
    }
    Ok(())
}

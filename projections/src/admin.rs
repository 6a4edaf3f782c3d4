//! The console's admin pages: a conversation's cause tree (with its audit
//! and dead-letter entries), the dead letters with re-drive, and the
//! launch-readiness report — the reads of `convctl` (`conv_admin`), served
//! over HTTP.
//!
//! **The admin credential is the NATS `admin` user's.** Projections' own
//! NATS user may read none of `CONV_EFFECT`, `CONV_AUDIT` or `CONV_DLQ` and
//! may re-drive nothing, and it is not given more: an operator signs in with
//! the admin user and password (`POST /v1/admin/session`), projections
//! opens a NATS connection *as that user* and keeps it for the session
//! (15 minutes idle at most), and every admin request runs through it. NATS
//! checks the password and decides what is allowed; projections stores no
//! admin secret. A user that cannot read the dead letters (a service user)
//! is refused at sign-in (its read of `CONV_DLQ` is not answered). On a NATS server that takes anyone (no
//! authorization), sign-in is allowed only while projections listens on a
//! loopback address — the rule client keys follow.
//!
//! Sessions are bearer tokens (256 random bits) sent as
//! `Authorization: Bearer <token>` on `/v1/admin/*`; failed sign-ins are
//! slowed down and, past 10 a minute on an instance, refused for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use conv_admin::readiness::{self, Kept, Thresholds};
use conv_nats::NatsConfig;
use conv_nats::secret::Secret;
use serde::Deserialize;
use serde_json::json;

/// A session ends after this long without a request.
const IDLE: Duration = Duration::from_secs(15 * 60);
/// Sessions one instance keeps (the oldest goes first).
const MAX_SESSIONS: usize = 32;
/// Failed sign-ins per minute an instance takes before refusing them.
const MAX_FAILURES_PER_MIN: usize = 10;
/// How long a failed sign-in waits before it is answered.
const FAILURE_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Session {
    user: String,
    js: async_nats::jetstream::Context,
    used: Instant,
    /// The previous readiness report: the window of the next one.
    previous: Option<Kept>,
}

/// The admin pages' state, cheap to clone.
#[derive(Debug, Clone)]
pub struct Admin {
    nats: NatsConfig,
    topology: conv_nats::TopologyConfig,
    /// Projections listens on loopback only.
    loopback: bool,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    failures: Arc<Mutex<Vec<Instant>>>,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message.into()}}))).into_response()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Admin {
    pub fn new(nats: &NatsConfig, topology: &conv_nats::TopologyConfig, addr: std::net::SocketAddr) -> Self {
        Admin {
            nats: nats.clone(),
            topology: topology.clone(),
            loopback: addr.ip().is_loopback(),
            sessions: Arc::default(),
            failures: Arc::default(),
        }
    }

    /// `/v1/admin/*`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/admin/session", post(sign_in).delete(sign_out).get(whoami))
            .route("/v1/admin/trace/{target}", get(trace))
            .route("/v1/admin/dlq", get(dead_letters))
            .route("/v1/admin/dlq/{id}", get(dead_letter))
            .route("/v1/admin/dlq/{id}/redrive", post(redrive))
            .route("/v1/admin/readiness", get(readiness))
            .with_state(self)
    }

    /// The session the request's bearer token names (and marks it used).
    fn session(&self, headers: &HeaderMap) -> Result<(String, async_nats::jetstream::Context), Denied> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(conv_nats::keys::bearer)
            .ok_or(Denied::NoSession)?;
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| s.used.elapsed() < IDLE);
        match sessions.get_mut(token) {
            Some(s) => {
                s.used = Instant::now();
                Ok((s.user.clone(), s.js.clone()))
            }
            None => Err(Denied::Ended),
        }
    }

    /// Counts a failed sign-in; `true` when too many failed lately.
    fn throttled(&self, failed: bool) -> bool {
        let mut failures = lock(&self.failures);
        failures.retain(|t| t.elapsed() < Duration::from_secs(60));
        if failed {
            failures.push(Instant::now());
        }
        failures.len() >= MAX_FAILURES_PER_MIN
    }
}

/// Why an admin request has no session.
#[derive(Debug)]
enum Denied {
    NoSession,
    Ended,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let message = match self {
            Denied::NoSession => "sign in as the NATS admin user first",
            Denied::Ended => "the session ended; sign in again",
        };
        error(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

#[derive(Debug, Deserialize)]
struct SignIn {
    user: String,
    password: String,
}

/// `POST /v1/admin/session` `{"user", "password"}` → `{"token", "user"}`.
async fn sign_in(
    State(admin): State<Admin>,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(creds)) = body else {
        return error(StatusCode::BAD_REQUEST, "bad_request", r#"send {"user": "admin", "password": "…"} as JSON"#);
    };
    if admin.throttled(false) {
        return error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many failed sign-ins; wait a minute");
    }
    let refuse = async |status: StatusCode, code: &str, message: String| {
        admin.throttled(true);
        tokio::time::sleep(FAILURE_DELAY).await;
        error(status, code, message)
    };
    if creds.user.trim().is_empty() || creds.password.is_empty() {
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized", "user and password are required".into()).await;
    }
    let config = NatsConfig {
        user: creds.user.clone(),
        password: Secret::new(creds.password.as_str()),
        creds: String::new(),
        ..admin.nats.clone()
    };
    let client = match conv_nats::connect(&config, "conv-projections-admin").await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(message = "Admin sign-in refused by NATS.", user = %creds.user);
            // NATS says why (authorization violation, or unreachable); the URL is redacted.
            return refuse(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()).await;
        }
    };
    if !client.server_info().auth_required && !admin.loopback {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "NATS takes anyone (no authorization): admin sign-in is allowed only while projections listens on loopback"
                .into(),
        )
        .await;
    }
    // Only a user that may read the dead letters is an admin here: a
    // service user's request is dropped by NATS (a permissions violation,
    // answered by nothing), the admin's gets JetStream's answer.
    let probe = client
        .request(format!("$JS.API.STREAM.MSG.GET.{}", conv_contracts::subject::STREAM_DLQ), r#"{"seq":1}"#.into());
    if !matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Ok(_))) {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("user {} may not read the dead letters; sign in as the NATS admin user", creds.user),
        )
        .await;
    }
    let js = conv_nats::jetstream(client, &config);
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let mut sessions = lock(&admin.sessions);
    sessions.retain(|_, s| s.used.elapsed() < IDLE);
    while sessions.len() >= MAX_SESSIONS {
        let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.used).map(|(t, _)| t.clone()) else { break };
        sessions.remove(&oldest);
    }
    sessions.insert(token.clone(), Session { user: creds.user.clone(), js, used: Instant::now(), previous: None });
    tracing::info!(message = "Admin signed in.", user = %creds.user);
    (StatusCode::CREATED, Json(json!({"token": token, "user": creds.user, "idle_timeout_secs": IDLE.as_secs()})))
        .into_response()
}

/// `GET /v1/admin/session`: who the token belongs to.
async fn whoami(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    match admin.session(&headers) {
        Ok((user, _)) => Json(json!({"user": user})).into_response(),
        Err(r) => r.into_response(),
    }
}

/// `DELETE /v1/admin/session`: signs out (closes the NATS connection).
async fn sign_out(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(token) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(conv_nats::keys::bearer)
    {
        lock(&admin.sessions).remove(token);
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Debug, Deserialize)]
struct TraceQuery {
    conversation: Option<String>,
}

/// `GET /v1/admin/trace/{conversation | event id}[?conversation=]`: the cause
/// tree (`convctl trace --json`).
async fn trace(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(target): Path<String>,
    Query(q): Query<TraceQuery>,
) -> Response {
    let (_, js) = match admin.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    use conv_admin::trace::{self, Error};
    let target = match trace::target(&target, q.conversation.as_deref()) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, "bad_target", e.to_string()),
    };
    match trace::trace(&js, &target).await {
        Ok(t) => Json(t).into_response(),
        Err(Error::NotFound(m)) => error(StatusCode::NOT_FOUND, "not_found", m),
        Err(Error::Target(m)) => error(StatusCode::UNPROCESSABLE_ENTITY, "bad_target", m),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    }
}

fn dlq_error(e: conv_nats::dlq::Error) -> Response {
    use conv_nats::dlq::Error as E;
    let status = match &e {
        E::NotFound(_) | E::OriginalGone { .. } => StatusCode::NOT_FOUND,
        E::Invalid { .. } | E::SubjectMismatch { .. } => StatusCode::CONFLICT,
        E::JetStream(_) | E::Append { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    let code = match &e {
        E::NotFound(_) => "not_found",
        E::OriginalGone { .. } => "original_gone",
        E::Invalid { .. } => "not_redrivable",
        E::SubjectMismatch { .. } => "subject_mismatch",
        E::JetStream(_) | E::Append { .. } => "unavailable",
    };
    error(status, code, e.to_string())
}

/// `GET /v1/admin/dlq`: every dead letter (`convctl dlq list --json`).
async fn dead_letters(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let (_, js) = match admin.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    match conv_nats::dlq::list(&js).await {
        Ok(all) => Json(json!({"dead_letters": all})).into_response(),
        Err(e) => dlq_error(e),
    }
}

/// `GET /v1/admin/dlq/{id}`: one dead letter with its original.
async fn dead_letter(State(admin): State<Admin>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let (_, js) = match admin.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    match conv_nats::dlq::get(&js, id).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => dlq_error(e),
    }
}

#[derive(Debug, Default, Deserialize)]
struct RedriveBody {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
}

/// `POST /v1/admin/dlq/{id}/redrive` `{"dry_run"?, "force"?}`: re-publishes
/// the original through the validated path, audited, as `convctl dlq
/// redrive` does.
async fn redrive(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: Option<Json<RedriveBody>>,
) -> Response {
    let (user, js) = match admin.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let RedriveBody { dry_run, force } = body.map(|Json(b)| b).unwrap_or_default();
    match conv_nats::dlq::redrive(&js, id, dry_run, force, admin.nats.request_timeout()).await {
        Ok(done) => {
            tracing::info!(message = "Dead letter re-driven from the console.", dlq_id = id, %user, dry_run);
            Json(done).into_response()
        }
        Err(e) => dlq_error(e),
    }
}

/// `GET /v1/admin/readiness`: the report of `convctl readiness --json`,
/// judged over the window since this session's previous report.
async fn readiness(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(conv_nats::keys::bearer);
    let (_, js) = match admin.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let previous = token.and_then(|t| lock(&admin.sessions).get(t).and_then(|s| s.previous.clone()));
    let url = admin.nats.display_url();
    let report =
        readiness::report(Ok((&js, &admin.topology)), &url, &Thresholds::default(), true, previous.as_ref()).await;
    if let Some(t) = token
        && let Some(s) = lock(&admin.sessions).get_mut(t)
    {
        s.previous = Some(Kept::of(&report, &url));
    }
    Json(report).into_response()
}

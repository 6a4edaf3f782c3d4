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
//! checks the password and decides what is allowed; projections writes no
//! admin secret anywhere (the session's client keeps it in memory to
//! reconnect, and is drained when the session ends). A user that cannot read
//! the dead letters (a service user) is refused at sign-in (its read of
//! `CONV_DLQ` is not answered), with the same answer as a wrong password.
//! On a NATS server that takes anyone (no authorization), sign-in is allowed
//! only while projections listens on a loopback address and the request
//! names a loopback host (no DNS rebinding) — the rule client keys follow.
//!
//! Sessions are bearer tokens (244 random bits, two UUIDv4) sent as
//! `Authorization: Bearer <token>` on `/v1/admin/*`, held by the instance
//! that made them (behind a load balancer, keep an admin on one instance).
//! Sign-ins are taken one at a time; each failure is answered after half a
//! second, and past 10 attempts that failed in a minute the instance refuses
//! sign-ins for the rest of that minute (`convctl` still works).

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
use conv_nats::http::{bearer as session_token, error};
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
    /// The report readiness is judged against (DLQ growth, latencies): at
    /// least [`BASELINE_AGE`] old once there is one that old.
    baseline: Option<(Instant, Kept)>,
}

/// A readiness baseline is replaced once it is this old, so the window a
/// report is judged over is 5–10 minutes (the console polls every 10 s).
const BASELINE_AGE: Duration = Duration::from_secs(5 * 60);

/// The admin pages' state, cheap to clone.
#[derive(Debug, Clone)]
pub struct Admin {
    nats: NatsConfig,
    topology: conv_nats::TopologyConfig,
    /// Projections listens on loopback only.
    loopback: bool,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    failures: Arc<Mutex<Vec<Instant>>>,
    /// Sign-ins one at a time (no burst of parallel guesses).
    signing_in: Arc<tokio::sync::Semaphore>,
}

/// Ends sessions: their NATS connections are drained (no reconnects).
fn end(sessions: impl IntoIterator<Item = Session>) {
    for s in sessions {
        let client = s.js.client();
        tokio::spawn(async move {
            let _ = client.drain().await;
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Admin {
    /// The admin pages; sessions idle for [`IDLE`] end within a minute,
    /// all of them at `shutdown`.
    pub fn new(
        nats: &NatsConfig,
        topology: &conv_nats::TopologyConfig,
        addr: std::net::SocketAddr,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let admin = Admin {
            nats: nats.clone(),
            topology: topology.clone(),
            loopback: addr.ip().is_loopback(),
            sessions: Arc::default(),
            failures: Arc::default(),
            signing_in: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let sessions = admin.sessions.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = sweep.tick() => {
                        let mut all = lock(&sessions);
                        let idle: Vec<String> =
                            all.iter().filter(|(_, s)| s.used.elapsed() >= IDLE).map(|(t, _)| t.clone()).collect();
                        end(idle.iter().filter_map(|t| all.remove(t)).collect::<Vec<_>>());
                    }
                }
            }
            end(std::mem::take(&mut *lock(&sessions)).into_values().collect::<Vec<_>>());
        });
        admin
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
        let token = session_token(headers).ok_or(Denied::NoSession)?;
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(token) {
            Some(s) if s.used.elapsed() < IDLE => {
                s.used = Instant::now();
                Ok((s.user.clone(), s.js.clone()))
            }
            Some(_) => {
                end(sessions.remove(token));
                Err(Denied::Ended)
            }
            None => Err(Denied::Ended),
        }
    }

    /// Counts a sign-in attempt as failed until it succeeds (so attempts
    /// cannot outrun the count); `false` when too many failed lately.
    fn attempt(&self) -> bool {
        let mut failures = lock(&self.failures);
        failures.retain(|t| t.elapsed() < Duration::from_secs(60));
        if failures.len() >= MAX_FAILURES_PER_MIN {
            return false;
        }
        failures.push(Instant::now());
        true
    }

    /// The attempt succeeded: it is not a failure.
    fn succeeded(&self) {
        lock(&self.failures).pop();
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

/// The one answer to every refused sign-in (wrong password, unknown user,
/// a user that is not the admin): nothing to tell them apart by.
const REFUSED: &str = "sign-in refused: wrong user or password, or not the NATS admin user";

/// Whether the request names this machine (`localhost`, `127.0.0.1`,
/// `[::1]`, with any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

/// `POST /v1/admin/session` `{"user", "password"}` → `{"token", "user"}`.
async fn sign_in(
    State(admin): State<Admin>,
    headers: HeaderMap,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(creds)) = body else {
        return error(StatusCode::BAD_REQUEST, "bad_request", r#"send {"user": "admin", "password": "…"} as JSON"#);
    };
    let Ok(_one_at_a_time) = admin.signing_in.acquire().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "shutting down");
    };
    if !admin.attempt() {
        return error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many failed sign-ins; wait a minute");
    }
    let refused = async |status: StatusCode, code: &str, message: &str| {
        tokio::time::sleep(FAILURE_DELAY).await;
        error(status, code, message)
    };
    if creds.user.trim().is_empty() || creds.password.is_empty() {
        return refused(StatusCode::UNAUTHORIZED, "unauthorized", REFUSED).await;
    }
    let config = NatsConfig {
        user: creds.user.clone(),
        password: Secret::new(creds.password.as_str()),
        creds: String::new(),
        ..admin.nats.clone()
    };
    let client = match conv_nats::connect(&config, "conv-projections-admin").await {
        Ok(c) => c,
        Err(e) if e.refused => {
            tracing::warn!(message = "Admin sign-in refused by NATS.", user = %creds.user);
            return refused(StatusCode::UNAUTHORIZED, "unauthorized", REFUSED).await;
        }
        Err(e) => {
            tracing::warn!(message = "Admin sign-in: NATS unavailable.", error = %e);
            return refused(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "NATS is unavailable; try again").await;
        }
    };
    let trusted = client.server_info().auth_required || (admin.loopback && loopback_host(&headers));
    if !trusted {
        let _ = client.drain().await;
        return refused(
            StatusCode::FORBIDDEN,
            "forbidden",
            "NATS takes anyone (no authorization): admin sign-in works only on a loopback address, asked for by \
             localhost, 127.0.0.1 or [::1]",
        )
        .await;
    }
    // Only a user that may read the dead letters is an admin here: a
    // service user's request is dropped by NATS (a permissions violation,
    // answered by nothing); the admin's gets JetStream's answer — the first
    // dead letter, or "no message found" (10037).
    let probe = client
        .request(format!("$JS.API.STREAM.MSG.GET.{}", conv_contracts::subject::STREAM_DLQ), r#"{"seq":1}"#.into());
    let answer = match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(m)) => serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    let allowed = answer.is_object() && (answer["error"].is_null() || answer["error"]["err_code"] == 10037);
    if !allowed {
        let _ = client.drain().await;
        if answer["error"]["err_code"] == 10059 {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "CONV_DLQ does not exist: run `convctl setup`",
            )
            .await;
        }
        tracing::warn!(message = "Admin sign-in refused: not an admin.", user = %creds.user);
        return refused(StatusCode::UNAUTHORIZED, "unauthorized", REFUSED).await;
    }
    admin.succeeded();
    let js = conv_nats::jetstream(client, &config);
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let mut sessions = lock(&admin.sessions);
    while sessions.len() >= MAX_SESSIONS {
        let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.used).map(|(t, _)| t.clone()) else { break };
        end(sessions.remove(&oldest));
    }
    sessions.insert(token.clone(), Session { user: creds.user.clone(), js, used: Instant::now(), baseline: None });
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
    if let Some(token) = session_token(&headers) {
        end(lock(&admin.sessions).remove(token));
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
        E::JetStream { .. } | E::Append { .. } => StatusCode::SERVICE_UNAVAILABLE,
        E::BadAdvisory { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = match &e {
        E::NotFound(_) => "not_found",
        E::OriginalGone { .. } => "original_gone",
        E::Invalid { .. } => "not_redrivable",
        E::SubjectMismatch { .. } => "subject_mismatch",
        E::JetStream { .. } | E::Append { .. } => "unavailable",
        E::BadAdvisory { .. } => "unreadable",
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
/// judged over the window since this session's baseline report (5–10
/// minutes old once the session is that old).
async fn readiness(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let token = session_token(&headers);
    let (_, js) = match admin.session(&headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let baseline = token.and_then(|t| lock(&admin.sessions).get(t).and_then(|s| s.baseline.clone()));
    let url = admin.nats.display_url();
    let previous = baseline.as_ref().map(|(_, k)| k);
    let report = readiness::report(Ok((&js, &admin.topology)), &url, &Thresholds::default(), true, previous).await;
    if let Some(t) = token
        && let Some(s) = lock(&admin.sessions).get_mut(t)
        && s.baseline.as_ref().is_none_or(|(at, _)| at.elapsed() >= BASELINE_AGE)
    {
        s.baseline = Some((Instant::now(), Kept::of(&report, &url)));
    }
    Json(report).into_response()
}

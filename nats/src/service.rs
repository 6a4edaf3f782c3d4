//! What every conv service process shares: layered configuration, logging,
//! signals, and the `/healthz` `/readyz` `/metrics` endpoints.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::connect::NatsConfig;
use crate::topology::{self, Topology, TopologyConfig};

/// Env var naming an optional TOML config file.
pub const CONFIG_FILE_ENV: &str = "CONV_CONFIG";

/// Why configuration was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is invalid: {detail}")]
    Parse { path: String, detail: String },
    /// The value is not repeated: it may be a secret.
    #[error("environment variable {var} is invalid: {detail}")]
    Env { var: String, detail: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A setting that cannot be used, and why (for the operator; no value is
/// repeated that could be a secret).
pub use conv_contracts::Invalid;

impl From<Invalid> for ConfigError {
    fn from(e: Invalid) -> Self {
        ConfigError::Invalid(e.0)
    }
}

/// Log output format. Env override: `CONV_LOG_FORMAT` (`pretty` or `json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl FromStr for LogFormat {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" | "text" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(Invalid(format!("expected `pretty` or `json`, got {other:?}"))),
        }
    }
}

/// Source of environment variables (a function so tests need not mutate the process env).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// Overrides `target` with the parsed value of `var` when it is set.
pub fn env_override<T: FromStr>(env: Env<'_>, var: &str, target: &mut T) -> Result<(), ConfigError>
where
    T::Err: std::fmt::Display,
{
    if let Some(value) = env(var) {
        *target = value.parse().map_err(|e: T::Err| ConfigError::Env { var: var.to_owned(), detail: e.to_string() })?;
    }
    Ok(())
}

/// Settings every service has. TOML section `[service]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Where `/healthz`, `/readyz`, `/metrics` (and for HTTP services the API)
    /// listen. Unset means the service's pinned default address.
    pub http_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Limits of the HTTP listener (`[service.http]`).
    pub http: crate::http::HttpLimits,
    /// Trace export: from the standard `OTEL_*` variables only (off unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    #[serde(skip)]
    pub telemetry: conv_telemetry::Config,
}

/// Service-specific settings: the `[options]` section of a service's
/// config file, with its own env overrides and validation.
pub trait Options: DeserializeOwned + Default + Clone + std::fmt::Debug + Send + 'static {
    /// Applies the service's own environment variables.
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        let _ = env;
        Ok(())
    }

    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// No service-specific settings.
impl Options for () {}

/// The sections every service's configuration file has: `[service]`,
/// `[nats]`, `[topology]`, plus the service's own `[options]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default, bound(deserialize = "O: Options"))]
pub struct Settings<O = ()> {
    pub service: ServiceConfig,
    pub nats: NatsConfig,
    pub topology: TopologyConfig,
    pub options: O,
}

/// What distinguishes one service binary from another at start.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Binary name, e.g. `conv-runtime`.
    pub name: &'static str,
    /// One line on what the service does (for `--help`).
    pub about: &'static str,
    /// The pinned env var of its address, e.g. `CONV_RUNTIME_ADDR`.
    pub addr_env: &'static str,
    /// The pinned default address.
    pub default_addr: SocketAddr,
    /// Help lines for the service's own env variables (`  VAR   what`), or "".
    pub options_help: &'static str,
}

impl<O: Options> Settings<O> {
    /// Defaults → TOML file (`CONV_CONFIG`) → env → validate.
    pub fn load(id: &Identity, env: Env<'_>) -> Result<Self, ConfigError> {
        let mut settings: Settings<O> = load_file(env, Settings::default())?;
        let mut addr = settings.service.http_addr.unwrap_or(id.default_addr);
        env_override(env, id.addr_env, &mut addr)?;
        settings.service.http_addr = Some(addr);
        env_override(env, "CONV_LOG_FORMAT", &mut settings.service.log_format)?;
        settings.service.http.apply_env(env)?;
        settings.service.telemetry.apply_env(env).map_err(|e| ConfigError::Env { var: e.var, detail: e.detail })?;
        settings.nats.apply_env(env)?;
        settings.topology.apply_env(env)?;
        settings.options.apply_env(env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings for a test: the given NATS and a free-port address.
    pub fn for_test(nats: NatsConfig, http_addr: SocketAddr) -> Self {
        Settings {
            service: ServiceConfig { http_addr: Some(http_addr), ..Default::default() },
            nats,
            topology: TopologyConfig::default(),
            options: O::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.topology.validate()?;
        self.options.validate()?;
        self.service.http.validate()?;
        if self.service.http_addr.is_none() {
            return Err(ConfigError::Invalid("service.http_addr is not set".into()));
        }
        Ok(())
    }

    /// The listen address (always set after [`Settings::load`]).
    pub fn http_addr(&self) -> SocketAddr {
        self.service.http_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

/// Handles `--help` and `--version` of a service binary (services are
/// configured by env and file, not flags). Returns `true` when the process
/// should exit.
pub fn handle_args(id: &Identity, args: impl IntoIterator<Item = String>) -> Result<bool, Invalid> {
    if let Some(arg) = args.into_iter().nth(1) {
        match arg.as_str() {
            "-h" | "--help" => {
                println!(
                    "{name} {version}\n{about}\n\nUsage: {name}\n\nConfigured by environment (and an optional TOML file):\n  \
                     {addr_env:<22} listen address for /healthz /readyz /metrics (default {addr})\n  \
                     NATS_URL               NATS server, or several separated by commas (default {nats})\n  \
                     CONV_CONFIG            TOML file with [service], [nats], [topology], [options] sections\n  \
                     CONV_LOG_FORMAT        pretty | json (default pretty)\n  \
                     CONV_HTTP_HEADER_TIMEOUT_MS  a request head must arrive within this, also between keep-alive requests (default 30000)\n  \
                     CONV_HTTP_MAX_CONNECTIONS    open HTTP connections at most; more are closed at once (default 4096)\n  \
                     CONV_PARTITIONS        CONV_IN partitions (default 16)\n  \
                     CONV_REPLICAS          stream replicas (default 1)\n  \
                     CONV_<KEY>             any other [topology] key, e.g. CONV_MAX_DELIVER, CONV_OWNER_TTL_SECS (README)\n  \
                     RUST_LOG               log filter (default info)\n{options}\nTraces (OpenTelemetry, OTLP/HTTP JSON; README \"Traces\"):\n{otel}\n\nStops gracefully on SIGINT or SIGTERM.",
                    options = id.options_help,
                    otel = conv_telemetry::ENV_HELP,
                    name = id.name,
                    version = env!("CARGO_PKG_VERSION"),
                    about = id.about,
                    addr_env = id.addr_env,
                    addr = id.default_addr,
                    nats = crate::connect::DEFAULT_URL,
                );
                return Ok(true);
            }
            "-V" | "--version" => {
                println!("{} {}", id.name, env!("CARGO_PKG_VERSION"));
                return Ok(true);
            }
            other => {
                return Err(format!("unexpected argument {other:?}; see `{} --help`", id.name).into());
            }
        }
    }
    Ok(false)
}

impl crate::http::HttpLimits {
    /// Applies `CONV_HTTP_HEADER_TIMEOUT_MS` and `CONV_HTTP_MAX_CONNECTIONS`.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        env_override(env, "CONV_HTTP_HEADER_TIMEOUT_MS", &mut self.header_read_timeout_ms)?;
        env_override(env, "CONV_HTTP_MAX_CONNECTIONS", &mut self.max_connections)
    }
}

impl NatsConfig {
    /// Applies `NATS_URL`, `NATS_USER`, `NATS_PASSWORD`, `NATS_CREDS`,
    /// `CONV_NATS_CONNECT_TIMEOUT_MS`, `CONV_NATS_REQUEST_TIMEOUT_MS`.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        env_override(env, "NATS_URL", &mut self.url)?;
        env_override(env, "NATS_USER", &mut self.user)?;
        env_override(env, "NATS_PASSWORD", &mut self.password)?;
        env_override(env, "NATS_CREDS", &mut self.creds)?;
        env_override(env, "CONV_NATS_CONNECT_TIMEOUT_MS", &mut self.connect_timeout_ms)?;
        env_override(env, "CONV_NATS_REQUEST_TIMEOUT_MS", &mut self.request_timeout_ms)
    }
}

impl TopologyConfig {
    /// Applies `CONV_<KEY>` for every `[topology]` key (`CONV_PARTITIONS`,
    /// `CONV_REPLICAS`, `CONV_JOURNAL_MAX_AGE_HOURS`, …).
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        env_override(env, "CONV_PARTITIONS", &mut self.partitions)?;
        env_override(env, "CONV_REPLICAS", &mut self.replicas)?;
        env_override(env, "CONV_JOURNAL_MAX_AGE_HOURS", &mut self.journal_max_age_hours)?;
        env_override(env, "CONV_JOURNAL_MAX_BYTES", &mut self.journal_max_bytes)?;
        env_override(env, "CONV_AUDIT_MAX_AGE_HOURS", &mut self.audit_max_age_hours)?;
        env_override(env, "CONV_AUDIT_MAX_BYTES", &mut self.audit_max_bytes)?;
        env_override(env, "CONV_DLQ_MAX_AGE_HOURS", &mut self.dlq_max_age_hours)?;
        env_override(env, "CONV_DLQ_MAX_BYTES", &mut self.dlq_max_bytes)?;
        env_override(env, "CONV_DUPLICATE_WINDOW_SECS", &mut self.duplicate_window_secs)?;
        env_override(env, "CONV_MAX_DELIVER", &mut self.max_deliver)?;
        env_override(env, "CONV_ACK_WAIT_SECS", &mut self.ack_wait_secs)?;
        env_override(env, "CONV_RUNTIME_ACK_WAIT_SECS", &mut self.runtime_ack_wait_secs)?;
        env_override(env, "CONV_EFFECTS_ACK_WAIT_SECS", &mut self.effects_ack_wait_secs)?;
        env_override(env, "CONV_PROJECTIONS_ACK_WAIT_SECS", &mut self.projections_ack_wait_secs)?;
        env_override(env, "CONV_PINNED_TTL_SECS", &mut self.pinned_ttl_secs)?;
        env_override(env, "CONV_OWNER_TTL_SECS", &mut self.owner_ttl_secs)?;
        env_override(env, "CONV_MAX_MSG_BYTES", &mut self.max_msg_bytes)?;
        env_override(env, "CONV_RUNTIME_MAX_ACK_PENDING", &mut self.runtime_max_ack_pending)?;
        env_override(env, "CONV_EFFECTS_MAX_ACK_PENDING", &mut self.effects_max_ack_pending)?;
        env_override(env, "CONV_PROJECTIONS_MAX_ACK_PENDING", &mut self.projections_max_ack_pending)?;
        env_override(env, "CONV_ENTRIES_HISTORY", &mut self.entries_history)
    }
}

/// Reads `T` from the TOML file named by `CONV_CONFIG` (if set), else starts
/// from `defaults`. Layering: defaults → file → env (applied by the caller) → validate.
pub fn load_file<T: DeserializeOwned>(env: Env<'_>, defaults: T) -> Result<T, ConfigError> {
    match env(CONFIG_FILE_ENV) {
        Some(path) if !path.is_empty() => read_toml(Path::new(&path)),
        _ => Ok(defaults),
    }
}

/// Parses a TOML config file; unknown keys are errors.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: shown, detail: e.to_string() })
}

/// Installs the global tracing subscriber (`RUST_LOG` filter, default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(message = "Shutdown signal received.");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Readiness of a service: NATS connected and the topology present.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    service: &'static str,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    topology: Topology,
    registry: Registry,
    nats_connected: IntGauge,
    ready: IntGauge,
}

/// Result of a readiness probe.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Health {
    /// `registry` is the service's metrics registry; readiness gauges are added to it.
    pub fn new(
        service: &'static str,
        client: async_nats::Client,
        nats: &NatsConfig,
        topology: &TopologyConfig,
        registry: Registry,
    ) -> Result<Self, prometheus::Error> {
        let nats_connected = IntGauge::new("conv_nats_connected", "1 while the NATS connection is up")?;
        let ready = IntGauge::new("conv_ready", "1 while the service reports ready")?;
        let info = IntGauge::with_opts(
            prometheus::Opts::new("conv_service_info", "constant 1, labelled with the service and version")
                .const_label("service", service)
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        info.set(1);
        registry.register(Box::new(nats_connected.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(info))?;
        let js = crate::connect::jetstream(client.clone(), nats);
        Ok(Self {
            inner: Arc::new(HealthInner {
                service,
                client,
                js,
                topology: Topology::declare(topology),
                registry,
                nats_connected,
                ready,
            }),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Runs the readiness checks.
    pub async fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        let state = inner.client.connection_state();
        let connected = state == async_nats::connection::State::Connected;
        inner.nats_connected.set(i64::from(connected));
        let mut checks = vec![Check { name: "nats", ok: connected, detail: format!("{state:?}").to_lowercase() }];
        if connected {
            let probe =
                tokio::time::timeout(Duration::from_secs(3), topology::missing_streams(&inner.js, &inner.topology))
                    .await;
            let check = match probe {
                Ok(Ok(missing)) if missing.is_empty() => {
                    Check { name: "topology", ok: true, detail: "all streams present".into() }
                }
                Ok(Ok(missing)) => Check {
                    name: "topology",
                    ok: false,
                    detail: format!("missing streams: {} (run `convctl setup`)", missing.join(", ")),
                },
                Ok(Err(e)) => Check { name: "topology", ok: false, detail: e.to_string() },
                Err(_) => Check { name: "topology", ok: false, detail: "JetStream did not answer within 3s".into() },
            };
            checks.push(check);
        } else {
            checks.push(Check { name: "topology", ok: false, detail: "unknown while NATS is disconnected".into() });
        }
        let ready = checks.iter().all(|c| c.ok);
        inner.ready.set(i64::from(ready));
        Readiness { ready, checks }
    }

    /// `/healthz`, `/readyz` and `/metrics`, to merge into a service's router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }
}

async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok", "service": health.inner.service}))
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let readiness = health.readiness().await;
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(readiness))
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    // Refresh the connection gauge on scrape.
    let connected = health.inner.client.connection_state() == async_nats::connection::State::Connected;
    health.inner.nats_connected.set(i64::from(connected));
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&health.inner.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A service's NATS connection and health, ready to serve.
#[derive(Debug, Clone)]
pub struct Booted {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub health: Health,
    /// Trace spans go here (records nothing when traces are off).
    pub tracer: conv_telemetry::Tracer,
}

impl Booted {
    /// Before a service stops: sends what the client and the trace
    /// exporter still buffer, for at most 2 s each.
    pub async fn flush(&self) {
        flush(&self.client).await;
        self.tracer.flush(Duration::from_secs(2)).await;
    }
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Telemetry(#[from] conv_telemetry::StartError),
}

/// Connects to NATS (in the background: a service boots while NATS is down
/// and reports not-ready until it answers), sets up health and metrics, and
/// announces the instance ([`crate::presence`]) until `shutdown`.
pub async fn boot<O: Options>(
    id: &Identity,
    settings: &Settings<O>,
    registry: Registry,
    shutdown: &CancellationToken,
) -> Result<Booted, BootError> {
    let client = crate::connect::connect_lazy(&settings.nats, id.name).await?;
    let js = crate::connect::jetstream(client.clone(), &settings.nats);
    let health = Health::new(id.name, client.clone(), &settings.nats, &settings.topology, registry)?;
    let tracer = conv_telemetry::Tracer::start(&settings.service.telemetry, id.name, health.registry())?;
    crate::presence::spawn(
        js.clone(),
        id.name,
        settings.http_addr(),
        Duration::from_secs(settings.topology.owner_ttl_secs.max(1)),
        shutdown.clone(),
    );
    tracing::info!(message = "Booted.", service = id.name, nats = %settings.nats.display_url(), addr = %settings.http_addr());
    Ok(Booted { client, js, health, tracer })
}

/// Why an HTTP listener stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Binds the service's address (reporting the actual one through `bound`)
/// and serves `router` with the configured limits ([`crate::http`]) until
/// `shutdown` fires, then drains open requests.
pub async fn serve(
    addr: SocketAddr,
    limits: crate::http::HttpLimits,
    router: Router,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    crate::http::serve(addr, router, limits, shutdown, bound).await
}

/// Tries `attach` once a second until it yields (the topology exists: `convctl
/// setup` ran) or `shutdown` fires (`None`). A service stays up, and not
/// ready, while it waits.
pub async fn wait_for<T, F, Fut>(shutdown: &CancellationToken, mut attach: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            found = attach() => if found.is_some() { return found },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Flushes what the client still buffers, for at most 2 s (a disconnected
/// client would wait forever).
pub async fn flush(client: &async_nats::Client) {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}

/// The whole `main` of a service binary: `--help`/`--version`, layered
/// config, logging, a multi-threaded runtime, SIGINT/SIGTERM → shutdown
/// token, then `run(settings, shutdown)`. Errors print one line and exit 1
/// (2 for bad configuration or arguments).
pub fn main<O, F, Fut, E>(id: &Identity, run: F) -> std::process::ExitCode
where
    O: Options,
    F: FnOnce(Settings<O>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use std::process::ExitCode;
    match handle_args(id, std::env::args()) {
        Ok(true) => return ExitCode::SUCCESS,
        Ok(false) => {}
        Err(e) => {
            eprintln!("{}: {e}", id.name);
            return ExitCode::from(2);
        }
    }
    let settings = match Settings::<O>::load(id, &process_env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", id.name);
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.service.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", id.name);
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = shutdown_on_signals();
        run(settings, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(message = "Service failed.", error = %e);
            eprintln!("{}: {e}", id.name);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn layered_settings() {
        let id = Identity {
            name: "conv-x",
            about: "test",
            addr_env: "CONV_X_ADDR",
            default_addr: "127.0.0.1:9100".parse().expect("addr"),
            options_help: "",
        };
        let none = |_: &str| None;
        let s = Settings::<()>::load(&id, &none).expect("defaults are valid");
        assert_eq!(s.http_addr().port(), 9100);
        assert_eq!(s.nats.url, crate::connect::DEFAULT_URL);

        let vars: HashMap<&str, &str> = [
            ("CONV_X_ADDR", "127.0.0.1:9999"),
            ("CONV_LOG_FORMAT", "json"),
            ("NATS_URL", "nats://h:1"),
            ("CONV_PARTITIONS", "4"),
        ]
        .into();
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        let s = Settings::<()>::load(&id, &env).expect("valid");
        assert_eq!(s.http_addr().port(), 9999);
        assert_eq!(s.service.log_format, LogFormat::Json);
        assert_eq!(s.nats.url, "nats://h:1");
        assert_eq!(s.topology.partitions, 4);

        let bad: HashMap<&str, &str> = [("CONV_X_ADDR", "not-an-addr")].into();
        let env = |k: &str| bad.get(k).map(|v| v.to_string());
        let err = Settings::<()>::load(&id, &env).expect_err("refused");
        assert!(matches!(err, ConfigError::Env { ref var, .. } if var == "CONV_X_ADDR"));
        assert!(!err.to_string().contains("not-an-addr"), "the value is not repeated: {err}");

        // Credentials come from the environment and never print.
        let creds: HashMap<&str, &str> = [("NATS_USER", "runtime"), ("NATS_PASSWORD", "hunter2")].into();
        let env = |k: &str| creds.get(k).map(|v| v.to_string());
        let s = Settings::<()>::load(&id, &env).expect("valid");
        assert_eq!((s.nats.user.as_str(), s.nats.password.expose()), ("runtime", "hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
        let half: HashMap<&str, &str> = [("NATS_PASSWORD", "hunter2")].into();
        let env = |k: &str| half.get(k).map(|v| v.to_string());
        let err = Settings::<()>::load(&id, &env).expect_err("a password needs a user");
        assert!(!err.to_string().contains("hunter2"));

        let bad: HashMap<&str, &str> = [("CONV_PARTITIONS", "0")].into();
        let env = |k: &str| bad.get(k).map(|v| v.to_string());
        assert!(matches!(Settings::<()>::load(&id, &env), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn every_setting_has_an_env_override() {
        use crate::test_util::assert_every_key_has_env;
        assert_every_key_has_env(
            TopologyConfig::apply_env,
            &[
                ("partitions", "CONV_PARTITIONS", "4"),
                ("replicas", "CONV_REPLICAS", "3"),
                ("journal_max_age_hours", "CONV_JOURNAL_MAX_AGE_HOURS", "48"),
                ("journal_max_bytes", "CONV_JOURNAL_MAX_BYTES", "10000000000"),
                ("audit_max_age_hours", "CONV_AUDIT_MAX_AGE_HOURS", "100"),
                ("audit_max_bytes", "CONV_AUDIT_MAX_BYTES", "100000000"),
                ("dlq_max_age_hours", "CONV_DLQ_MAX_AGE_HOURS", "24"),
                ("dlq_max_bytes", "CONV_DLQ_MAX_BYTES", "-1"),
                ("duplicate_window_secs", "CONV_DUPLICATE_WINDOW_SECS", "60"),
                ("max_deliver", "CONV_MAX_DELIVER", "7"),
                ("ack_wait_secs", "CONV_ACK_WAIT_SECS", "20"),
                ("runtime_ack_wait_secs", "CONV_RUNTIME_ACK_WAIT_SECS", "4"),
                ("effects_ack_wait_secs", "CONV_EFFECTS_ACK_WAIT_SECS", "6"),
                ("projections_ack_wait_secs", "CONV_PROJECTIONS_ACK_WAIT_SECS", "8"),
                ("pinned_ttl_secs", "CONV_PINNED_TTL_SECS", "5"),
                ("owner_ttl_secs", "CONV_OWNER_TTL_SECS", "3"),
                ("max_msg_bytes", "CONV_MAX_MSG_BYTES", "1500000"),
                ("runtime_max_ack_pending", "CONV_RUNTIME_MAX_ACK_PENDING", "500"),
                ("effects_max_ack_pending", "CONV_EFFECTS_MAX_ACK_PENDING", "8192"),
                ("projections_max_ack_pending", "CONV_PROJECTIONS_MAX_ACK_PENDING", "1000"),
                ("entries_history", "CONV_ENTRIES_HISTORY", "4"),
            ],
        );
        assert_every_key_has_env(
            NatsConfig::apply_env,
            &[
                ("url", "NATS_URL", "nats://a:1,nats://b:2"),
                ("user", "NATS_USER", "u"),
                ("password", "NATS_PASSWORD", "p"),
                ("creds", "NATS_CREDS", "/x.creds"),
                ("connect_timeout_ms", "CONV_NATS_CONNECT_TIMEOUT_MS", "500"),
                ("request_timeout_ms", "CONV_NATS_REQUEST_TIMEOUT_MS", "9000"),
            ],
        );
        assert_every_key_has_env(
            crate::http::HttpLimits::apply_env,
            &[
                ("header_read_timeout_ms", "CONV_HTTP_HEADER_TIMEOUT_MS", "1000"),
                ("max_connections", "CONV_HTTP_MAX_CONNECTIONS", "10"),
            ],
        );
        // `[service]`: the address has the service's own variable, the
        // limits are checked above.
        assert_eq!(
            crate::test_util::section_keys::<ServiceConfig>(),
            ["http_addr", "log_format", "http"],
            "a new [service] key needs its variable in Settings::load"
        );
    }

    #[test]
    fn limits_reach_the_declared_objects() {
        let cfg = TopologyConfig {
            journal_max_bytes: 5 << 30,
            dlq_max_age_hours: 12,
            dlq_max_bytes: 64 << 20,
            audit_max_bytes: 1 << 30,
            runtime_max_ack_pending: 77,
            effects_max_ack_pending: 999,
            projections_max_ack_pending: 1234,
            entries_history: 3,
            ..Default::default()
        };
        cfg.validate().expect("valid");
        let t = crate::topology::Topology::declare(&cfg);
        let stream = |name: &str| t.streams.iter().find(|s| s.name == name).expect("declared");
        assert_eq!(stream("CONV_IN").max_bytes, 5 << 30);
        assert_eq!(stream("CONV_OUT").max_bytes, 5 << 30);
        assert_eq!(stream("CONV_AUDIT").max_bytes, 1 << 30);
        assert_eq!((stream("CONV_DLQ").max_bytes, stream("CONV_DLQ").max_age.as_secs()), (64 << 20, 12 * 3600));
        let consumer = |name: &str| t.consumers.iter().find(|c| c.config.durable_name.as_deref() == Some(name));
        assert_eq!(consumer("runtime-p0").expect("declared").config.max_ack_pending, 77);
        assert_eq!(consumer("effects").expect("declared").config.max_ack_pending, 999);
        assert_eq!(consumer("projections-p3").expect("declared").config.max_ack_pending, 1234);
        let entries = t.kv.iter().find(|k| k.bucket == crate::topology::KV_ENTRIES).expect("declared");
        assert_eq!(entries.history, 3);

        let small = TopologyConfig { dlq_max_bytes: 1000, ..Default::default() };
        assert!(small.validate().expect_err("below one message").0.contains("dlq_max_bytes"));
        let none = TopologyConfig { effects_max_ack_pending: 0, ..Default::default() };
        assert!(none.validate().is_err());
    }

    #[test]
    fn config_file_layer() {
        let dir = std::env::temp_dir().join(format!("conv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("service.toml");
        std::fs::write(&path, "[service]\nhttp_addr = \"127.0.0.1:7000\"\n[topology]\npartitions = 8\n")
            .expect("write");
        let id = Identity {
            name: "x",
            about: "",
            addr_env: "CONV_X_ADDR",
            default_addr: "127.0.0.1:1".parse().expect("addr"),
            options_help: "",
        };
        let p = path.display().to_string();
        let env = |k: &str| (k == CONFIG_FILE_ENV).then(|| p.clone());
        let s = Settings::<()>::load(&id, &env).expect("valid");
        assert_eq!((s.http_addr().port(), s.topology.partitions), (7000, 8));
        std::fs::write(&path, "[service]\nhttp_adr = \"127.0.0.1:7000\"\n").expect("write");
        assert!(matches!(Settings::<()>::load(&id, &env), Err(ConfigError::Parse { .. })), "typos are refused");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

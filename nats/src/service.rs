//! What every conv service process shares: layered configuration, logging,
//! signals, and the `/healthz` `/readyz` `/metrics` endpoints.

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
    #[error("environment variable {var}={value:?} is invalid: {detail}")]
    Env { var: String, value: String, detail: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
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
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" | "text" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `pretty` or `json`, got {other:?}")),
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
        *target = value.parse().map_err(|e: T::Err| ConfigError::Env {
            var: var.to_owned(),
            value: value.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// Settings every service has. TOML section `[service]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where `/healthz`, `/readyz`, `/metrics` (and for HTTP services the API) listen.
    pub http_addr: SocketAddr,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Seconds to wait for in-flight work on shutdown.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_grace() -> u64 {
    10
}

impl ServiceConfig {
    pub fn new(http_addr: SocketAddr) -> Self {
        Self { http_addr, log_format: LogFormat::default(), shutdown_grace_secs: default_grace() }
    }

    /// Applies `addr_var` (the service's pinned address variable) and `CONV_LOG_FORMAT`.
    pub fn apply_env(&mut self, env: Env<'_>, addr_var: &str) -> Result<(), ConfigError> {
        env_override(env, addr_var, &mut self.http_addr)?;
        env_override(env, "CONV_LOG_FORMAT", &mut self.log_format)
    }
}

impl NatsConfig {
    /// Applies `NATS_URL`.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        env_override(env, "NATS_URL", &mut self.url)
    }
}

impl TopologyConfig {
    /// Applies `CONV_PARTITIONS` and `CONV_REPLICAS`.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        env_override(env, "CONV_PARTITIONS", &mut self.partitions)?;
        env_override(env, "CONV_REPLICAS", &mut self.replicas)
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
            let probe = tokio::time::timeout(
                Duration::from_secs(3),
                topology::missing_streams(&inner.js, &inner.topology),
            )
            .await;
            let check = match probe {
                Ok(Ok(missing)) if missing.is_empty() => Check { name: "topology", ok: true, detail: "all streams present".into() },
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

/// Why an HTTP listener stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Binds `addr` (reporting the actual address through `bound`) and serves
/// `router` until `shutdown` fires, then drains open requests.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(message = "Listening.", addr = %local);
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(ServeError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_overrides_are_typed() {
        let vars: HashMap<&str, &str> =
            [("CONV_X_ADDR", "127.0.0.1:9999"), ("CONV_LOG_FORMAT", "json"), ("NATS_URL", "nats://h:1")].into();
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        let mut cfg = ServiceConfig::new("127.0.0.1:1".parse().expect("addr"));
        cfg.apply_env(&env, "CONV_X_ADDR").expect("valid");
        assert_eq!(cfg.http_addr.port(), 9999);
        assert_eq!(cfg.log_format, LogFormat::Json);
        let mut nats = NatsConfig::default();
        nats.apply_env(&env).expect("valid");
        assert_eq!(nats.url, "nats://h:1");

        let bad: HashMap<&str, &str> = [("CONV_X_ADDR", "not-an-addr")].into();
        let env = |k: &str| bad.get(k).map(|v| v.to_string());
        let err = cfg.apply_env(&env, "CONV_X_ADDR").expect_err("refused");
        assert!(matches!(err, ConfigError::Env { ref var, .. } if var == "CONV_X_ADDR"));
    }
}

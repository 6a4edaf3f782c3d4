//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};

use crate::connect::NatsConfig;
use crate::topology::{self, Topology, TopologyConfig};

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
    /// A service's further connections (effects' cancel-hint lane), each a
    /// readiness check of its own.
    more: std::sync::Mutex<Vec<(&'static str, async_nats::Client)>>,
}

/// Check `name`: `client` is connected.
fn connection_check(name: &'static str, client: &async_nats::Client) -> Check {
    let state = client.connection_state();
    Check { name, ok: state == async_nats::connection::State::Connected, detail: format!("{state:?}").to_lowercase() }
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
                more: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Makes a further connection of the service a readiness check named
    /// `name`: the service is ready only while it is connected too.
    pub fn watch_connection(&self, name: &'static str, client: async_nats::Client) {
        if let Ok(mut more) = self.inner.more.lock() {
            more.push((name, client));
        }
    }

    /// Runs the readiness checks.
    pub async fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        let nats = connection_check("nats", &inner.client);
        let connected = nats.ok;
        inner.nats_connected.set(i64::from(connected));
        let mut checks = vec![nats];
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
        if let Ok(more) = inner.more.lock() {
            checks.extend(more.iter().map(|(name, client)| connection_check(name, client)));
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

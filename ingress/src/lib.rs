//! # conv-ingress
//!
//! HTTP and NATS entry of conv: normalize, validate, journal to CONV_IN with dedupe, answer.
//!
//! Its HTTP API (`POST /v1/conversations/{id}/messages`, `/abort`, `/stop`, `/retry`, `POST /v1/events`) shares the port with the health endpoints.
//!
//! This build boots the process — layered configuration, logging, a NATS
//! connection that reports readiness, `/healthz` `/readyz` `/metrics` on
//! `CONV_INGRESS_ADDR` (default 127.0.0.1:8080) and graceful shutdown. Its event
//! handling arrives with issue 3 (see ARCHITECTURE.md).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use conv_nats::service::{self, Identity, RunError, Settings};
use tokio_util::sync::CancellationToken;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-ingress",
    about: "HTTP and NATS entry of conv: normalize, validate, journal to CONV_IN with dedupe, answer.",
    addr_env: "CONV_INGRESS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
};

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings;

/// Why the service stopped with an error.
pub type Error = RunError;

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    service::serve_health(&IDENTITY, &config, shutdown).await
}

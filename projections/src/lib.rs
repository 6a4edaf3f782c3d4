//! # conv-projections
//!
//! Projections of conv: timeline, LLM context and the resumable client stream.
//!
//! Its read API (`GET /v1/conversations/{id}/timeline`, `/stream`, `/context`) shares the port with the health endpoints.
//!
//! This build boots the process — layered configuration, logging, a NATS
//! connection that reports readiness, `/healthz` `/readyz` `/metrics` on
//! `CONV_PROJECTIONS_ADDR` (default 127.0.0.1:8081) and graceful shutdown. Its event
//! handling arrives with issue 6 (see ARCHITECTURE.md).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use conv_nats::service::{self, Identity, RunError, Settings};
use tokio_util::sync::CancellationToken;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-projections",
    about: "Projections of conv: timeline, LLM context and the resumable client stream.",
    addr_env: "CONV_PROJECTIONS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081),
    options_help: "",
};

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings;

/// Why the service stopped with an error.
pub type Error = RunError;

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    service::serve_health(&IDENTITY, &config, shutdown).await
}

//! # conv-effects
//!
//! Effect workers of conv: LLM streaming, tools and timers, with cancellation, retry and timeouts.
//!
//! Instances share the CONV_EFFECT work queue; any instance runs any effect.
//!
//! This build boots the process — layered configuration, logging, a NATS
//! connection that reports readiness, `/healthz` `/readyz` `/metrics` on
//! `CONV_EFFECTS_ADDR` (default 127.0.0.1:9102) and graceful shutdown. Its event
//! handling arrives with issue 5 (see ARCHITECTURE.md).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use conv_nats::service::{self, Identity, RunError, Settings};
use tokio_util::sync::CancellationToken;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-effects",
    about: "Effect workers of conv: LLM streaming, tools and timers, with cancellation, retry and timeouts.",
    addr_env: "CONV_EFFECTS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9102),
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

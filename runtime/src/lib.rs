//! # conv-runtime
//!
//! Partitioned conversation runtime of conv: scheduler, pure reducer, snapshots, applied markers.
//!
//! Each instance owns a share of the CONV_IN partitions and applies their events in priority order.
//!
//! This build boots the process — layered configuration, logging, a NATS
//! connection that reports readiness, `/healthz` `/readyz` `/metrics` on
//! `CONV_RUNTIME_ADDR` (default 127.0.0.1:9101) and graceful shutdown. Its event
//! handling arrives with issue 4 (see ARCHITECTURE.md).

pub mod reducer;
pub mod state;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use conv_nats::service::{self, Identity, RunError, Settings};
use tokio_util::sync::CancellationToken;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-runtime",
    about: "Partitioned conversation runtime of conv: scheduler, pure reducer, snapshots, applied markers.",
    addr_env: "CONV_RUNTIME_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9101),
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

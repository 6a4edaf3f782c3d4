//! # conv-runtime
//!
//! The conversation runtime. Instances share the `CONV_IN` partitions, one
//! owner each (`conv_nats::ownership`); a partition worker ([`worker`]) pulls its inputs
//! (control plane first), orders them with the scheduler (`conv-core`) (priority,
//! causality, fairness), applies them with the pure reducer (`conv-core`), publishes the
//! directives, outputs and one applied marker per input, and acks only after
//! those are durable. State is snapshotted with optimistic concurrency
//! and restored from snapshot + journal tail (`conv-store`).
pub mod hints;
pub mod metrics;
pub mod worker;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use conv_nats::service::{self, ConfigError, Env, Identity, Options, Settings};
use conv_nats::topology::KV_LEASES;
use prometheus::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-runtime",
    about: "Partitioned conversation runtime of conv: scheduler, pure reducer, snapshots, applied markers.",
    addr_env: "CONV_RUNTIME_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9101),
    options_help: "  CONV_RUNTIME_INSTANCE           instance id (default: a fresh UUID)\n  \
CONV_RUNTIME_SNAPSHOT_EVERY     applies between snapshots of a conversation (default 32)\n  \
CONV_RUNTIME_HEARTBEAT_MS       membership and lease refresh (default 500; keep it below a quarter of owner_ttl_secs)\n  \
CONV_RUNTIME_IDLE_SNAPSHOT_MS   snapshot a conversation this long after its last apply (default 1000)\n  \
CONV_RUNTIME_EVICT_AFTER_SECS   drop an idle conversation's state from memory after this (default 60)\n  \
CONV_RUNTIME_CAUSALITY_WAIT_MS  wait for a missing cause before the DLQ (default 5000)\n",
};

/// Runtime settings beyond the common ones (`[options]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeOptions {
    /// Instance id in the ownership bucket; empty means a fresh UUID per start.
    pub instance: String,
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    pub idle_snapshot_ms: u64,
    pub evict_after_secs: u64,
    /// How long an input waits for its runtime-derived cause before the DLQ.
    pub causality_wait_ms: u64,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            instance: String::new(),
            snapshot_every: 32,
            heartbeat_ms: 500,
            idle_snapshot_ms: 1000,
            evict_after_secs: 60,
            causality_wait_ms: 5000,
        }
    }
}

impl Options for RuntimeOptions {
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        conv_nats::env_overrides!(env, self, "CONV_RUNTIME_": instance, snapshot_every, heartbeat_ms,
            idle_snapshot_ms, evict_after_secs, causality_wait_ms);
        Ok(())
    }

    fn validate(&self) -> Result<(), conv_nats::service::Invalid> {
        if self.snapshot_every == 0 || self.heartbeat_ms == 0 {
            return Err("options.snapshot_every and options.heartbeat_ms must be positive".into());
        }
        if self.instance.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
            return Err(format!("options.instance {:?} must be [A-Za-z0-9_-]", self.instance).into());
        }
        Ok(())
    }
}

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings<RuntimeOptions>;

/// Why the service stopped with an error.
pub type Error = service::ServiceError;

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let registry = Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let running = service::Running::start(&IDENTITY, &config, registry, &shutdown).await?;
    let booted = &running.booted;

    // The buckets exist once `convctl setup` ran; until then, wait (not ready).
    let ready = service::wait_for(&shutdown, || async {
        let owners = booted.js.get_key_value(KV_LEASES).await.ok()?;
        let snapshots = conv_store::Snapshots::open(&booted.js).await.ok()?;
        Some((owners, snapshots))
    })
    .await;
    if let Some((owners, snapshots)) = ready {
        let o = &config.options;
        let instance = conv_nats::ownership::instance_id(&o.instance);
        tracing::info!(message = "Runtime instance up.", instance = %instance, partitions = config.topology.partitions);
        let ownership =
            conv_nats::ownership::OwnershipConfig::of(&config.topology, o.heartbeat_ms, "", metrics.ownership.clone());
        let shared = Arc::new(worker::Shared {
            js: booted.js.clone(),
            snapshots,
            metrics,
            tracer: booted.tracer.clone(),
            config: worker::WorkerConfig {
                snapshot_every: o.snapshot_every,
                idle_snapshot: Duration::from_millis(o.idle_snapshot_ms),
                evict_after: Duration::from_secs(o.evict_after_secs),
                causality_wait: Duration::from_millis(o.causality_wait_ms),
                ..Default::default()
            },
        });
        let workers = move |partition, stop, lease| worker::start(&shared, partition, stop, lease);
        conv_nats::ownership::run(instance, owners, Arc::new(workers), ownership, shutdown.clone()).await;
    }
    running.stop().await
}

#[cfg(test)]
mod options_tests {
    use super::*;

    #[test]
    fn every_option_has_an_env_override() {
        conv_nats::test_util::assert_every_key_has_env(RuntimeOptions::apply_env, Some(IDENTITY.options_help));
    }
}

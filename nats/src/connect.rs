//! Connecting to NATS.

use std::time::Duration;

use serde::Deserialize;

/// Default NATS URL (pinned).
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// How to reach NATS. Env override: `NATS_URL`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    /// Connect timeout of one attempt, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Timeout of JetStream API requests and publish acks, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self { url: DEFAULT_URL.to_owned(), connect_timeout_ms: 2_000, request_timeout_ms: 5_000 }
    }
}

impl NatsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("nats.url must not be empty".into());
        }
        if self.connect_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err("nats timeouts must be positive".into());
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    fn options(&self, name: &str) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_millis(self.connect_timeout_ms))
            .request_timeout(Some(self.request_timeout()))
            .max_reconnects(None)
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    #[source]
    pub source: async_nats::ConnectError,
}

/// Connects once and fails if NATS does not answer (for CLIs and tests).
pub async fn connect(config: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    config.options(name).connect(&config.url).await.map_err(|source| ConnectError { url: config.url.clone(), source })
}

/// Returns at once and keeps trying in the background (for services: they
/// boot while NATS is down and report not-ready until it answers).
pub async fn connect_lazy(config: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    config
        .options(name)
        .retry_on_initial_connect()
        .connect(&config.url)
        .await
        .map_err(|source| ConnectError { url: config.url.clone(), source })
}

/// A JetStream context with the configured request timeout.
pub fn jetstream(client: async_nats::Client, config: &NatsConfig) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new().timeout(config.request_timeout()).build(client)
}

//! Ingress-specific settings: the `[options]` section and its env variables.

use std::time::Duration;

use conv_nats::secret::Secret;
use conv_nats::service::{ConfigError, Env, Options};
use serde::Deserialize;

/// Settings of conv-ingress beyond the common ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressOptions {
    /// Largest accepted request body, in bytes (`CONV_INGRESS_MAX_BODY_BYTES`, default 1 MiB).
    pub max_body_bytes: usize,
    /// How long to wait for the JetStream ack before answering 503 (`CONV_INGRESS_PUBLISH_TIMEOUT_MS`).
    pub publish_timeout_ms: u64,
    /// Serve the NATS request API (`conv.ingress.*`, `$SRV` discovery) too (`CONV_INGRESS_NATS_API`).
    pub nats_api: bool,
    /// How often the `conv_dlq_messages` gauge is refreshed, in seconds.
    pub dlq_poll_secs: u64,
    /// Client API keys, comma-separated, each `key` or `key:<conversation-id
    /// prefix>` (`CONV_INGRESS_API_KEYS`). Empty: open, loopback only.
    pub api_keys: Secret,
    /// Secret of the callback tokens, shared with effects (`CONV_CALLBACK_SECRET`).
    /// Empty: callbacks are refused.
    pub callback_secret: Secret,
    /// Requests per second per client key (`CONV_INGRESS_RATE_PER_KEY`; 0: no limit).
    pub rate_per_key: f64,
    /// Requests a key may make at once above its rate (`CONV_INGRESS_RATE_BURST`).
    pub rate_burst: f64,
    /// Runtime backlog (inputs pending + unacked) above which new messages
    /// get 503 (`CONV_INGRESS_SHED_BACKLOG`; 0: never shed).
    pub shed_backlog: u64,
    /// How often the backlog is read (`CONV_INGRESS_SHED_POLL_MS`).
    pub shed_poll_ms: u64,
}

impl Default for IngressOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: conv_contracts::rejection::DEFAULT_MAX_EVENT_BYTES,
            publish_timeout_ms: 5_000,
            nats_api: true,
            dlq_poll_secs: 15,
            api_keys: Secret::default(),
            callback_secret: Secret::default(),
            rate_per_key: 50.0,
            rate_burst: 100.0,
            shed_backlog: 100_000,
            shed_poll_ms: 1_000,
        }
    }
}

impl IngressOptions {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

impl Options for IngressOptions {
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        conv_nats::env_overrides!(env, self, "CONV_INGRESS_": max_body_bytes, publish_timeout_ms, nats_api,
            dlq_poll_secs, api_keys, rate_per_key, rate_burst, shed_backlog, shed_poll_ms);
        conv_nats::env_overrides!(env, self, "CONV_": callback_secret);
        Ok(())
    }

    fn validate(&self) -> Result<(), conv_nats::service::Invalid> {
        // Consumers validate events against the 1 MiB contract limit, so a
        // larger body would be accepted here and dead-lettered there.
        let max = conv_contracts::rejection::DEFAULT_MAX_EVENT_BYTES;
        if self.max_body_bytes == 0 || self.max_body_bytes > max {
            return Err(format!("options.max_body_bytes must be 1..={max}, got {}", self.max_body_bytes).into());
        }
        if self.publish_timeout_ms == 0 || self.dlq_poll_secs == 0 {
            return Err("options.publish_timeout_ms and options.dlq_poll_secs must be positive".into());
        }
        crate::auth::Auth::new(&self.api_keys, &self.callback_secret)?;
        if !(self.rate_per_key >= 0.0 && self.rate_burst >= 1.0) || self.shed_poll_ms == 0 {
            return Err("options.rate_per_key must be >= 0, rate_burst >= 1 and shed_poll_ms positive".into());
        }
        Ok(())
    }
}

/// `--help` lines for these variables.
pub const HELP: &str = "  CONV_INGRESS_MAX_BODY_BYTES      largest request body (default 1048576)\n  \
CONV_INGRESS_PUBLISH_TIMEOUT_MS  JetStream ack timeout before 503 (default 5000)\n  \
CONV_INGRESS_NATS_API            serve conv.ingress.* over NATS too (default true)\n  \
CONV_INGRESS_DLQ_POLL_SECS       how often the conv_dlq_messages gauge is read (default 15)\n  \
CONV_INGRESS_API_KEYS            client keys: key[:conversation-id prefix],... (none: open, loopback only)\n  \
CONV_CALLBACK_SECRET             secret of callback tokens, same as effects' (none: callbacks refused)\n  \
CONV_INGRESS_RATE_PER_KEY        requests/s per client key, 429 above (default 50; 0: no limit)\n  \
CONV_INGRESS_RATE_BURST          requests a key may make at once (default 100)\n  \
CONV_INGRESS_SHED_BACKLOG        runtime backlog above which new messages get 503 (default 100000; 0: never)\n  \
CONV_INGRESS_SHED_POLL_MS        how often the backlog is read (default 1000)\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_has_an_env_override() {
        conv_nats::test_util::assert_every_key_has_env(IngressOptions::apply_env, Some(HELP));
    }
}

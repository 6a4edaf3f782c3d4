//! Projections settings beyond the common ones (`[options]`, env overrides).

use conv_nats::secret::Secret;
use conv_nats::service::{ConfigError, Env, Options};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectionsOptions {
    /// Where finished assistant messages are delivered; empty: no delivery.
    pub webhook_url: String,
    pub webhook_retries: usize,
    pub webhook_timeout_ms: u64,
    /// Instance id among the view owners; empty: a fresh UUID per start.
    pub instance: String,
    /// Membership and lease refresh of view partitions.
    pub heartbeat_ms: u64,
    /// A changed view is written this long after its first unwritten change.
    pub flush_ms: u64,
    /// SSE: events buffered per conversation for its readers; a reader that
    /// falls further behind is closed (and can resume with `Last-Event-ID`).
    pub sse_buffer: usize,
    /// SSE: heartbeat comment interval on idle streams.
    pub sse_heartbeat_ms: u64,
    /// SSE: how long a conversation's subscriptions outlive its last reader.
    pub sse_linger_ms: u64,
    /// The client keys that may read conversations: the same list as
    /// ingress's (`CONV_INGRESS_API_KEYS`). Empty: open, loopback only.
    pub api_keys: Secret,
    /// Ingress's base URL: the console's messages, aborts, stops and retries
    /// are forwarded there.
    pub ingress_url: String,
}

impl Default for ProjectionsOptions {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            webhook_retries: 5,
            webhook_timeout_ms: 5_000,
            instance: String::new(),
            heartbeat_ms: 500,
            flush_ms: 200,
            sse_buffer: 4_096,
            sse_heartbeat_ms: 15_000,
            sse_linger_ms: 10_000,
            api_keys: Secret::default(),
            ingress_url: "http://127.0.0.1:8080".to_owned(),
        }
    }
}

impl Options for ProjectionsOptions {
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        conv_nats::env_overrides!(env, self, "CONV_OUTBOUND_": webhook_url, webhook_retries, webhook_timeout_ms);
        conv_nats::env_overrides!(env, self, "CONV_PROJECTIONS_": instance, heartbeat_ms, flush_ms);
        conv_nats::env_overrides!(env, self, "CONV_": sse_buffer, sse_heartbeat_ms, sse_linger_ms, ingress_url);
        conv_nats::env_overrides!(env, self, "CONV_INGRESS_": api_keys);
        Ok(())
    }

    fn validate(&self) -> Result<(), conv_nats::service::Invalid> {
        if !self.webhook_url.is_empty()
            && !self.webhook_url.starts_with("http://")
            && !self.webhook_url.starts_with("https://")
        {
            return Err(format!("CONV_OUTBOUND_WEBHOOK_URL {:?} is not an http(s) URL", self.webhook_url).into());
        }
        conv_nats::keys::ApiKeys::new(&self.api_keys)?;
        if !self.ingress_url.starts_with("http://") && !self.ingress_url.starts_with("https://") {
            return Err(format!("CONV_INGRESS_URL {:?} is not an http(s) URL", self.ingress_url).into());
        }
        if self.webhook_timeout_ms == 0 {
            return Err("options.webhook_timeout_ms must be positive".into());
        }
        if self.heartbeat_ms == 0 || self.flush_ms == 0 || self.sse_buffer == 0 || self.sse_heartbeat_ms == 0 {
            return Err(
                "CONV_PROJECTIONS_HEARTBEAT_MS, CONV_PROJECTIONS_FLUSH_MS, CONV_SSE_BUFFER and CONV_SSE_HEARTBEAT_MS must be positive"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_has_an_env_override() {
        conv_nats::test_util::assert_every_key_has_env(
            ProjectionsOptions::apply_env,
            Some(crate::IDENTITY.options_help),
        );
    }
}

//! The outbound webhook channel: every finished assistant message of every
//! conversation is `POST`ed to `CONV_OUTBOUND_WEBHOOK_URL` as
//! `{"conversation_id", "entry_id", "status", "text", "event_id"}` with
//! `Idempotency-Key: <event id>`, in per-conversation order (it is delivered
//! from the ordered fold of `CONV_OUT`). Failures (connect, timeout, 429,
//! 5xx) are retried with jittered backoff; after the last retry the delivery
//! is given up (counted and logged) so one dead receiver cannot stall every
//! conversation's view.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use conv_contracts::Envelope;
use conv_contracts::payload::OutMessageFinished;
use conv_nats::service::{ConfigError, Env, Options, env_override};
use serde::Deserialize;
use serde_json::json;

/// Projections settings beyond the common ones (`[options]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundOptions {
    /// Where finished assistant messages are delivered; empty: no delivery.
    pub webhook_url: String,
    pub webhook_retries: usize,
    pub webhook_timeout_ms: u64,
}

impl Default for OutboundOptions {
    fn default() -> Self {
        Self { webhook_url: String::new(), webhook_retries: 5, webhook_timeout_ms: 5_000 }
    }
}

impl Options for OutboundOptions {
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        env_override(env, "CONV_OUTBOUND_WEBHOOK_URL", &mut self.webhook_url)?;
        env_override(env, "CONV_OUTBOUND_WEBHOOK_RETRIES", &mut self.webhook_retries)
    }

    fn validate(&self) -> Result<(), String> {
        if !self.webhook_url.is_empty()
            && !self.webhook_url.starts_with("http://")
            && !self.webhook_url.starts_with("https://")
        {
            return Err(format!("CONV_OUTBOUND_WEBHOOK_URL {:?} is not an http(s) URL", self.webhook_url));
        }
        if self.webhook_timeout_ms == 0 {
            return Err("options.webhook_timeout_ms must be positive".into());
        }
        Ok(())
    }
}

/// The configured channel.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
    url: String,
    retries: usize,
}

impl Outbound {
    /// `None` when no URL is configured.
    pub fn new(o: &OutboundOptions) -> Result<Option<Self>, reqwest::Error> {
        if o.webhook_url.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder().timeout(Duration::from_millis(o.webhook_timeout_ms)).build()?;
        Ok(Some(Self { client, url: o.webhook_url.clone(), retries: o.webhook_retries }))
    }

    /// Delivers one finished message, retrying transient failures.
    pub async fn deliver(&self, event: &Envelope, f: &OutMessageFinished) {
        let body = json!({
            "conversation_id": event.conversation_id.as_str(),
            "entry_id": f.entry_id,
            "status": f.status,
            "text": f.text,
            "event_id": event.id,
        });
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_max_times(self.retries)
            .build();
        loop {
            let sent =
                self.client.post(&self.url).header("idempotency-key", event.id.as_str()).json(&body).send().await;
            let error = match sent {
                Ok(r) if r.status().is_success() => return,
                Ok(r) if r.status().as_u16() != 429 && r.status().is_client_error() => {
                    tracing::warn!(message = "Outbound webhook refused a message.", status = %r.status(), event_id = %event.id);
                    return;
                }
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            match backoff.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    tracing::error!(message = "Outbound webhook delivery given up.", %error, event_id = %event.id);
                    return;
                }
            }
        }
    }
}

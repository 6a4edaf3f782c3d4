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
use serde_json::json;

/// The configured channel.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
    url: String,
    retries: usize,
    /// Deliveries refused or given up (`conv_dispatch_failures_total`).
    failures: prometheus::IntCounter,
}

impl Outbound {
    /// `None` when no URL is configured.
    pub fn new(
        o: &crate::options::ProjectionsOptions,
        failures: prometheus::IntCounter,
    ) -> Result<Option<Self>, reqwest::Error> {
        if o.webhook_url.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder().timeout(Duration::from_millis(o.webhook_timeout_ms)).build()?;
        Ok(Some(Self { client, url: o.webhook_url.clone(), retries: o.webhook_retries, failures }))
    }

    /// Delivers one finished message, retrying transient failures.
    pub async fn deliver(&self, event: &Envelope, f: &OutMessageFinished) {
        let body = json!({
            "conversation_id": event.conversation_id().as_str(),
            "entry_id": f.entry_id,
            "status": f.status,
            "text": f.text,
            "event_id": event.id(),
        });
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_max_times(self.retries)
            .build();
        loop {
            let sent = self.client.post(&self.url).header("idempotency-key", event.id()).json(&body).send().await;
            let error = match sent {
                Ok(r) if r.status().is_success() => return,
                Ok(r) if r.status().as_u16() != 429 && r.status().is_client_error() => {
                    tracing::warn!(message = "Outbound webhook refused a message.", status = %r.status(), event_id = %event.id());
                    self.failures.inc();
                    return;
                }
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            match backoff.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    tracing::error!(message = "Outbound webhook delivery given up.", %error, event_id = %event.id());
                    self.failures.inc();
                    return;
                }
            }
        }
    }
}

//! Abuse limits beyond authentication: a request rate per client key, and
//! shedding new work while the pipeline lags.
//!
//! - **Per-key rate** (`CONV_INGRESS_RATE_PER_KEY` requests/s, burst
//!   `CONV_INGRESS_RATE_BURST`): a token bucket per API key; past it `429`
//!   with `Retry-After` (seconds until a request is allowed again). Open
//!   ingress (no keys, loopback only) and callbacks are not limited.
//! - **Overload shedding** (`CONV_INGRESS_SHED_BACKLOG`): ingress reads the
//!   runtime consumers' backlog (pending + unacked, summed over partitions)
//!   every `CONV_INGRESS_SHED_POLL_MS`; above the bound, new messages and
//!   retries get `503` with `Retry-After` — abort and stop are still taken
//!   (they make the backlog smaller), and so are the outcomes of running
//!   effects.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use conv_contracts::payload::Payload;
use conv_contracts::subject::STREAM_IN;
use conv_nats::topology::runtime_consumer;
use tokio_util::sync::CancellationToken;

use crate::core::IngestError;

/// A token bucket per client key (by the key's index in the configuration).
#[derive(Debug)]
pub struct RateLimits {
    rate: f64,
    burst: f64,
    buckets: Mutex<Vec<Option<(f64, Instant)>>>,
}

impl RateLimits {
    /// `rate` requests per second, `burst` at once; `rate` 0 turns limits off.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst: burst.max(1.0), buckets: Mutex::new(Vec::new()) }
    }

    /// Takes one request of key `key`, or tells how long until one is allowed.
    pub fn take(&self, key: usize, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() <= key {
            buckets.resize(key + 1, None);
        }
        let (tokens, at) = buckets[key].unwrap_or((self.burst, now));
        let tokens = (tokens + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            buckets[key] = Some((tokens - 1.0, now));
            Ok(())
        } else {
            buckets[key] = Some((tokens, now));
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

/// Whether new work is being shed, and the backlog last seen.
#[derive(Debug, Default)]
pub struct Shedding {
    on: AtomicBool,
    backlog: AtomicU64,
}

impl Shedding {
    /// Refuses new work (messages, retries) while the pipeline lags.
    pub fn check(&self, data: &Payload) -> Result<(), IngestError> {
        if !self.on.load(Ordering::Relaxed) {
            return Ok(());
        }
        match data {
            Payload::MessageReceived(_) | Payload::RetryRequested(_) => Err(IngestError::Overloaded(format!(
                "the pipeline is behind ({} inputs waiting); try again shortly — abort and stop are still taken",
                self.backlog.load(Ordering::Relaxed)
            ))),
            _ => Ok(()),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    fn set(&self, backlog: u64, bound: u64) {
        self.backlog.store(backlog, Ordering::Relaxed);
        let on = backlog > bound;
        if self.on.swap(on, Ordering::Relaxed) != on {
            if on {
                tracing::warn!(message = "Shedding new messages: the pipeline lags.", backlog, bound);
            } else {
                tracing::info!(message = "Taking new messages again.", backlog, bound);
            }
        }
    }
}

/// Polls the runtime consumers' backlog and switches shedding on and off.
pub async fn watch_backlog(
    js: async_nats::jetstream::Context,
    partitions: u16,
    bound: u64,
    every: Duration,
    shedding: std::sync::Arc<Shedding>,
    shutdown: CancellationToken,
) {
    conv_nats::service::every(every, &shutdown, || async {
        let Ok(stream) = js.get_stream_no_info(STREAM_IN).await else { return };
        let mut backlog = 0u64;
        let mut seen = false;
        for p in 0..partitions {
            let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                stream.get_consumer(&runtime_consumer(p)).await;
            if let Ok(mut c) = consumer
                && let Ok(info) = c.info().await
            {
                backlog += info.num_pending + info.num_ack_pending as u64;
                seen = true;
            }
        }
        // Nothing readable (NATS down, no topology): keep the last decision.
        if seen {
            shedding.set(backlog, bound);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::payload::{AbortRequested, MessageReceived, RetryRequested, StopRequested};

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let limits = RateLimits::new(10.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limits.take(0, t0).is_ok());
        }
        let wait = limits.take(0, t0).expect_err("over the burst");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        // Another key has its own bucket.
        assert!(limits.take(1, t0).is_ok());
        // A tenth of a second later, one more.
        assert!(limits.take(0, t0 + Duration::from_millis(100)).is_ok());
        assert!(limits.take(0, t0 + Duration::from_millis(100)).is_err());
        // Off.
        let off = RateLimits::new(0.0, 1.0);
        for _ in 0..1000 {
            assert!(off.take(0, t0).is_ok());
        }
    }

    #[test]
    fn shedding_refuses_new_work_only() {
        let s = Shedding::default();
        let message = Payload::from(MessageReceived { text: "x".into(), role: None, channel: None, sender: None });
        assert!(s.check(&message).is_ok());
        s.set(11, 10);
        assert!(matches!(s.check(&message), Err(IngestError::Overloaded(_))));
        assert!(matches!(s.check(&Payload::from(RetryRequested {})), Err(IngestError::Overloaded(_))));
        assert!(s.check(&Payload::from(AbortRequested { reason: None })).is_ok());
        assert!(s.check(&Payload::from(StopRequested {})).is_ok());
        s.set(10, 10);
        assert!(s.check(&message).is_ok());
    }
}

//! Effect metrics; labels are the effect kind (`llm`, `tool`) only.

use conv_nats::metrics::Registrar;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub in_flight: IntGauge,
    pub queued: IntGauge,
    pub duration: HistogramVec,
    pub completed: IntCounterVec,
    pub failed: IntCounterVec,
    pub canceled: IntCounterVec,
    pub retries: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub deltas: IntCounter,
    pub live_deltas: IntCounter,
    pub abort_latency: Histogram,
    /// Model call started → first chunk of its answer (the provider's time
    /// to first token, retries included).
    pub first_token: Histogram,
    pub context_dropped: IntCounter,
    /// Directives delivered again after their first delivery.
    pub redeliveries: IntCounter,
    /// Webhook tool calls that failed for good (refused, or retries spent).
    pub dispatch_failures: IntCounter,
    pub retries_in_place: IntCounter,
}

impl Metrics {
    #[rustfmt::skip] // a table: one metric a line
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let r = Registrar(registry);
        let kinds = &["kind"];
        let run_buckets = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let first_token_buckets = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];
        let abort_buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0, 2.5];
        Ok(Self {
            in_flight: r.gauge("conv_effects_in_flight", "effects running on this instance")?,
            queued: r.gauge("conv_effects_queued", "directives waiting for a slot (progress keeps them alive)")?,
            duration: r.histograms("conv_effects_duration_seconds", "effect run time", &run_buckets, kinds)?,
            completed: r.counters("conv_effects_completed_total", "effects completed", kinds)?,
            failed: r.counters("conv_effects_failed_total", "effects failed", kinds)?,
            canceled: r.counters("conv_effects_canceled_total", "effects canceled", kinds)?,
            retries: r.counters("conv_effects_retries_total", "effect attempts retried", kinds)?,
            timeouts: r.counters("conv_effects_timeouts_total", "stalled streams and timed-out calls", kinds)?,
            deltas: r.counter("conv_effects_deltas_total", "coalesced deltas journaled (durable lane)")?,
            live_deltas: r.counter("conv_effects_live_deltas_total", "text pieces sent on the live lane")?,
            context_dropped: r.counter("conv_effects_context_dropped_total", "older context messages left out by the context window")?,
            retries_in_place: r.counter("conv_effects_retries_in_place_total", "lifecycle events retried in place while the journal was unavailable")?,
            redeliveries: r.redeliveries()?,
            dispatch_failures: r.dispatch_failures("webhook_tool")?,
            first_token: r.histogram("conv_llm_first_token_seconds", "model call started → first chunk of its answer (provider time to first token, retries included)", &first_token_buckets)?,
            abort_latency: r.histogram("conv_effects_abort_latency_seconds", "abort/stop accepted → running effect told to stop", &abort_buckets)?,
        })
    }
}

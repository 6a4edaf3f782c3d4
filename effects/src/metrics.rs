//! Effect metrics; labels are the effect kind (`llm`, `tool`) only.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let kinds = &["kind"];
        let dispatch = IntCounterVec::new(
            Opts::new("conv_dispatch_failures_total", "deliveries to an outside endpoint that failed for good"),
            &["target"],
        )?;
        let m = Self {
            in_flight: IntGauge::new("conv_effects_in_flight", "effects running on this instance")?,
            queued: IntGauge::new("conv_effects_queued", "directives waiting for a slot (progress keeps them alive)")?,
            duration: HistogramVec::new(
                HistogramOpts::new("conv_effects_duration_seconds", "effect run time")
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                kinds,
            )?,
            completed: IntCounterVec::new(Opts::new("conv_effects_completed_total", "effects completed"), kinds)?,
            failed: IntCounterVec::new(Opts::new("conv_effects_failed_total", "effects failed"), kinds)?,
            canceled: IntCounterVec::new(Opts::new("conv_effects_canceled_total", "effects canceled"), kinds)?,
            retries: IntCounterVec::new(Opts::new("conv_effects_retries_total", "effect attempts retried"), kinds)?,
            timeouts: IntCounterVec::new(
                Opts::new("conv_effects_timeouts_total", "stalled streams and timed-out calls"),
                kinds,
            )?,
            deltas: IntCounter::new("conv_effects_deltas_total", "coalesced deltas journaled (durable lane)")?,
            live_deltas: IntCounter::new("conv_effects_live_deltas_total", "text pieces sent on the live lane")?,
            context_dropped: IntCounter::new(
                "conv_effects_context_dropped_total",
                "older context messages left out by the context window",
            )?,
            retries_in_place: IntCounter::new(
                "conv_effects_retries_in_place_total",
                "lifecycle events retried in place while the journal was unavailable",
            )?,
            redeliveries: IntCounter::new(
                "conv_redeliveries_total",
                "messages delivered again after their first delivery",
            )?,
            dispatch_failures: dispatch.with_label_values(&["webhook_tool"]),
            first_token: Histogram::with_opts(
                HistogramOpts::new(
                    "conv_llm_first_token_seconds",
                    "model call started → first chunk of its answer (provider time to first token, retries included)",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            )?,
            abort_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "conv_effects_abort_latency_seconds",
                    "abort/stop accepted → running effect told to stop",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0, 2.5]),
            )?,
        };
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(dispatch))?;
        registry.register(Box::new(m.redeliveries.clone()))?;
        registry.register(Box::new(m.queued.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.completed.clone()))?;
        registry.register(Box::new(m.failed.clone()))?;
        registry.register(Box::new(m.canceled.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.timeouts.clone()))?;
        registry.register(Box::new(m.deltas.clone()))?;
        registry.register(Box::new(m.live_deltas.clone()))?;
        registry.register(Box::new(m.abort_latency.clone()))?;
        registry.register(Box::new(m.first_token.clone()))?;
        registry.register(Box::new(m.context_dropped.clone()))?;
        registry.register(Box::new(m.retries_in_place.clone()))?;
        Ok(m)
    }
}

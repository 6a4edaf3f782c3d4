//! Projections metrics (low-cardinality labels only).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub folded: IntCounter,
    /// Output delivered again after its first delivery.
    pub redeliveries: IntCounter,
    /// Outbound webhook deliveries refused or given up.
    pub dispatch_failures: IntCounter,
    pub repeats: IntCounter,
    pub view_writes: IntCounter,
    pub gap_fetches: IntCounter,
    pub holes: IntCounter,
    pub view_lag: Histogram,
    /// Provider text in effects → the live delta in this instance's SSE
    /// fan-out (across hosts, includes their clock difference).
    pub delta_lag: Histogram,
    pub partitions_owned: IntGauge,
    pub rebalances: IntCounter,
    pub readers: IntGauge,
    pub topics: IntGauge,
    pub lagged_readers: IntCounter,
    pub live_deltas: IntCounter,
    pub resets: IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let dispatch = IntCounterVec::new(
            Opts::new("conv_dispatch_failures_total", "deliveries to an outside endpoint that failed for good"),
            &["target"],
        )?;
        let m = Self {
            redeliveries: IntCounter::new(
                "conv_redeliveries_total",
                "messages delivered again after their first delivery",
            )?,
            dispatch_failures: dispatch.with_label_values(&["outbound_webhook"]),
            folded: IntCounter::new("conv_projections_folded_total", "output events folded into views")?,
            repeats: IntCounter::new("conv_projections_repeats_total", "output events already in their view")?,
            view_writes: IntCounter::new("conv_projections_view_writes_total", "view headers written (batched)")?,
            gap_fetches: IntCounter::new(
                "conv_projections_gap_fetches_total",
                "output read back from CONV_OUT to fill a gap in positions",
            )?,
            holes: IntCounter::new(
                "conv_projections_holes_total",
                "positions never found in CONV_OUT and skipped after the hole wait",
            )?,
            view_lag: Histogram::with_opts(
                HistogramOpts::new("conv_projections_view_lag_seconds", "event time → folded into its view")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            delta_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "conv_stream_delta_lag_seconds",
                    "provider text received by effects → live delta in the SSE fan-out",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            )?,
            partitions_owned: IntGauge::new("conv_projections_partitions_owned", "view partitions this instance runs")?,
            rebalances: IntCounter::new("conv_projections_rebalances_total", "view partitions taken or given up")?,
            readers: IntGauge::new("conv_projections_sse_readers", "open SSE readers on this instance")?,
            topics: IntGauge::new("conv_projections_sse_topics", "conversations with SSE readers on this instance")?,
            lagged_readers: IntCounter::new(
                "conv_projections_sse_lagged_total",
                "SSE readers closed because they fell too far behind",
            )?,
            live_deltas: IntCounter::new("conv_projections_live_deltas_total", "live-lane deltas received")?,
            resets: IntCounter::new("conv_projections_sse_resets_total", "reset events sent (live text replaced)")?,
        };
        registry.register(Box::new(dispatch))?;
        registry.register(Box::new(m.redeliveries.clone()))?;
        registry.register(Box::new(m.folded.clone()))?;
        registry.register(Box::new(m.repeats.clone()))?;
        registry.register(Box::new(m.view_writes.clone()))?;
        registry.register(Box::new(m.gap_fetches.clone()))?;
        registry.register(Box::new(m.holes.clone()))?;
        registry.register(Box::new(m.view_lag.clone()))?;
        registry.register(Box::new(m.delta_lag.clone()))?;
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.rebalances.clone()))?;
        registry.register(Box::new(m.readers.clone()))?;
        registry.register(Box::new(m.topics.clone()))?;
        registry.register(Box::new(m.lagged_readers.clone()))?;
        registry.register(Box::new(m.live_deltas.clone()))?;
        registry.register(Box::new(m.resets.clone()))?;
        Ok(m)
    }
}

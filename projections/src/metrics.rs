//! Projections metrics (low-cardinality labels only).

use conv_nats::metrics::Registrar;
use conv_nats::ownership::OwnershipMetrics;
use prometheus::{Histogram, IntCounter, IntGauge, Registry};

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
    /// `conv_projections_partitions_owned`, `conv_projections_rebalances_total`.
    pub ownership: OwnershipMetrics,
    pub readers: IntGauge,
    pub topics: IntGauge,
    pub lagged_readers: IntCounter,
    pub live_deltas: IntCounter,
    pub resets: IntCounter,
}

impl Metrics {
    #[rustfmt::skip] // a table: one metric a line
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let r = Registrar(registry);
        let lag_buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let delta_buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
        Ok(Self {
            redeliveries: r.redeliveries()?,
            dispatch_failures: r.dispatch_failures("outbound_webhook")?,
            folded: r.counter("conv_projections_folded_total", "output events folded into views")?,
            repeats: r.counter("conv_projections_repeats_total", "output events already in their view")?,
            view_writes: r.counter("conv_projections_view_writes_total", "view headers written (batched)")?,
            gap_fetches: r.counter("conv_projections_gap_fetches_total", "output read back from CONV_OUT to fill a gap in positions")?,
            holes: r.counter("conv_projections_holes_total", "positions never found in CONV_OUT and skipped after the hole wait")?,
            view_lag: r.histogram("conv_projections_view_lag_seconds", "event time → folded into its view", &lag_buckets)?,
            delta_lag: r.histogram("conv_stream_delta_lag_seconds", "provider text received by effects → live delta in the SSE fan-out", &delta_buckets)?,
            ownership: r.ownership("conv_projections", "view partitions")?,
            readers: r.gauge("conv_projections_sse_readers", "open SSE readers on this instance")?,
            topics: r.gauge("conv_projections_sse_topics", "conversations with SSE readers on this instance")?,
            lagged_readers: r
                .counter("conv_projections_sse_lagged_total", "SSE readers closed because they fell too far behind")?,
            live_deltas: r.counter("conv_projections_live_deltas_total", "live-lane deltas received")?,
            resets: r.counter("conv_projections_sse_resets_total", "reset events sent (live text replaced)")?,
        })
    }
}

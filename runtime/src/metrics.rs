//! Runtime metrics (low-cardinality labels only: priority class).

use conv_nats::metrics::Registrar;
use conv_nats::ownership::OwnershipMetrics;
use prometheus::{Histogram, HistogramVec, IntCounter, IntGaugeVec, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub apply_seconds: Histogram,
    pub applied: IntCounter,
    pub duplicates: IntCounter,
    pub queue_depth: IntGaugeVec,
    /// Time an input waits in its partition's scheduler, from being queued
    /// (delivered, or its cause applied) to being taken for a group, by
    /// priority (the SLO: P0 p99 ≤ 20 ms).
    pub queue_wait: HistogramVec,
    /// `conv_runtime_partitions_owned`, `conv_runtime_rebalances_total`.
    pub ownership: OwnershipMetrics,
    pub snapshot_writes: IntCounter,
    pub entry_writes: IntCounter,
    pub snapshot_conflicts: IntCounter,
    pub restores: IntCounter,
    pub adopted: IntCounter,
    pub terminated: IntCounter,
    /// Deliveries of an input after its first (a dead owner's, a hand-over,
    /// an ack that came too late).
    pub redeliveries: IntCounter,
}

impl Metrics {
    #[rustfmt::skip] // a table: one metric a line
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let r = Registrar(registry);
        let apply_buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.04, 0.1, 0.25, 1.0];
        let wait_buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0];
        let m = Self {
            apply_seconds: r.histogram("conv_runtime_apply_seconds", "input taken → effects, marker durable, acked", &apply_buckets)?,
            applied: r.counter("conv_runtime_applied_total", "inputs applied")?,
            duplicates: r.counter("conv_runtime_duplicates_total", "inputs skipped as already applied")?,
            queue_depth: r.gauges("conv_runtime_queue_depth", "inputs held by the scheduler, by priority", &["priority"])?,
            queue_wait: r.histograms("conv_runtime_queue_wait_seconds", "input queued in its partition's scheduler → taken for a group, by priority", &wait_buckets, &["priority"])?,
            ownership: r.ownership("conv_runtime", "partitions")?,
            snapshot_writes: r.counter("conv_runtime_snapshot_writes_total", "snapshots written")?,
            entry_writes: r.counter("conv_runtime_entry_writes_total", "conversation entries written to conv_entries (snapshots and LLM contexts)")?,
            snapshot_conflicts: r.counter("conv_runtime_snapshot_conflicts_total", "snapshot writes refused: a stale owner gave its partition up")?,
            restores: r.counter("conv_runtime_restores_total", "conversations loaded from snapshot + journal")?,
            adopted: r.counter("conv_runtime_adopted_total", "inputs applied on load because a previous owner stored their output without their markers")?,
            terminated: r.counter("conv_runtime_terminated_total", "invalid inputs terminated into the DLQ")?,
            redeliveries: r.redeliveries()?,
        };
        for p in conv_contracts::Priority::ALL {
            m.queue_depth.with_label_values(&[p.as_str()]);
            m.queue_wait.with_label_values(&[p.as_str()]);
        }
        Ok(m)
    }
}

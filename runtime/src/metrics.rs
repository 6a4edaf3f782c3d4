//! Runtime metrics (low-cardinality labels only: priority class).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub apply_seconds: Histogram,
    pub applied: IntCounter,
    pub duplicates: IntCounter,
    pub queue_depth: IntGaugeVec,
    pub partitions_owned: IntGauge,
    pub rebalances: IntCounter,
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
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            apply_seconds: Histogram::with_opts(
                HistogramOpts::new("conv_runtime_apply_seconds", "input taken → effects, marker durable, acked")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.04, 0.1, 0.25, 1.0]),
            )?,
            applied: IntCounter::new("conv_runtime_applied_total", "inputs applied")?,
            duplicates: IntCounter::new("conv_runtime_duplicates_total", "inputs skipped as already applied")?,
            queue_depth: IntGaugeVec::new(
                Opts::new("conv_runtime_queue_depth", "inputs held by the scheduler, by priority"),
                &["priority"],
            )?,
            partitions_owned: IntGauge::new("conv_runtime_partitions_owned", "partitions this instance runs")?,
            rebalances: IntCounter::new("conv_runtime_rebalances_total", "partitions taken or given up")?,
            snapshot_writes: IntCounter::new("conv_runtime_snapshot_writes_total", "snapshots written")?,
            entry_writes: IntCounter::new(
                "conv_runtime_entry_writes_total",
                "conversation entries written to conv_entries (snapshots and LLM contexts)",
            )?,
            snapshot_conflicts: IntCounter::new(
                "conv_runtime_snapshot_conflicts_total",
                "snapshot writes refused: a stale owner gave its partition up",
            )?,
            restores: IntCounter::new("conv_runtime_restores_total", "conversations loaded from snapshot + journal")?,
            adopted: IntCounter::new(
                "conv_runtime_adopted_total",
                "inputs applied on load because a previous owner stored their output without their markers",
            )?,
            terminated: IntCounter::new("conv_runtime_terminated_total", "invalid inputs terminated into the DLQ")?,
            redeliveries: IntCounter::new(
                "conv_redeliveries_total",
                "messages delivered again after their first delivery",
            )?,
        };
        registry.register(Box::new(m.apply_seconds.clone()))?;
        registry.register(Box::new(m.redeliveries.clone()))?;
        registry.register(Box::new(m.applied.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.rebalances.clone()))?;
        registry.register(Box::new(m.snapshot_writes.clone()))?;
        registry.register(Box::new(m.entry_writes.clone()))?;
        registry.register(Box::new(m.snapshot_conflicts.clone()))?;
        registry.register(Box::new(m.restores.clone()))?;
        registry.register(Box::new(m.adopted.clone()))?;
        registry.register(Box::new(m.terminated.clone()))?;
        for p in conv_contracts::Priority::ALL {
            m.queue_depth.with_label_values(&[p.as_str()]);
        }
        Ok(m)
    }
}

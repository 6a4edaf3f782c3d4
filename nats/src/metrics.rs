//! Making a service's metrics: each one created and registered in one call,
//! so none is declared and forgotten, and the metrics several services
//! share are spelled once.

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Creates metrics in a registry.
#[derive(Debug, Clone, Copy)]
pub struct Registrar<'a>(pub &'a Registry);

impl Registrar<'_> {
    fn add<C: Collector + Clone + 'static>(&self, metric: C) -> Result<C, prometheus::Error> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help)?)
    }

    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help)?)
    }

    /// A counter with one label per `labels` (low-cardinality values only).
    pub fn counters(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    pub fn gauges(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<prometheus::IntGaugeVec, prometheus::Error> {
        self.add(prometheus::IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A histogram of seconds (or bytes) with these bucket bounds.
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, prometheus::Error> {
        self.add(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?)
    }

    pub fn histograms(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, prometheus::Error> {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?)
    }

    /// `conv_redeliveries_total`: messages delivered again after their
    /// first delivery (every consuming service has it).
    pub fn redeliveries(&self) -> Result<IntCounter, prometheus::Error> {
        self.counter("conv_redeliveries_total", "messages delivered again after their first delivery")
    }

    /// `conv_dispatch_failures_total{target}`: deliveries to an outside
    /// endpoint that failed for good, for this service's `target`.
    pub fn dispatch_failures(&self, target: &str) -> Result<IntCounter, prometheus::Error> {
        let all = self.counters(
            "conv_dispatch_failures_total",
            "deliveries to an outside endpoint that failed for good",
            &["target"],
        )?;
        Ok(all.with_label_values(&[target]))
    }

    /// `<prefix>_partitions_owned` and `<prefix>_rebalances_total` of a
    /// service that owns partitions ([`crate::ownership`]).
    pub fn ownership(&self, prefix: &str, what: &str) -> Result<crate::ownership::OwnershipMetrics, prometheus::Error> {
        Ok(crate::ownership::OwnershipMetrics {
            owned: self.gauge(&format!("{prefix}_partitions_owned"), &format!("{what} this instance runs"))?,
            rebalances: self.counter(&format!("{prefix}_rebalances_total"), &format!("{what} taken or given up"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_made_is_registered_once() {
        let registry = Registry::new();
        let r = Registrar(&registry);
        r.counter("a_total", "a").expect("a").inc();
        r.histogram("b_seconds", "b", &[0.1, 1.0]).expect("b").observe(0.5);
        let o = r.ownership("x", "partitions").expect("ownership");
        o.owned.set(3);
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        assert_eq!(names, ["a_total", "b_seconds", "x_partitions_owned", "x_rebalances_total"]);
        assert!(r.counter("a_total", "again").is_err(), "a name is registered once");
    }
}

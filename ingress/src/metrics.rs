//! Ingress metrics. Labels are low-cardinality: input family and rejection code.

use std::time::Duration;

use conv_contracts::Rejection;
use conv_contracts::subject::STREAM_DLQ;
use conv_nats::metrics::Registrar;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use tokio_util::sync::CancellationToken;

/// Code used for "journal unavailable" in `conv_ingress_rejected_total`.
pub const UNAVAILABLE: &str = "unavailable";

#[derive(Debug, Clone)]
pub struct Metrics {
    pub accepted: IntCounterVec,
    pub rejected: IntCounterVec,
    pub duplicates: IntCounter,
    pub publish_seconds: Histogram,
    pub dlq_messages: IntGauge,
    pub dlq_entries: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let r = Registrar(registry);
        let publish_buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let m = Self {
            accepted: r.counters("conv_ingress_accepted_total", "events journaled, by input family", &["family"])?,
            rejected: r.counters("conv_ingress_rejected_total", "requests refused, by reason code", &["reason"])?,
            duplicates: r.counter("conv_ingress_duplicates_total", "repeats answered from the dedupe window")?,
            publish_seconds: r.histogram(
                "conv_ingress_publish_seconds",
                "publish until JetStream ack",
                &publish_buckets,
            )?,
            dlq_messages: r.gauge("conv_dlq_messages", "messages in CONV_DLQ")?,
            dlq_entries: r.counters(
                "conv_dlq_entries_total",
                "dead letters as they happen, by reason (every ingress instance counts all of them: aggregate with max)",
                &["reason"],
            )?,
        };
        // Pre-create every series so dashboards see zeros, not gaps.
        for reason in ["max_deliveries", "terminated", "stray_subject", "other"] {
            m.dlq_entries.with_label_values(&[reason]);
        }
        for family in ["message", "control", "tool", "llm", "timer"] {
            m.accepted.with_label_values(&[family]);
        }
        for code in Rejection::CODES.iter().chain([&UNAVAILABLE, &"journal_refused", &"not_found"]) {
            m.rejected.with_label_values(&[code]);
        }
        Ok(m)
    }

    pub fn reject(&self, code: &str) {
        self.rejected.with_label_values(&[code]).inc();
    }
}

/// Keeps `conv_dlq_messages` current until shutdown.
pub async fn watch_dlq(
    js: async_nats::jetstream::Context,
    metrics: Metrics,
    every: Duration,
    shutdown: CancellationToken,
) {
    conv_nats::service::every(every, &shutdown, || async {
        if let Ok(mut dlq) = js.get_stream(STREAM_DLQ).await
            && let Ok(info) = dlq.info().await
        {
            metrics.dlq_messages.set(i64::try_from(info.state.messages).unwrap_or(i64::MAX));
        }
    })
    .await;
}

/// Counts dead letters as they happen (`conv_dlq_entries_total{reason}`):
/// a core subscription to what `CONV_DLQ` captures, so the rate is exact
/// while ingress runs, where the polled `conv_dlq_messages` only shows the
/// total every few seconds.
pub async fn count_dead_letters(client: async_nats::Client, metrics: Metrics, shutdown: CancellationToken) {
    use futures::StreamExt;
    let mut subscriptions = Vec::new();
    for subject in conv_nats::topology::dlq_subjects() {
        match client.subscribe(subject.clone()).await {
            Ok(s) => subscriptions.push(s),
            Err(error) => tracing::warn!(message = "Cannot watch a dead-letter subject.", subject, %error),
        }
    }
    let mut all = futures::stream::select_all(subscriptions);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            next = all.next() => match next {
                Some(m) => metrics.dlq_entries.with_label_values(&[conv_nats::topology::dlq_reason(&m.subject)]).inc(),
                None => return,
            },
        }
    }
}

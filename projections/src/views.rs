//! The view workers: one per owned `CONV_OUT` partition (ADR 0006).
//!
//! Partitions are owned like the runtime's (`conv_nats::ownership`, role
//! `views.`), so one instance folds a conversation at a time. A worker pulls
//! its partition's consumer, keeps the views it touches in memory and folds
//! every event **in output position order**: position `p` is folded only
//! after `p − 1`; an early arrival waits; a position already folded is a
//! repeat (acked, ignored). A gap that lasts longer than `gap_wait` is filled
//! by reading the conversation's output back from `CONV_OUT`; a position the
//! stream does not have after `hole_wait` is skipped (logged, counted) so a
//! lost output cannot stall a view forever.
//!
//! Writes are batched: a changed view is written `flush_delay` after its
//! first unwritten change (header, plus a block now and then, see
//! [`conv_store::views`]), with the expected revision; the events folded into it
//! are acked only after that write. A revision conflict means another
//! instance wrote the view: this one is a stale owner and gives the
//! partition up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind, Message, kv};
use chrono::Utc;
use conv_contracts::subject::STREAM_OUT;
use conv_contracts::{ConversationId, Envelope, Limits, Payload};
use conv_nats::topology::{PROJECTIONS_GROUP, projections_consumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::outbound::Outbound;
use conv_core::timeline::Touched;
use conv_store::views::{self as store, StoreError, Stored};

/// Tuning of the view workers.
#[derive(Debug, Clone)]
pub struct ViewsConfig {
    /// A changed view is written this long after its first unwritten change.
    pub flush_delay: Duration,
    /// A gap in positions this old is filled from `CONV_OUT`.
    pub gap_wait: Duration,
    /// A position missing from `CONV_OUT` this long is skipped.
    pub hole_wait: Duration,
    /// Progress for held messages (below the consumer's ack wait).
    pub progress_every: Duration,
    /// A quiet, written view is dropped from memory after this long.
    pub evict_after: Duration,
}

impl Default for ViewsConfig {
    fn default() -> Self {
        Self {
            flush_delay: Duration::from_millis(200),
            gap_wait: Duration::from_millis(500),
            hole_wait: Duration::from_secs(60),
            progress_every: Duration::from_secs(2),
            evict_after: Duration::from_secs(60),
        }
    }
}

/// What the workers share.
#[derive(Debug)]
pub struct Shared {
    pub js: jetstream::Context,
    pub store: kv::Store,
    /// The largest value written to the store (`store::max_value`).
    pub max_value: usize,
    pub outbound: Option<Outbound>,
    pub metrics: Metrics,
    pub config: ViewsConfig,
    /// A span per event folded into a view.
    pub tracer: conv_telemetry::Tracer,
}

/// Starts the view worker of `partition` (for [`conv_nats::ownership`]).
/// Views need no lease check: their writes are revision-checked and
/// idempotent by position, so a late write of a former owner is refused or
/// repeats what is there.
pub fn start(
    shared: &Arc<Shared>,
    partition: u16,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), Stopped>> {
    tokio::spawn(run(partition, shared.clone(), stop))
}

/// Why a view worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("view partition {partition}: {source}")]
    Consumer { partition: u16, source: async_nats::Error },
    #[error("stale owner of view partition {partition}: {source}")]
    Stale { partition: u16, source: StoreError },
}

struct Held {
    seq: u64,
    event: Envelope,
    message: Option<Message>,
}

/// A view in memory.
struct Hot {
    stored: Stored,
    /// Places of entries changed since the last write.
    dirty: BTreeSet<usize>,
    dirty_since: Option<Instant>,
    /// Folded, waiting for the write to be acked.
    unacked: Vec<Message>,
    /// Early arrivals, by position.
    pending: BTreeMap<u64, Held>,
    gap_since: Option<Instant>,
    /// When the stream was last read to fill a gap.
    fetched_at: Option<Instant>,
    /// `CONV_OUT` sequence of the last event folded here.
    last_seq: u64,
    touched: Instant,
}

impl Hot {
    fn new(stored: Stored) -> Self {
        Self {
            stored,
            dirty: BTreeSet::new(),
            dirty_since: None,
            unacked: Vec::new(),
            pending: BTreeMap::new(),
            gap_since: None,
            fetched_at: None,
            last_seq: 0,
            touched: Instant::now(),
        }
    }

    fn position(&self) -> u64 {
        self.stored.view.timeline.position
    }
}

struct Worker {
    partition: u16,
    shared: Arc<Shared>,
    views: HashMap<ConversationId, Hot>,
}

/// Runs view partition `partition` until `stop` (then writes what is dirty
/// and hands held messages back) or until it finds it is a stale owner.
pub async fn run(partition: u16, shared: Arc<Shared>, stop: CancellationToken) -> Result<(), Stopped> {
    let failed = |e: async_nats::Error| Stopped::Consumer { partition, source: e };
    let stream = shared.js.get_stream_no_info(STREAM_OUT).await.map_err(|e| failed(e.into()))?;
    let name = projections_consumer(partition);
    let consumer: PullConsumer = stream.get_consumer(&name).await.map_err(failed)?;
    conv_nats::ownership::take_consumer(&stream, &name, PROJECTIONS_GROUP).await;
    let mut messages = consumer
        .stream()
        .group(PROJECTIONS_GROUP)
        .max_messages_per_batch(1000)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .map_err(|e| failed(e.into()))?;
    let mut w = Worker { partition, shared: shared.clone(), views: HashMap::new() };
    let mut tick = tokio::time::interval(Duration::from_millis(50).min(shared.config.flush_delay));
    let mut last_progress = Instant::now();
    tracing::info!(message = "View partition started.", partition);
    let result = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            _ = tick.tick() => {
                if let Err(stale) = w.flush(false).await {
                    break Err(stale);
                }
                w.gaps().await;
                if last_progress.elapsed() >= shared.config.progress_every {
                    w.progress().await;
                    last_progress = Instant::now();
                }
                w.evict();
            }
            next = messages.next() => match next {
                Some(Ok(m)) => w.accept(m).await,
                Some(Err(error)) => tracing::warn!(message = "View consumer error.", partition, %error),
                None => break Ok(()),
            },
        }
    };
    let flushed = if result.is_ok() { w.flush(true).await } else { Ok(()) };
    // Early arrivals go back at once, for the next owner.
    for hot in w.views.values_mut() {
        for held in std::mem::take(&mut hot.pending).into_values() {
            if let Some(m) = held.message {
                nak(&m).await;
            }
        }
    }
    tracing::info!(message = "View partition stopped.", partition, ok = result.is_ok());
    result.and(flushed)
}

async fn ack(m: &Message) {
    if let Err(error) = m.ack().await {
        tracing::warn!(message = "Failed to ack output.", %error, subject = %m.subject);
    }
}

async fn nak(m: &Message) {
    if let Err(error) = m.ack_with(AckKind::Nak(None)).await {
        tracing::debug!(message = "Failed to hand output back; it is redelivered after the ack wait.", %error);
    }
}

impl Worker {
    async fn accept(&mut self, message: Message) {
        let (seq, delivered) = message.info().map(|i| (i.stream_sequence, i.delivered)).unwrap_or_default();
        if delivered > 1 {
            self.shared.metrics.redeliveries.inc();
        }
        let event = match conv_nats::headers::decode(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            Limits::default(),
        ) {
            Ok(e) => e,
            Err(rejection) => {
                tracing::warn!(message = "Invalid output terminated.", partition = self.partition, seq, reason = %rejection);
                let reason = format!("{}: {rejection}", rejection.code());
                if let Err(error) = conv_nats::consume::term_with_reason(&message, &reason).await {
                    tracing::warn!(message = "Failed to terminate.", %error, seq);
                }
                return;
            }
        };
        let Some(position) = event.position() else {
            tracing::warn!(message = "Output without a position terminated.", partition = self.partition, seq, event_id = %event.id());
            if let Err(error) =
                conv_nats::consume::term_with_reason(&message, "missing_position: output carries no position").await
            {
                tracing::warn!(message = "Failed to terminate.", %error, seq);
            }
            return;
        };
        let conv = event.conversation_id().clone();
        if let Err(error) = self.load(&conv).await {
            tracing::warn!(message = "Cannot load a view; the output comes back.", conversation_id = %conv, %error);
            if let Err(error) = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await {
                tracing::debug!(message = "Failed to nak.", %error);
            }
            return;
        }
        let Some(hot) = self.views.get_mut(&conv) else { return };
        hot.touched = Instant::now();
        if position <= hot.position() || hot.pending.contains_key(&position) {
            self.shared.metrics.repeats.inc();
            ack(&message).await;
            return;
        }
        hot.pending.insert(position, Held { seq, event, message: Some(message) });
        self.drain(&conv).await;
    }

    /// Folds every pending event that is next in position order.
    async fn drain(&mut self, conv: &ConversationId) {
        let shared = self.shared.clone();
        let Some(hot) = self.views.get_mut(conv) else { return };
        loop {
            let next = hot.position() + 1;
            let Some(held) = hot.pending.remove(&next) else { break };
            fold(&shared, hot, held).await;
        }
        hot.gap_since = if hot.pending.is_empty() { None } else { Some(hot.gap_since.unwrap_or_else(Instant::now)) };
    }

    async fn load(&mut self, conv: &ConversationId) -> Result<(), StoreError> {
        if self.views.contains_key(conv) {
            return Ok(());
        }
        let stored = match store::load(&self.shared.store, conv.as_str()).await {
            Ok(Some(s)) => s,
            Ok(None) => Stored::new(conv.as_str()),
            Err(StoreError::Unreadable { conversation, detail }) => {
                // An older format or a damaged value: start over from the journal.
                tracing::warn!(message = "Stored view unreadable; rebuilding it from CONV_OUT.", conversation_id = %conversation, %detail);
                let revision = self.shared.store.entry(conv.as_str()).await.ok().flatten().map(|e| e.revision);
                Stored { revision, ..Stored::new(conv.as_str()) }
            }
            Err(e) => return Err(e),
        };
        self.views.insert(conv.clone(), Hot::new(stored));
        Ok(())
    }

    /// Writes views (those due, or all) and acks what they contain.
    async fn flush(&mut self, all: bool) -> Result<(), Stopped> {
        let delay = self.shared.config.flush_delay;
        let due: Vec<ConversationId> = self
            .views
            .iter()
            .filter(|(_, h)| h.dirty_since.is_some_and(|t| all || t.elapsed() >= delay))
            .map(|(c, _)| c.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let taken: Vec<(ConversationId, Hot)> =
            due.into_iter().filter_map(|c| self.views.remove(&c).map(|h| (c, h))).collect();
        let written: Vec<(ConversationId, Hot, Result<(), StoreError>)> = futures::stream::iter(taken)
            .map(|(conv, mut hot)| {
                let store = self.shared.store.clone();
                let max_value = self.shared.max_value;
                async move {
                    let lowest_pending = hot.pending.values().map(|h| h.seq).min().unwrap_or(u64::MAX);
                    hot.stored.resume_seq = lowest_pending.min(hot.last_seq + 1).max(hot.stored.resume_seq);
                    let result = store::save(&store, &mut hot.stored, &hot.dirty, max_value).await;
                    (conv, hot, result)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut stale = None;
        for (conv, mut hot, result) in written {
            match result {
                Ok(()) => {
                    self.shared.metrics.view_writes.inc();
                    hot.dirty.clear();
                    hot.dirty_since = None;
                    for m in std::mem::take(&mut hot.unacked) {
                        ack(&m).await;
                    }
                    self.views.insert(conv, hot);
                }
                Err(source @ StoreError::Conflict(_)) => stale = Some(source),
                Err(error) => {
                    tracing::warn!(message = "View write failed; will retry.", conversation_id = %conv, %error);
                    // Retried after another flush delay, not at every tick.
                    hot.dirty_since = Some(Instant::now());
                    self.views.insert(conv, hot);
                }
            }
        }
        match stale {
            Some(source) => {
                // Someone else writes these views: give everything back.
                for hot in std::mem::take(&mut self.views).into_values() {
                    for m in hot.unacked.iter().chain(hot.pending.values().filter_map(|h| h.message.as_ref())) {
                        nak(m).await;
                    }
                }
                Err(Stopped::Stale { partition: self.partition, source })
            }
            None => Ok(()),
        }
    }

    /// Fills gaps older than `gap_wait` from `CONV_OUT`; skips positions
    /// still missing after `hole_wait`.
    async fn gaps(&mut self) {
        let cfg = self.shared.config.clone();
        let waiting: Vec<ConversationId> = self
            .views
            .iter()
            .filter(|(_, h)| {
                h.gap_since.is_some_and(|t| t.elapsed() >= cfg.gap_wait)
                    && h.fetched_at.is_none_or(|t| t.elapsed() >= cfg.gap_wait)
            })
            .map(|(c, _)| c.clone())
            .collect();
        for conv in waiting {
            let Some(hot) = self.views.get_mut(&conv) else { continue };
            let (from, upto) = (hot.position(), hot.pending.last_key_value().map(|(p, _)| *p).unwrap_or(0));
            hot.fetched_at = Some(Instant::now());
            self.shared.metrics.gap_fetches.inc();
            let stored = match store::journal_from(&self.shared.js, &conv, hot.stored.resume_seq).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(message = "Cannot read output back to fill a gap.", conversation_id = %conv, %error);
                    continue;
                }
            };
            for (seq, event) in stored {
                if let Some(p) = event.position()
                    && p > from
                    && p < upto
                {
                    hot.pending.entry(p).or_insert(Held { seq, event, message: None });
                }
            }
            let holes_due = hot.gap_since.is_some_and(|t| t.elapsed() >= cfg.hole_wait);
            if holes_due && hot.pending.first_key_value().is_some_and(|(p, _)| *p > hot.position() + 1) {
                let next = hot.pending.first_key_value().map(|(p, _)| *p).unwrap_or(0);
                tracing::error!(
                    message = "Output positions missing from CONV_OUT; skipped.",
                    conversation_id = %conv,
                    from = hot.position() + 1,
                    to = next - 1,
                );
                self.shared.metrics.holes.inc_by(next - 1 - hot.position());
                hot.stored.view.timeline.position = next - 1;
                hot.gap_since = None;
            }
            self.drain(&conv).await;
        }
    }

    async fn progress(&self) {
        for hot in self.views.values() {
            for m in hot.unacked.iter().chain(hot.pending.values().filter_map(|h| h.message.as_ref())) {
                if let Err(error) = m.ack_with(AckKind::Progress).await {
                    tracing::debug!(message = "Failed to send progress.", %error);
                }
            }
        }
    }

    fn evict(&mut self) {
        let after = self.shared.config.evict_after;
        self.views.retain(|_, h| h.dirty_since.is_some() || !h.pending.is_empty() || h.touched.elapsed() < after);
    }
}

/// Folds one event (the next position) into its view.
async fn fold(shared: &Shared, hot: &mut Hot, held: Held) {
    let Held { seq, event, message } = held;
    let position = event.position().unwrap_or_default();
    // The channel adapter: a finished assistant message goes out before the
    // view records it, so a crash means another delivery (deduped by the
    // receiver on `Idempotency-Key`), never none.
    if let (Some(out), Payload::OutMessageFinished(f)) = (&shared.outbound, event.data())
        && hot.stored.view.get(&f.entry_id).is_some_and(|e| e.role == conv_contracts::payload::EntryRole::Assistant)
    {
        out.deliver(&event, f).await;
    }
    match hot.stored.view.apply(position, event.data()) {
        Touched::Entry(i) => {
            hot.dirty.insert(i);
        }
        Touched::Header | Touched::Nothing => {}
    }
    hot.dirty_since.get_or_insert_with(Instant::now);
    hot.last_seq = hot.last_seq.max(seq);
    if let Some(m) = message {
        hot.unacked.push(m);
    }
    shared.metrics.folded.inc();
    if let Some(t) = event.time() {
        let lag = (Utc::now() - t).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
        shared.metrics.view_lag.observe(lag);
    }
    // From the event's time: the span is the view lag of this event.
    let since = event.time().map(std::time::SystemTime::from).unwrap_or_else(std::time::SystemTime::now);
    if let Some(span) = shared.tracer.work("projections.fold", "projections", &event, since) {
        shared
            .tracer
            .finish(span.attr(conv_telemetry::attr::POSITION, position).attr(conv_telemetry::attr::STREAM_SEQ, seq));
    }
}

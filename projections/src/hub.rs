//! The client stream: Server-Sent Events fanned out from one subscription per
//! conversation per instance (ADR 0007).
//!
//! A [`Topic`] per watched conversation subscribes to the conversation's
//! output as it is published (`conv.out.*.<id>`, core NATS) and to its live
//! lane (`conv.live.<id>`). It orders output by position (an early arrival
//! waits; a gap or a quiet running conversation is caught up by reading
//! `CONV_OUT` from the view's resume point), keeps the text of the entry
//! being streamed — durable chunks and live deltas merged by byte offset —
//! and broadcasts items to its readers. Every reader shares the topic;
//! none has a JetStream consumer.
//!
//! What a reader receives:
//! * every output event except the durable `message.delta` chunks, with
//!   `id: <position>`;
//! * the text of a streaming entry as `conv.out.message.delta` events at
//!   token rate (`data.text`, `data.offset`), with
//!   `id: <position>:<entry id>:<offset after it>`;
//! * `conv.out.message.reset` (`data.offset`) when text it was sent live is
//!   not what the answer turned out to be (an effects worker died mid-reply
//!   and a non-deterministic model resumed differently): cut the entry back
//!   to `offset` bytes; what follows replaces it.
//!
//! Joining those deltas (applying resets) gives the final text byte for
//! byte, also across a reconnect with `Last-Event-ID`, which resumes after
//! the position and, within a streaming entry, after the offset. A reader
//! that falls `sse_buffer` items behind gets a final `conv.stream.closed` ([`StreamClosed`])
//! event and is closed; it resumes where it was by reconnecting.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use conv_contracts::api::StreamClosed;
use conv_contracts::live::LiveDelta;
use conv_contracts::payload::{EntryRole, EntryStatus, OutMessageDelta, OutMessageReset};
use conv_contracts::subject;
use conv_contracts::{ConversationId, Envelope, Limits, Payload, binding};
use futures::{Stream, StreamExt};
use tokio::sync::{OnceCell, broadcast};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// CloudEvents `source` of the text events projections make from the live lane.
pub const SOURCE: &str = "/conv/projections";

/// Settings of the fan-out.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Items buffered per conversation; a reader further behind is closed.
    pub buffer: usize,
    pub heartbeat: Duration,
    /// How long a topic outlives its last reader.
    pub linger: Duration,
    /// A gap in positions this old (or a running conversation this quiet) is
    /// caught up from `CONV_OUT`.
    pub catch_up_after: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            buffer: 4096,
            heartbeat: Duration::from_secs(15),
            linger: Duration::from_secs(10),
            catch_up_after: Duration::from_millis(300),
        }
    }
}

/// One SSE frame, rendered once and shared by every reader.
type Frame = Bytes;

fn frame(id: &str, event_type: &str, data: &str) -> Frame {
    let mut s = String::with_capacity(id.len() + event_type.len() + data.len() + 24);
    s.push_str("id: ");
    s.push_str(id);
    s.push_str("\nevent: ");
    s.push_str(event_type);
    s.push_str("\ndata: ");
    s.push_str(data);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// What a topic broadcasts.
#[derive(Debug)]
enum Item {
    /// An output event at its position, with its frame (none for durable
    /// delta chunks, whose text reaches readers as `Text`).
    Durable { position: u64, event: Box<Envelope>, frame: Option<Frame> },
    /// Text of a streaming entry at a byte offset.
    Text { position: u64, entry: String, offset: u64, text: String, frame: Frame },
    /// Cut an entry's text back to `offset`.
    Reset { entry: String, offset: u64 },
}

fn text_frame(conv: &ConversationId, position: u64, entry: &str, offset: u64, text: &str) -> Frame {
    let end = offset + text.len() as u64;
    let event = Envelope::service(
        format!("{conv}.live.{entry}.{offset}"),
        SOURCE,
        conv.clone(),
        OutMessageDelta { entry_id: entry.to_owned(), seq: offset, text: text.to_owned(), offset: Some(offset) },
    );
    let data = binding::to_structured_json(&event).to_string();
    frame(&format!("{position}:{entry}:{end}"), event.event_type().as_str(), &data)
}

fn reset_frame(conv: &ConversationId, position: u64, entry: &str, offset: u64) -> Frame {
    let event = Envelope::service(
        format!("{conv}.reset.{entry}.{offset}"),
        SOURCE,
        conv.clone(),
        OutMessageReset { entry_id: entry.to_owned(), offset },
    );
    let data = binding::to_structured_json(&event).to_string();
    frame(&format!("{position}:{entry}:{offset}"), event.event_type().as_str(), &data)
}

fn durable_frame(position: u64, event: &Envelope) -> Option<Frame> {
    if matches!(event.data(), Payload::OutMessageDelta(_)) {
        return None;
    }
    let data = binding::to_structured_json(event).to_string();
    Some(frame(&position.to_string(), event.event_type().as_str(), &data))
}

/// Length of the longest common prefix of `a` and `b` that ends on a char
/// boundary of both.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !(a.is_char_boundary(n) && b.is_char_boundary(n)) {
        n -= 1;
    }
    n
}

/// The text state of a conversation's stream: positions folded in order and
/// the text of streaming entries. Shared by topics (durable + live) and by
/// readers catching up (durable only).
#[derive(Debug, Default)]
struct TextState {
    position: u64,
    /// Streaming assistant entries: their text as far as known.
    text: HashMap<String, String>,
}

impl TextState {
    /// Folds the next durable event; returns the items to broadcast, in order.
    fn durable(&mut self, conv: &ConversationId, event: Envelope) -> Vec<Item> {
        let position = event.position().unwrap_or(self.position + 1);
        self.position = position;
        let mut items = Vec::new();
        match event.data() {
            Payload::OutMessageAppended(m) if m.role == EntryRole::Assistant && m.status == EntryStatus::Streaming => {
                self.text.insert(m.entry_id.clone(), m.text.clone());
            }
            Payload::OutMessageDelta(d) => {
                let offset = d.offset.unwrap_or_else(|| self.text.get(&d.entry_id).map_or(0, |t| t.len() as u64));
                items.extend(self.merge(conv, &d.entry_id, offset, &d.text).unwrap_or_default());
            }
            Payload::OutMessageFinished(f) => {
                items.extend(self.merge(conv, &f.entry_id, 0, &f.text).unwrap_or_default());
                if let Some(t) = self.text.get(&f.entry_id)
                    && t.len() > f.text.len()
                {
                    items.push(self.reset(&f.entry_id, f.text.len() as u64));
                }
                self.text.remove(&f.entry_id);
            }
            _ => {}
        }
        let frame = durable_frame(position, &event);
        items.push(Item::Durable { position, event: Box::new(event), frame });
        items
    }

    fn reset(&mut self, entry: &str, offset: u64) -> Item {
        if let Some(t) = self.text.get_mut(entry) {
            t.truncate(usize::try_from(offset).unwrap_or(usize::MAX).min(t.len()));
        }
        Item::Reset { entry: entry.to_owned(), offset }
    }

    /// Places `piece` at byte `offset` of `entry`'s text: new bytes extend it
    /// (a `Text` item), bytes that disagree with what is there cut it back
    /// first (a `Reset`). A piece beyond the end is not placed (`None`).
    fn merge(&mut self, conv: &ConversationId, entry: &str, offset: u64, piece: &str) -> Option<Vec<Item>> {
        let position = self.position;
        let known = self.text.get_mut(entry)?;
        let at = usize::try_from(offset).ok()?;
        if at > known.len() || !piece.is_char_boundary(0) {
            return None;
        }
        let mut items = Vec::new();
        let overlap = (known.len() - at).min(piece.len());
        let agree = common_prefix(&known[at..], piece);
        let mut from = overlap;
        if agree < overlap {
            // What was sent from `at + agree` on is wrong: cut it back.
            let cut = at + agree;
            known.truncate(cut);
            items.push(Item::Reset { entry: entry.to_owned(), offset: cut as u64 });
            from = agree;
        }
        if from < piece.len() && piece.is_char_boundary(from) {
            let new = &piece[from..];
            let start = known.len() as u64;
            known.push_str(new);
            items.push(Item::Text {
                position,
                entry: entry.to_owned(),
                offset: start,
                text: new.to_owned(),
                frame: text_frame(conv, position, entry, start, new),
            });
        }
        Some(items)
    }
}

/// Where one reader stands: the last position it has and, within the
/// streaming entry, how many bytes of text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub position: u64,
    pub entry: Option<(String, u64)>,
}

impl Cursor {
    /// Parses a `Last-Event-ID`: `<position>` or `<position>:<entry>:<offset>`.
    pub fn parse(id: &str) -> Option<Self> {
        let id = id.trim();
        let mut parts = id.splitn(2, ':');
        let position = parts.next()?.parse().ok()?;
        let entry = match parts.next() {
            None => None,
            Some(rest) => {
                let (entry, offset) = rest.rsplit_once(':')?;
                Some((entry.to_owned(), offset.parse().ok()?))
            }
        };
        Some(Self { position, entry })
    }

    fn offset_in(&self, entry: &str) -> u64 {
        match &self.entry {
            Some((e, o)) if e == entry => *o,
            _ => 0,
        }
    }

    /// The frames this reader gets for `item`.
    fn frames(&mut self, conv: &ConversationId, item: &Item, out: &mut Vec<Frame>) {
        match item {
            Item::Durable { position, event, frame } => {
                if *position <= self.position {
                    return;
                }
                self.position = *position;
                match event.data() {
                    Payload::OutMessageAppended(m) if m.role == EntryRole::Assistant => {
                        self.entry = Some((m.entry_id.clone(), m.text.len() as u64));
                    }
                    // A durable chunk: the part of it this reader lacks.
                    Payload::OutMessageDelta(d) => {
                        let offset = d.offset.unwrap_or_else(|| self.offset_in(&d.entry_id));
                        self.text(conv, &d.entry_id, offset, &d.text, None, out);
                    }
                    // The final text: the rest of it (or a cut, if more was sent).
                    Payload::OutMessageFinished(f) => {
                        let have = self.offset_in(&f.entry_id);
                        if have > f.text.len() as u64 {
                            out.push(reset_frame(conv, self.position, &f.entry_id, f.text.len() as u64));
                        } else {
                            self.text(conv, &f.entry_id, 0, &f.text, None, out);
                        }
                        if self.entry.as_ref().is_some_and(|(e, _)| *e == f.entry_id) {
                            self.entry = None;
                        }
                    }
                    _ => {}
                }
                out.extend(frame.iter().cloned());
            }
            Item::Text { position, entry, offset, text, frame } => {
                self.text(conv, entry, *offset, text, Some((*position, frame)), out);
            }
            Item::Reset { entry, offset } => {
                if self.offset_in(entry) > *offset {
                    out.push(reset_frame(conv, self.position, entry, *offset));
                    self.entry = Some((entry.clone(), *offset));
                }
            }
        }
    }

    /// Text of `entry` at byte `offset`: the part beyond what this reader has
    /// (the shared frame when it fits exactly).
    fn text(
        &mut self,
        conv: &ConversationId,
        entry: &str,
        offset: u64,
        text: &str,
        shared: Option<(u64, &Frame)>,
        out: &mut Vec<Frame>,
    ) {
        let have = self.offset_in(entry);
        let end = offset + text.len() as u64;
        if end <= have || offset > have {
            return;
        }
        match shared {
            Some((position, frame)) if offset == have && position == self.position => out.push(frame.clone()),
            _ => {
                let skip = usize::try_from(have - offset).unwrap_or(usize::MAX);
                if !text.is_char_boundary(skip) {
                    return;
                }
                out.push(text_frame(conv, self.position, entry, have, &text[skip..]));
            }
        }
        self.entry = Some((entry.to_owned(), end));
    }
}

struct TopicState {
    text: TextState,
    /// Durable items of positions `base + 1 ..= text.position`, oldest first.
    ring: VecDeque<Arc<Item>>,
    base: u64,
    /// Early arrivals by position.
    early: BTreeMap<u64, Envelope>,
    /// Live deltas of entries not (yet) known, or beyond the known text.
    live_early: HashMap<String, BTreeMap<u64, String>>,
    /// Bytes held in `live_early`.
    live_early_bytes: usize,
    /// Entries that finished recently: late live pieces for them are dropped.
    finished: VecDeque<String>,
    gap_since: Option<Instant>,
    last_durable: Instant,
    running: bool,
}

/// One watched conversation on this instance.
struct Topic {
    conv: ConversationId,
    state: Mutex<TopicState>,
    tx: broadcast::Sender<Arc<Item>>,
    readers: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("conv", &self.conv).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running conversation without durable output this long is caught up
/// from the stream (a last resort against output lost in transit).
const QUIET_RUN: Duration = Duration::from_secs(15);

/// Recently finished entries remembered per topic.
const FINISHED_KEPT: usize = 64;

/// Cap on live text held for entries this topic does not know yet.
const LIVE_EARLY_BYTES: usize = 1 << 20;

impl Topic {
    fn publish(&self, st: &mut TopicState, items: Vec<Item>, cap: usize) {
        for item in items {
            let item = Arc::new(item);
            if matches!(*item, Item::Durable { .. }) {
                st.ring.push_back(item.clone());
                while st.ring.len() > cap {
                    if let Some(old) = st.ring.pop_front()
                        && let Item::Durable { position, .. } = *old
                    {
                        st.base = position;
                    }
                }
            }
            // No receiver is fine: readers come and go.
            let _ = self.tx.send(item);
        }
    }

    /// Folds a durable event (from the subscription or a catch-up read).
    fn durable(&self, event: Envelope, cap: usize) {
        let Some(position) = event.position() else { return };
        let mut st = lock(&self.state);
        if position <= st.text.position {
            return;
        }
        st.early.entry(position).or_insert(event);
        loop {
            let next = st.text.position + 1;
            let Some(event) = st.early.remove(&next) else { break };
            if let Payload::OutRunStatus(r) = event.data() {
                st.running = r.status == conv_contracts::payload::RunStatus::Running;
            }
            let entry = match event.data() {
                Payload::OutMessageAppended(m) => Some(m.entry_id.clone()),
                Payload::OutMessageDelta(d) => Some(d.entry_id.clone()),
                Payload::OutMessageFinished(f) => {
                    if let Some(dropped) = st.live_early.remove(&f.entry_id) {
                        st.live_early_bytes -= dropped.values().map(String::len).sum::<usize>();
                    }
                    st.finished.push_back(f.entry_id.clone());
                    if st.finished.len() > FINISHED_KEPT {
                        st.finished.pop_front();
                    }
                    None
                }
                _ => None,
            };
            let items = st.text.durable(&self.conv, event);
            self.publish(&mut st, items, cap);
            if let Some(entry) = entry {
                self.place_live(&mut st, &entry, cap);
            }
            st.last_durable = Instant::now();
        }
        st.gap_since = if st.early.is_empty() { None } else { Some(st.gap_since.unwrap_or_else(Instant::now)) };
    }

    /// Live deltas waiting for their entry or for the text before them.
    fn place_live(&self, st: &mut TopicState, entry: &str, cap: usize) {
        loop {
            let Some(known) = st.text.text.get(entry).map(String::len) else { return };
            let Some(waiting) = st.live_early.get_mut(entry) else { return };
            // Pieces that end inside the known text add nothing.
            let before: usize = waiting.values().map(String::len).sum();
            waiting.retain(|o, t| *o as usize + t.len() > known);
            let after: usize = waiting.values().map(String::len).sum();
            st.live_early_bytes -= before - after;
            let Some(waiting) = st.live_early.get_mut(entry) else { return };
            let Some((&offset, _)) = waiting.first_key_value().filter(|(o, _)| **o as usize <= known) else {
                if waiting.is_empty() {
                    st.live_early.remove(entry);
                }
                return;
            };
            let piece = waiting.remove(&offset).unwrap_or_default();
            st.live_early_bytes -= piece.len();
            let Some(items) = st.text.merge(&self.conv, entry, offset, &piece) else { return };
            self.publish(st, items, cap);
        }
    }

    fn live(&self, delta: LiveDelta, cap: usize, metrics: &Metrics) {
        let mut st = lock(&self.state);
        match st.text.merge(&self.conv, &delta.entry_id, delta.offset, &delta.text) {
            Some(items) => {
                metrics.resets.inc_by(items.iter().filter(|i| matches!(i, Item::Reset { .. })).count() as u64);
                self.publish(&mut st, items, cap);
                self.place_live(&mut st, &delta.entry_id, cap);
            }
            None if st.finished.contains(&delta.entry_id) => {} // late: the entry is done
            None => {
                if st.live_early_bytes + delta.text.len() <= LIVE_EARLY_BYTES {
                    let len = delta.text.len();
                    let waiting = st.live_early.entry(delta.entry_id).or_default();
                    if let Some(old) = waiting.insert(delta.offset, delta.text) {
                        st.live_early_bytes -= old.len();
                    }
                    st.live_early_bytes += len;
                }
            }
        }
    }
}

/// The SSE fan-out of one instance.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    client: async_nats::Client,
    js: jetstream::Context,
    store: kv::Store,
    /// One cell per watched conversation: the first reader opens the topic,
    /// the others wait for it.
    topics: Mutex<HashMap<ConversationId, Arc<OnceCell<Arc<Topic>>>>>,
    metrics: Metrics,
    config: HubConfig,
    shutdown: CancellationToken,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot subscribe to the conversation: {0}")]
    Subscribe(String),
    #[error("cannot read the conversation's output: {0}")]
    Read(#[from] conv_store::views::ReadError),
}

impl Hub {
    pub fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        store: kv::Store,
        metrics: Metrics,
        config: HubConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let hub = Self {
            inner: Arc::new(HubInner {
                client,
                js,
                store,
                topics: Mutex::new(HashMap::new()),
                metrics,
                config,
                shutdown,
            }),
        };
        tokio::spawn(hub.clone().reap());
        hub
    }

    /// Ends topics whose last reader left more than `linger` ago.
    async fn reap(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let linger = self.inner.config.linger;
            let mut topics = lock(&self.inner.topics);
            topics.retain(|_, cell| {
                let Some(t) = cell.get() else { return true }; // still opening
                let idle = t.readers.load(Ordering::SeqCst) == 0
                    && lock(&t.idle_since).is_some_and(|since| since.elapsed() >= linger);
                if idle {
                    t.stop.cancel();
                }
                !idle
            });
            self.inner.metrics.topics.set(i64::try_from(topics.len()).unwrap_or(0));
        }
        for (_, cell) in lock(&self.inner.topics).drain() {
            if let Some(t) = cell.get() {
                t.stop.cancel();
            }
        }
    }

    async fn topic(&self, conv: &ConversationId) -> Result<Arc<Topic>, StreamError> {
        let cell = {
            let mut topics = lock(&self.inner.topics);
            let cell = topics.entry(conv.clone()).or_default().clone();
            self.inner.metrics.topics.set(i64::try_from(topics.len()).unwrap_or(0));
            cell
        };
        cell.get_or_try_init(|| self.open(conv)).await.cloned()
    }

    /// Subscribes, then catches up from the stored view's resume point.
    async fn open(&self, conv: &ConversationId) -> Result<Arc<Topic>, StreamError> {
        let inner = &self.inner;
        let out = inner
            .client
            .subscribe(subject::out_published_filter(conv))
            .await
            .map_err(|e| StreamError::Subscribe(e.to_string()))?;
        let live = inner
            .client
            .subscribe(subject::live_subject(conv))
            .await
            .map_err(|e| StreamError::Subscribe(e.to_string()))?;
        let (tx, _) = broadcast::channel(inner.config.buffer);
        let topic = Arc::new(Topic {
            conv: conv.clone(),
            state: Mutex::new(TopicState {
                text: TextState::default(),
                ring: VecDeque::new(),
                base: 0,
                early: BTreeMap::new(),
                live_early: HashMap::new(),
                live_early_bytes: 0,
                finished: VecDeque::new(),
                gap_since: None,
                last_durable: Instant::now(),
                running: false,
            }),
            tx,
            readers: AtomicUsize::new(0),
            // Reaped after `linger` unless a reader comes.
            idle_since: Mutex::new(Some(Instant::now())),
            stop: inner.shutdown.child_token(),
        });
        // Short conversations are read whole, so new readers need no history
        // read of their own; long ones start at the stored view.
        let cap = inner.config.buffer;
        let head =
            conv_store::views::head(&inner.store, conv.as_str()).await.map_err(conv_store::views::ReadError::from)?;
        if let Some(head) = head.filter(|h| h.position > (cap / 2) as u64) {
            let mut st = lock(&topic.state);
            st.text.position = head.position;
            st.base = head.position;
            for e in head.tail {
                if e.role == EntryRole::Assistant && e.status == EntryStatus::Streaming {
                    st.text.text.insert(e.id, e.text);
                }
            }
        }
        self.catch_up(&topic).await?;
        tokio::spawn(self.clone().follow(topic.clone(), out, live));
        Ok(topic)
    }

    /// Reads the output stored after the topic's position from `CONV_OUT`.
    async fn catch_up(&self, topic: &Topic) -> Result<(), StreamError> {
        let position = lock(&topic.state).text.position;
        let start = if position == 0 {
            0
        } else {
            conv_store::views::head(&self.inner.store, topic.conv.as_str())
                .await
                .map_err(conv_store::views::ReadError::from)?
                .filter(|h| h.position <= position)
                .map_or(0, |h| h.resume_seq)
        };
        let stored = conv_store::views::journal_from(&self.inner.js, &topic.conv, start).await?;
        for (_, event) in stored {
            topic.durable(event, self.inner.config.buffer);
        }
        Ok(())
    }

    async fn follow(self, topic: Arc<Topic>, mut out: async_nats::Subscriber, mut live: async_nats::Subscriber) {
        let cap = self.inner.config.buffer;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // Core subscriptions lose what is published while the connection is
        // down: a reconnect means catching up from the stream.
        let connects = || self.inner.client.statistics().connects.load(Ordering::Relaxed);
        let mut seen_connects = connects();
        loop {
            tokio::select! {
                biased;
                _ = topic.stop.cancelled() => break,
                Some(m) = live.next() => {
                    self.inner.metrics.live_deltas.inc();
                    if let Some(d) = LiveDelta::from_bytes(&m.payload) {
                        if let Some(at) = d.time {
                            let lag = (chrono::Utc::now() - at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                            self.inner.metrics.delta_lag.observe(lag);
                        }
                        topic.live(d, cap, &self.inner.metrics);
                    }
                }
                Some(m) = out.next() => {
                    if let Ok(event) = conv_nats::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, Limits::default()) {
                        topic.durable(event, cap);
                    }
                }
                _ = tick.tick() => {
                    let due = {
                        let st = lock(&topic.state);
                        let after = self.inner.config.catch_up_after;
                        st.gap_since.is_some_and(|t| t.elapsed() >= after)
                            || (st.running && st.last_durable.elapsed() >= QUIET_RUN)
                    };
                    let reconnected = connects() != seen_connects;
                    seen_connects = connects();
                    let due = due || reconnected;
                    if due {
                        if let Err(error) = self.catch_up(&topic).await {
                            tracing::warn!(message = "Stream catch-up failed.", conversation_id = %topic.conv, %error);
                        }
                        lock(&topic.state).last_durable = Instant::now();
                    }
                }
            }
        }
        let _ = out.unsubscribe().await;
        let _ = live.unsubscribe().await;
    }

    /// The SSE body of one reader, resuming after `cursor`.
    pub async fn stream(
        &self,
        conv: &ConversationId,
        cursor: Cursor,
    ) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, StreamError> {
        let topic = self.topic(conv).await?;
        topic.readers.fetch_add(1, Ordering::SeqCst);
        *lock(&topic.idle_since) = None;
        let guard = ReaderGuard { topic: topic.clone(), metrics: self.inner.metrics.clone() };
        self.inner.metrics.readers.inc();
        // A consistent cut: what the topic has, and everything after it.
        let (rx, ring, base, text) = {
            let st = lock(&topic.state);
            (topic.tx.subscribe(), st.ring.iter().cloned().collect::<Vec<_>>(), st.base, st.text.text.clone())
        };
        let mut cursor = cursor;
        let mut first = Vec::new();
        if cursor.position < base {
            // Older than what the topic keeps: read it back from the stream.
            let stored = conv_store::views::journal_from(&self.inner.js, conv, 0).await?;
            let mut events: BTreeMap<u64, Envelope> = BTreeMap::new();
            for (_, e) in stored {
                if let Some(p) = e.position()
                    && p <= base
                {
                    events.entry(p).or_insert(e);
                }
            }
            let mut replay = TextState::default();
            for (_, e) in events {
                for item in replay.durable(conv, e) {
                    cursor.frames(conv, &item, &mut first);
                }
            }
        }
        for item in &ring {
            cursor.frames(conv, item, &mut first);
        }
        // Streaming entries' text as the topic knows it (live included).
        for (entry, known) in &text {
            if (known.len() as u64) < cursor.offset_in(entry) {
                cursor.frames(conv, &Item::Reset { entry: entry.clone(), offset: known.len() as u64 }, &mut first);
            }
            cursor.text(conv, entry, 0, known, None, &mut first);
        }
        let conv = conv.clone();
        let heartbeat = self.inner.config.heartbeat;
        let buffer = self.inner.config.buffer;
        let state = Reader { rx, cursor, conv, guard, pending: first.into(), closed: false };
        let body = futures::stream::unfold(state, move |mut r| async move {
            loop {
                if let Some(f) = r.pending.pop_front() {
                    return Some((Ok(f), r));
                }
                if r.closed {
                    return None;
                }
                let stop = r.guard.topic.stop.clone();
                let next = tokio::select! {
                    _ = stop.cancelled() => return None,
                    next = tokio::time::timeout(heartbeat, r.rx.recv()) => next,
                };
                match next {
                    Err(_) => return Some((Ok(Bytes::from_static(b": heartbeat\n\n")), r)),
                    Ok(Ok(item)) => {
                        let mut frames = Vec::new();
                        r.cursor.frames(&r.conv, &item, &mut frames);
                        r.pending.extend(frames);
                    }
                    Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                        r.guard.metrics.lagged_readers.inc();
                        let data = StreamClosed {
                            reason: "lagged".into(),
                            message: format!(
                                "this reader fell {n} events behind (buffer {buffer}); reconnect with Last-Event-ID to resume"
                            ),
                        };
                        r.pending.push_back(Bytes::from(data.frame()));
                        r.closed = true;
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                }
            }
        });
        Ok(body)
    }
}

struct Reader {
    rx: broadcast::Receiver<Arc<Item>>,
    cursor: Cursor,
    conv: ConversationId,
    guard: ReaderGuard,
    pending: VecDeque<Frame>,
    closed: bool,
}

/// Counts a reader in its topic while its body lives.
struct ReaderGuard {
    topic: Arc<Topic>,
    metrics: Metrics,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.metrics.readers.dec();
        if self.topic.readers.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&self.topic.idle_since) = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::EventType;
    use conv_contracts::payload::*;

    fn conv() -> ConversationId {
        ConversationId::parse("c").expect("id")
    }

    fn out(position: u64, data: impl Into<Payload>) -> Envelope {
        Envelope::new(format!("e{position}"), "/t", conv(), data).expect("valid event").with_position(position)
    }

    fn appended(p: u64) -> Envelope {
        out(
            p,
            OutMessageAppended {
                entry_id: "a".into(),
                role: EntryRole::Assistant,
                text: String::new(),
                status: EntryStatus::Streaming,
            },
        )
    }

    /// What a reader ends up with: the entry's text with resets applied.
    fn read(items: &[Item], cursor: &mut Cursor) -> String {
        let mut frames = Vec::new();
        for i in items {
            cursor.frames(&conv(), i, &mut frames);
        }
        let mut text = String::new();
        for f in frames {
            let s = String::from_utf8(f.to_vec()).expect("utf8");
            let data: serde_json::Value =
                serde_json::from_str(s.lines().find_map(|l| l.strip_prefix("data: ")).expect("data")).expect("json");
            match data["type"].as_str().and_then(|t| t.parse::<EventType>().ok()) {
                Some(EventType::OutMessageDelta) => text.push_str(data["data"]["text"].as_str().expect("text")),
                Some(EventType::OutMessageReset) => {
                    text.truncate(data["data"]["offset"].as_u64().expect("offset") as usize)
                }
                _ => {}
            }
        }
        text
    }

    #[test]
    fn live_and_durable_text_merge_without_repeats() {
        let mut st = TextState::default();
        let mut items = st.durable(&conv(), appended(1));
        items.extend(st.merge(&conv(), "a", 0, "Hel").expect("placed"));
        items.extend(st.merge(&conv(), "a", 3, "lo ").expect("placed"));
        // The durable chunk covers what live already sent.
        items.extend(st.durable(
            &conv(),
            out(2, OutMessageDelta { entry_id: "a".into(), seq: 0, text: "Hello".into(), offset: Some(0) }),
        ));
        items.extend(st.merge(&conv(), "a", 6, "world").expect("placed"));
        items.extend(st.durable(
            &conv(),
            out(
                3,
                OutMessageFinished {
                    entry_id: "a".into(),
                    status: EntryStatus::Completed,
                    text: "Hello world!".into(),
                },
            ),
        ));
        assert_eq!(read(&items, &mut Cursor::default()), "Hello world!");
    }

    #[test]
    fn a_resumed_answer_that_differs_resets_the_live_text() {
        let mut st = TextState::default();
        let mut items = st.durable(&conv(), appended(1));
        items.extend(st.merge(&conv(), "a", 0, "Hello ").expect("placed"));
        items.extend(st.merge(&conv(), "a", 6, "wor").expect("placed"));
        // Effects died after the durable "Hello "; the resumed run says "there".
        items.extend(st.merge(&conv(), "a", 6, "there").expect("placed"));
        items.extend(st.durable(
            &conv(),
            out(
                2,
                OutMessageFinished { entry_id: "a".into(), status: EntryStatus::Completed, text: "Hello there".into() },
            ),
        ));
        assert!(items.iter().any(|i| matches!(i, Item::Reset { offset: 6, .. })));
        assert_eq!(read(&items, &mut Cursor::default()), "Hello there");
    }

    #[test]
    fn a_reader_resuming_mid_entry_gets_only_the_rest() {
        let mut st = TextState::default();
        let mut items = st.durable(&conv(), appended(1));
        items.extend(st.merge(&conv(), "a", 0, "Hello ").expect("placed"));
        items.extend(st.merge(&conv(), "a", 6, "world").expect("placed"));
        let mut first = Cursor::default();
        let seen = read(&items[..2], &mut first);
        assert_eq!(seen, "Hello ");
        let id = format!("{}:{}:{}", first.position, "a", 6);
        let mut resumed = Cursor::parse(&id).expect("id");
        items.extend(st.durable(
            &conv(),
            out(
                2,
                OutMessageFinished { entry_id: "a".into(), status: EntryStatus::Completed, text: "Hello world".into() },
            ),
        ));
        let rest = read(&items, &mut resumed);
        assert_eq!(format!("{seen}{rest}"), "Hello world");
    }

    #[test]
    fn cursor_ids_round_trip() {
        assert_eq!(Cursor::parse("7"), Some(Cursor { position: 7, entry: None }));
        assert_eq!(Cursor::parse("7:r1.s1.a1:42"), Some(Cursor { position: 7, entry: Some(("r1.s1.a1".into(), 42)) }));
        assert_eq!(Cursor::parse("x"), None);
    }
}

//! OpenTelemetry traces of conv, exported over OTLP/HTTP with JSON bodies.
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set
//! ([`Config`]); then every service records a span for each event it
//! journals and for the work it does on each event it consumes.
//!
//! **Ids are derived, not propagated** (ADR 0011). One user message is one
//! trace: its id is a digest of the event's correlation id (the root event's
//! id, which `Envelope::caused_by` hands down), so every event the message
//! causes — directives, effect events, outputs — lands in its trace. An
//! event's own span id is a digest of its id ([`event_span_id`]), and the
//! span of the work a service does on an event is a digest of the event id
//! and the worker's name ([`work_span_id`]), a child of the event's span. A
//! producer gives an event's span the parent it knows (the work that emitted
//! it); a consumer needs nothing but the envelope to find its parent. No
//! header is carried, nothing changes in the journal, replay stays exact, and
//! a redelivered event is traced into the same trace on any instance.
//!
//! Spans are queued without waiting (a full queue drops and counts them,
//! `conv_trace_spans_total{outcome="dropped"}`) and sent in batches by one
//! task per process; [`Tracer::flush`] sends what is queued before a service
//! stops.

mod config;
mod export;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use conv_contracts::Envelope;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub use config::{Config, ConfigError, ENV_HELP, Sampler};

/// Span attribute keys (OpenTelemetry style: dotted, lower case).
pub mod attr {
    pub const CONVERSATION_ID: &str = "conversation.id";
    pub const EVENT_ID: &str = "event.id";
    pub const EVENT_TYPE: &str = "event.type";
    /// The event's sequence in the stream that stored it.
    pub const STREAM_SEQ: &str = "stream.sequence";
    pub const PARTITION: &str = "partition";
    /// The applied marker's `CONV_APPLIED` sequence.
    pub const MARKER_SEQ: &str = "marker.sequence";
    /// Events an input emitted.
    pub const EMITTED: &str = "emitted";
    /// An output's position in its conversation.
    pub const POSITION: &str = "position";
    pub const REDELIVERED: &str = "redelivered";
    /// Effects a cancel stopped on this instance.
    pub const STOPPED: &str = "effects.stopped";
}

/// A 16-byte trace id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// An all-zero id is invalid in OTLP: one bit is set instead.
fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id.iter().all(|b| *b == 0) {
        id[N - 1] = 1;
    }
    id
}

impl TraceId {
    /// The trace of the causal chain `event` belongs to: its correlation id
    /// (the root's id), or its own id when it is a root — within its
    /// conversation (ids clients choose repeat across conversations).
    pub fn of(event: &Envelope) -> TraceId {
        let root = event.correlation_id().unwrap_or(event.id());
        let d = digest(&["conv-trace", event.conversation_id().as_str(), root]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        TraceId(nonzero(id))
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl SpanId {
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// An id of its own for a span no one links to by id (an attempt that
    /// was handed back, one instance's share of a cancel): from the time,
    /// this process and a counter.
    pub fn unique() -> SpanId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        span_id(&["conv-unique", &std::process::id().to_string(), &nanos.to_string(), &n.to_string()])
    }
}

fn span_id(parts: &[&str]) -> SpanId {
    let d = digest(parts);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    SpanId(nonzero(id))
}

/// The span of the event with this id in `conversation` (recorded by its producer).
pub fn event_span_id(conversation: &str, event_id: &str) -> SpanId {
    span_id(&["conv-event", conversation, event_id])
}

/// The span of `worker`'s work on the event with this id in `conversation`.
pub fn work_span_id(conversation: &str, event_id: &str, worker: &str) -> SpanId {
    span_id(&["conv-work", worker, conversation, event_id])
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// OTLP span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

/// A span being recorded; [`Tracer::finish`] ends and queues it.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: Option<SystemTime>,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the work failed.
    pub error: Option<String>,
}

impl Span {
    /// The span of `event` itself, recorded by its producer: named by its
    /// type, a child of `parent` (the work that emitted it; `None`: the
    /// span of its cause, if any).
    pub fn event(event: &Envelope, parent: Option<SpanId>, start: SystemTime) -> Span {
        let conversation = event.conversation_id().as_str();
        let parent = parent.or_else(|| event.causation_id().map(|c| event_span_id(conversation, c)));
        Span {
            trace_id: TraceId::of(event),
            span_id: event_span_id(conversation, event.id()),
            parent,
            name: Cow::Borrowed(event.event_type().as_str()),
            kind: Kind::Producer,
            start,
            end: None,
            attributes: Vec::new(),
            error: None,
        }
        .with_event(event)
    }

    /// The span of `worker`'s work on `event`, a child of the event's span.
    pub fn work(name: &'static str, worker: &str, event: &Envelope, start: SystemTime) -> Span {
        let conversation = event.conversation_id().as_str();
        Span {
            trace_id: TraceId::of(event),
            span_id: work_span_id(conversation, event.id(), worker),
            parent: Some(event_span_id(conversation, event.id())),
            name: Cow::Borrowed(name),
            kind: Kind::Consumer,
            start,
            end: None,
            attributes: Vec::new(),
            error: None,
        }
        .with_event(event)
    }

    fn with_event(self, event: &Envelope) -> Span {
        self.attr(attr::CONVERSATION_ID, event.conversation_id().as_str())
            .attr(attr::EVENT_ID, event.id())
            .attr(attr::EVENT_TYPE, event.event_type().as_str())
    }

    pub fn attr(mut self, key: &'static str, value: impl Into<Value>) -> Span {
        self.attributes.push((key, value.into()));
        self
    }

    /// The same span under another id (its children link to the id it had).
    pub fn with_id(mut self, id: SpanId) -> Span {
        self.span_id = id;
        self
    }

    pub fn kind(mut self, kind: Kind) -> Span {
        self.kind = kind;
        self
    }

    /// Marks the span failed with `message`.
    pub fn failed(mut self, message: impl Into<String>) -> Span {
        self.error = Some(message.into());
        self
    }
}

/// Where spans go: cheap to clone; does nothing when traces are off.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    queue: mpsc::Sender<export::Command>,
    /// A trace is kept when the low 8 bytes of its id are below this.
    keep_below: u64,
    keep_all: bool,
    spans: prometheus::IntCounterVec,
}

impl Tracer {
    /// A tracer that records nothing.
    pub fn off() -> Tracer {
        Tracer::default()
    }

    /// Starts exporting to `config.endpoint` (off when unset) as
    /// `service` and registers `conv_trace_spans_total` in `registry`.
    /// Must run inside a tokio runtime.
    pub fn start(config: &Config, service: &str, registry: &prometheus::Registry) -> Result<Tracer, StartError> {
        let spans = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "conv_trace_spans_total",
                "Trace spans by outcome: exported, dropped (queue full), failed (the collector refused or was unreachable).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(spans.clone()))?;
        let Some(endpoint) = config.endpoint.clone().filter(|_| config.enabled()) else {
            return Ok(Tracer::off());
        };
        let (keep_all, keep_below) = match config.sampler {
            Sampler::AlwaysOn => (true, u64::MAX),
            Sampler::AlwaysOff => (false, 0),
            Sampler::Ratio(r) if r >= 1.0 => (true, u64::MAX),
            // Truncation is intended: the ratio as a fraction of the id space.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            Sampler::Ratio(r) => (false, (r.max(0.0) * u64::MAX as f64) as u64),
        };
        let (queue, commands) = mpsc::channel(config.max_queue);
        let exporter = export::Exporter::new(config, endpoint.clone(), service, spans.clone())?;
        tokio::spawn(exporter.run(commands, config.schedule_delay, config.max_batch));
        tracing::info!(message = "Exporting traces.", endpoint = %config::redacted(&endpoint));
        Ok(Tracer { inner: Some(Arc::new(Inner { queue, keep_below, keep_all, spans })) })
    }

    /// Whether spans of `event`'s trace are recorded (callers skip building
    /// spans otherwise).
    pub fn traces(&self, event: &Envelope) -> bool {
        match &self.inner {
            None => false,
            Some(i) if i.keep_all => true,
            Some(i) => {
                let id = TraceId::of(event).0;
                let mut low = [0u8; 8];
                low.copy_from_slice(&id[8..]);
                u64::from_be_bytes(low) < i.keep_below
            }
        }
    }

    /// [`Span::event`] if `event`'s trace is recorded.
    pub fn event(&self, event: &Envelope, parent: Option<SpanId>, start: SystemTime) -> Option<Span> {
        self.traces(event).then(|| Span::event(event, parent, start))
    }

    /// [`Span::work`] if `event`'s trace is recorded.
    pub fn work(&self, name: &'static str, worker: &str, event: &Envelope, start: SystemTime) -> Option<Span> {
        self.traces(event).then(|| Span::work(name, worker, event, start))
    }

    /// Ends `span` now (unless it has an end) and queues it for export.
    pub fn finish(&self, mut span: Span) {
        let Some(inner) = &self.inner else { return };
        span.end.get_or_insert_with(SystemTime::now);
        if inner.queue.try_send(export::Command::Span(Box::new(span))).is_err() {
            inner.spans.with_label_values(&["dropped"]).inc();
        }
    }

    /// Finishes `span` if there is one.
    pub fn finish_some(&self, span: Option<Span>) {
        if let Some(span) = span {
            self.finish(span);
        }
    }

    /// Sends every queued span now; waits for at most `within`.
    pub async fn flush(&self, within: Duration) {
        let Some(inner) = &self.inner else { return };
        let (done, sent) = oneshot::channel();
        let asked = tokio::time::timeout(within, inner.queue.send(export::Command::Flush(done))).await;
        if matches!(asked, Ok(Ok(()))) {
            let _ = tokio::time::timeout(within, sent).await;
        }
    }
}

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("trace metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("OTLP exporter: {0}")]
    Client(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::{ConversationId, payload::MessageReceived};

    fn message(id: &str) -> Envelope {
        message_in("c1", id)
    }

    fn message_in(conversation: &str, id: &str) -> Envelope {
        let conv = ConversationId::parse(conversation).expect("id");
        Envelope::new(id, "/test", conv, MessageReceived { text: "hi".into(), role: None, channel: None, sender: None })
            .expect("valid event")
    }

    #[test]
    fn a_chain_shares_one_trace_and_links_by_cause() {
        let user = message("u1");
        let step = message("d1").caused_by(&user);
        let effect = message("e1").caused_by(&step);
        assert_eq!(TraceId::of(&user), TraceId::of(&step));
        assert_eq!(TraceId::of(&user), TraceId::of(&effect), "the correlation id is inherited");
        assert_ne!(TraceId::of(&user), TraceId::of(&message("u2")));

        let root = Span::event(&user, None, SystemTime::now());
        assert_eq!(root.parent, None);
        let work = Span::work("runtime.apply", "runtime", &user, SystemTime::now());
        assert_eq!(work.parent, Some(root.span_id));
        let emitted = Span::event(&step, Some(work.span_id), SystemTime::now());
        assert_eq!(emitted.parent, Some(work.span_id));
        // Without a known producer, the cause's span is the parent.
        assert_eq!(Span::event(&effect, None, SystemTime::now()).parent, Some(event_span_id("c1", "d1")));
        assert_ne!(work_span_id("c1", "u1", "runtime"), work_span_id("c1", "u1", "projections"));
        assert_eq!(event_span_id("c1", "u1").hex().len(), 16);
        // The same client-chosen id in another conversation is another trace.
        let elsewhere = message_in("c2", "u1");
        assert_ne!(TraceId::of(&user), TraceId::of(&elsewhere));
        assert_ne!(event_span_id("c1", "u1"), event_span_id("c2", "u1"));
        assert_eq!(TraceId::of(&user).hex().len(), 32);
    }

    #[tokio::test]
    async fn sampling_is_decided_by_the_trace() {
        let registry = prometheus::Registry::new();
        let config = Config {
            endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
            sampler: Sampler::Ratio(0.5),
            ..Config::default()
        };
        let tracer = Tracer::start(&config, "conv-test", &registry).expect("starts");
        let kept = (0..1000).filter(|i| tracer.traces(&message(&format!("u{i}")))).count();
        assert!((350..650).contains(&kept), "about half the traces: {kept}");
        for i in 0..50 {
            let user = message(&format!("u{i}"));
            let child = message("x").caused_by(&user);
            assert_eq!(tracer.traces(&user), tracer.traces(&child), "one decision per trace");
        }
        let off = Tracer::start(&Config::default(), "conv-test", &prometheus::Registry::new()).expect("off");
        assert!(!off.traces(&message("u1")));
    }
}

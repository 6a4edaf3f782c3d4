//! The JetStream topology of conv as declared data, applied idempotently.
//!
//! [`Topology::declare`] turns a [`TopologyConfig`] into the exact stream,
//! consumer and KV configurations; [`apply`] creates what is missing, updates
//! what drifted and reports every object as created / updated / unchanged;
//! [`check`] reports the same without changing anything. Services only check;
//! `convctl setup` applies.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, IntoConsumerConfig, PriorityPolicy, pull};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType, SubjectTransform};
use async_nats::jetstream::{self, kv};
use conv_contracts::subject::{self, STREAM_APPLIED, STREAM_AUDIT, STREAM_DLQ, STREAM_EFFECT, STREAM_IN, STREAM_OUT};
use conv_contracts::types::Kind;
use serde::{Deserialize, Serialize};

/// Priority group of the per-partition runtime consumers.
pub const RUNTIME_GROUP: &str = "runtime";
/// Shared consumer of effect workers.
pub const EFFECTS_CONSUMER: &str = "effects";
/// Priority group of the per-partition projections consumers.
pub const PROJECTIONS_GROUP: &str = "views";
/// KV bucket of runtime state snapshots.
pub const KV_SNAPSHOTS: &str = "conv_snapshots";
/// KV bucket of the entries of runtime state snapshots, one key per entry
/// (`<conversation>.<place>`); effects read an LLM step's context here.
/// A few revisions are kept so a snapshot head can name the copy it was
/// taken with while newer ones are written.
pub const KV_ENTRIES: &str = "conv_entries";
/// Revisions kept per key of [`KV_ENTRIES`] by default
/// ([`TopologyConfig::entries_history`]).
pub const ENTRIES_HISTORY: i64 = 8;
/// KV bucket of partition ownership leases and membership (runtime and
/// projections). File storage (a memory bucket would be gone after a NATS
/// restart); the entries expire within seconds and are not journal writes.
pub const KV_LEASES: &str = "conv_leases";
/// KV bucket of durable timers.
pub const KV_TIMERS: &str = "conv_timers";
/// KV bucket of projection views.
pub const KV_PROJECTIONS: &str = "conv_projections";

/// Name of the runtime consumer of one `CONV_IN` partition.
pub fn runtime_consumer(partition: u16) -> String {
    format!("runtime-p{partition}")
}

/// Name of the projections consumer of one `CONV_OUT` partition.
pub fn projections_consumer(partition: u16) -> String {
    format!("projections-p{partition}")
}

/// Name of the control-plane consumer of one `CONV_IN` partition: only
/// `conv.in.<p>.control.>`, so abort/stop never queue behind a backlog of
/// deltas in the partition's main consumer (which sees them too; the second
/// copy is a duplicate by event id).
pub fn runtime_control_consumer(partition: u16) -> String {
    format!("runtime-p{partition}-ctl")
}

/// Knobs of the topology. Every field has a default that works on one machine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Number of `CONV_IN` partitions (env `CONV_PARTITIONS`).
    pub partitions: u16,
    /// Stream and KV replicas: 1 on one node, 3 on the cluster (env `CONV_REPLICAS`).
    pub replicas: usize,
    /// How long journal streams keep events, in hours.
    pub journal_max_age_hours: u64,
    /// Bytes each journal stream (`CONV_IN`, `CONV_EFFECT`, `CONV_APPLIED`,
    /// `CONV_OUT`) keeps at most; `-1` is no limit. Past it the oldest events
    /// are discarded, and conversations that reach back to them can no longer
    /// be replayed or rebuilt: size it for `journal_max_age_hours` of traffic.
    pub journal_max_bytes: i64,
    /// How long `CONV_AUDIT` keeps records, in hours.
    pub audit_max_age_hours: u64,
    /// Bytes `CONV_AUDIT` keeps at most; `-1` is no limit.
    pub audit_max_bytes: i64,
    /// How long `CONV_DLQ` keeps dead letters, in hours.
    pub dlq_max_age_hours: u64,
    /// Bytes `CONV_DLQ` keeps at most (oldest dropped first); `-1` is no limit.
    pub dlq_max_bytes: i64,
    /// Dedupe window of every stream (the `Idempotency-Key` window), in seconds.
    pub duplicate_window_secs: u64,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// Ack wait of every consumer, in seconds.
    pub ack_wait_secs: u64,
    /// Ack wait of the runtime's partition consumers, in seconds (the
    /// worker sends progress for what it holds every second).
    pub runtime_ack_wait_secs: u64,
    /// Ack wait of the effects work queue, in seconds: how soon the
    /// directives of a killed effects instance are redelivered (running and
    /// queued directives send progress every `CONV_EFFECTS_PROGRESS_MS`).
    pub effects_ack_wait_secs: u64,
    /// Ack wait of the projections' partition consumers, in seconds (views
    /// ack every flush, so this is how soon a dead instance's output comes back).
    pub projections_ack_wait_secs: u64,
    /// How long a runtime instance stays pinned to a partition without pulling, in seconds.
    pub pinned_ttl_secs: u64,
    /// Lease time-to-live in `conv_leases`, in seconds.
    pub owner_ttl_secs: u64,
    /// Largest message a stream accepts, in bytes (a bit above the 1 MiB event limit for headers).
    pub max_msg_bytes: i32,
    /// Inputs a runtime partition consumer hands out before an ack: how far
    /// the scheduler looks ahead to order by priority.
    pub runtime_max_ack_pending: i64,
    /// Directives the effects work queue hands out before an ack, over all
    /// instances (running plus queued; keep it above the instances' total
    /// `CONV_EFFECTS_CONCURRENCY` or slots stay idle).
    pub effects_max_ack_pending: i64,
    /// Output events a projections partition consumer hands out before an
    /// ack (views ack after each batched write).
    pub projections_max_ack_pending: i64,
    /// Revisions kept per key of `conv_entries`: a snapshot names the copy of
    /// each entry it was taken with, so fewer revisions mean more snapshots
    /// found stale and rebuilt from the journal on load.
    pub entries_history: i64,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            partitions: subject::DEFAULT_PARTITIONS,
            replicas: 1,
            journal_max_age_hours: 24 * 30,
            journal_max_bytes: -1,
            audit_max_age_hours: 24 * 365,
            audit_max_bytes: -1,
            dlq_max_age_hours: 24 * 30,
            dlq_max_bytes: 1 << 30,
            duplicate_window_secs: 120,
            max_deliver: 5,
            ack_wait_secs: 30,
            runtime_ack_wait_secs: 3,
            effects_ack_wait_secs: 3,
            projections_ack_wait_secs: 5,
            pinned_ttl_secs: 3,
            owner_ttl_secs: 2,
            max_msg_bytes: 2 * 1024 * 1024,
            runtime_max_ack_pending: 1000,
            effects_max_ack_pending: 4096,
            projections_max_ack_pending: 20_000,
            entries_history: ENTRIES_HISTORY,
        }
    }
}

impl TopologyConfig {
    pub fn validate(&self) -> Result<(), crate::service::Invalid> {
        if !(1..=1024).contains(&self.partitions) {
            return Err(format!("partitions must be 1..=1024, got {}", self.partitions).into());
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!("replicas must be 1..=5, got {}", self.replicas).into());
        }
        if self.max_deliver < 1 {
            return Err("max_deliver must be at least 1".into());
        }
        if self.ack_wait_secs == 0
            || self.runtime_ack_wait_secs == 0
            || self.effects_ack_wait_secs == 0
            || self.projections_ack_wait_secs == 0
            || self.duplicate_window_secs == 0
            || self.owner_ttl_secs == 0
        {
            return Err("ack_wait_secs, duplicate_window_secs and owner_ttl_secs must be positive".into());
        }
        for (key, bytes) in [
            ("journal_max_bytes", self.journal_max_bytes),
            ("audit_max_bytes", self.audit_max_bytes),
            ("dlq_max_bytes", self.dlq_max_bytes),
        ] {
            if bytes != -1 && bytes < i64::from(self.max_msg_bytes) {
                return Err(format!(
                    "{key} must be -1 (no limit) or at least max_msg_bytes ({}), got {bytes}",
                    self.max_msg_bytes
                )
                .into());
            }
        }
        for (key, pending) in [
            ("runtime_max_ack_pending", self.runtime_max_ack_pending),
            ("effects_max_ack_pending", self.effects_max_ack_pending),
            ("projections_max_ack_pending", self.projections_max_ack_pending),
        ] {
            if pending < 1 {
                return Err(format!("{key} must be at least 1, got {pending}").into());
            }
        }
        if !(1..=64).contains(&self.entries_history) {
            return Err(
                format!("entries_history must be 1..=64 (a NATS KV limit), got {}", self.entries_history).into()
            );
        }
        if self.journal_max_age_hours == 0 || self.audit_max_age_hours == 0 || self.dlq_max_age_hours == 0 {
            return Err("journal_max_age_hours, audit_max_age_hours and dlq_max_age_hours must be positive".into());
        }
        if self.journal_max_age_hours * 3600 < self.duplicate_window_secs {
            return Err("the journal must keep events at least as long as the dedupe window".into());
        }
        Ok(())
    }
}

/// A consumer declaration: which stream it reads and its configuration.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    pub config: pull::Config,
}

/// The whole topology as data.
#[derive(Debug, Clone)]
pub struct Topology {
    pub streams: Vec<stream::Config>,
    pub consumers: Vec<ConsumerSpec>,
    pub kv: Vec<kv::Config>,
}

fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

/// What `CONV_DLQ` captures: the max-deliveries and terminated advisories of
/// every journal's consumers, `conv.dlq.>`, and stray `conv.in` subjects.
pub fn dlq_subjects() -> Vec<String> {
    let mut out = Vec::new();
    for stream in [STREAM_IN, STREAM_EFFECT, STREAM_APPLIED, STREAM_OUT, STREAM_AUDIT] {
        out.push(format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"));
        out.push(format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.*"));
    }
    out.push(format!("{}.>", subject::DLQ_SUBJECT_PREFIX));
    out.extend(subject::IN_STRAY_SUBJECTS.iter().map(|s| (*s).to_owned()));
    out
}

/// Why a message on one of [`dlq_subjects`] is a dead letter:
/// `max_deliveries`, `terminated`, `stray_subject` or `other`.
pub fn dlq_reason(subject: &str) -> &'static str {
    if subject.starts_with("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.") {
        "max_deliveries"
    } else if subject.starts_with("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.") {
        "terminated"
    } else if subject::is_input(subject) {
        "stray_subject"
    } else {
        "other"
    }
}

impl Topology {
    /// The declared topology for `cfg`.
    pub fn declare(cfg: &TopologyConfig) -> Self {
        let journal = |name: &str, kind: Kind, description: &str| stream::Config {
            name: name.to_owned(),
            description: Some(description.to_owned()),
            subjects: vec![subject::kind_wildcard(kind)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            max_age: hours(cfg.journal_max_age_hours),
            max_bytes: cfg.journal_max_bytes,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            num_replicas: cfg.replicas,
            max_message_size: cfg.max_msg_bytes,
            allow_direct: true,
            ..Default::default()
        };
        let (src, dest) = subject::in_partition_transform(cfg.partitions);
        let mut conv_in = journal(STREAM_IN, Kind::In, "conv inputs; subjects carry their partition");
        conv_in.subjects = vec![subject::IN_SUBJECTS.to_owned()];
        conv_in.subject_transform = Some(SubjectTransform { source: src, destination: dest });
        let (src, dest) = subject::out_partition_transform(cfg.partitions);
        let mut conv_out = journal(STREAM_OUT, Kind::Out, "conv client-facing output; subjects carry their partition");
        conv_out.subjects = vec![subject::OUT_SUBJECTS.to_owned()];
        conv_out.subject_transform = Some(SubjectTransform { source: src, destination: dest });
        let mut audit = journal(STREAM_AUDIT, Kind::Audit, "conv operator actions");
        audit.max_age = hours(cfg.audit_max_age_hours);
        audit.max_bytes = cfg.audit_max_bytes;

        let dlq_subjects = dlq_subjects();
        let dlq = stream::Config {
            name: STREAM_DLQ.to_owned(),
            description: Some(
                "dead letters: max-deliveries and terminated advisories of every CONV_* consumer; stray conv.in subjects"
                    .into(),
            ),
            subjects: dlq_subjects,
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            max_age: hours(cfg.dlq_max_age_hours),
            max_bytes: cfg.dlq_max_bytes,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            num_replicas: cfg.replicas,
            max_message_size: cfg.max_msg_bytes,
            allow_direct: true,
            ..Default::default()
        };

        let streams = vec![
            conv_in,
            journal(STREAM_EFFECT, Kind::Effect, "conv effect directives"),
            journal(STREAM_APPLIED, Kind::Applied, "conv applied markers, in applied order"),
            conv_out,
            audit,
            dlq,
        ];

        let base = |name: String, filter: String, description: &str| pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name),
            description: Some(description.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(cfg.ack_wait_secs),
            max_deliver: cfg.max_deliver,
            filter_subject: filter,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let mut consumers = Vec::new();
        for p in 0..cfg.partitions {
            let pinned = |mut c: pull::Config| {
                c.priority_policy = PriorityPolicy::PinnedClient;
                c.priority_groups = vec![RUNTIME_GROUP.to_owned()];
                c.priority_timeout = Duration::from_secs(cfg.pinned_ttl_secs);
                // Short, so a dead owner's in-flight inputs come back quickly;
                // the worker sends progress for everything it holds.
                c.ack_wait = Duration::from_secs(cfg.runtime_ack_wait_secs);
                // A hand-over gives held inputs back (a nak counts as a
                // delivery), so allow more deliveries than elsewhere.
                c.max_deliver = cfg.max_deliver.max(1) * 4;
                c
            };
            let mut main =
                pinned(base(runtime_consumer(p), subject::in_partition_filter(p), "conv-runtime partition worker"));
            // The scheduler looks ahead this far to order by priority.
            main.max_ack_pending = cfg.runtime_max_ack_pending;
            consumers.push(ConsumerSpec { stream: STREAM_IN.to_owned(), config: main });
            let mut control = pinned(base(
                runtime_control_consumer(p),
                subject::in_partition_control_filter(p),
                "conv-runtime partition control plane (abort, stop, retry)",
            ));
            control.max_ack_pending = 100;
            consumers.push(ConsumerSpec { stream: STREAM_IN.to_owned(), config: control });
        }
        let mut effects = base(EFFECTS_CONSUMER.to_owned(), String::new(), "conv-effects shared work queue");
        effects.max_ack_pending = cfg.effects_max_ack_pending;
        effects.ack_wait = Duration::from_secs(cfg.effects_ack_wait_secs);
        consumers.push(ConsumerSpec { stream: STREAM_EFFECT.to_owned(), config: effects });
        for p in 0..cfg.partitions {
            let mut views =
                base(projections_consumer(p), subject::out_partition_filter(p), "conv-projections partition views");
            views.priority_policy = PriorityPolicy::PinnedClient;
            views.priority_groups = vec![PROJECTIONS_GROUP.to_owned()];
            views.priority_timeout = Duration::from_secs(cfg.pinned_ttl_secs);
            views.ack_wait = Duration::from_secs(cfg.projections_ack_wait_secs);
            // Views are idempotent by position: a hand-over must never
            // dead-letter good output, so allow many deliveries.
            views.max_deliver = cfg.max_deliver.max(1) * 20;
            // Output is acked after each batched view write: room for a few
            // batches of a busy partition.
            views.max_ack_pending = cfg.projections_max_ack_pending;
            consumers.push(ConsumerSpec { stream: STREAM_OUT.to_owned(), config: views });
        }

        let bucket = |name: &str, description: &str, history: i64, max_age: Duration| kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history,
            max_age,
            storage: StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let kv = vec![
            bucket(KV_SNAPSHOTS, "conv runtime snapshots (revision-checked writes)", 1, Duration::ZERO),
            bucket(
                KV_ENTRIES,
                "conv conversation entries of snapshots and LLM contexts",
                cfg.entries_history,
                Duration::ZERO,
            ),
            kv::Config {
                // File storage: a memory bucket is gone after a NATS restart,
                // and with it every instance's heartbeat (found by `convctl chaos`).
                // A marker when a key ages out, so instances watching the
                // bucket see a dead instance's keys go at once.
                limit_markers: Some(Duration::from_secs(cfg.owner_ttl_secs.max(1))),
                ..bucket(KV_LEASES, "conv partition leases and members", 1, Duration::from_secs(cfg.owner_ttl_secs))
            },
            bucket(KV_TIMERS, "conv durable timers", 1, Duration::ZERO),
            bucket(KV_PROJECTIONS, "conv projection views", 1, Duration::ZERO),
        ];
        Topology { streams, consumers, kv }
    }

    /// Names of the pinned streams (what readiness requires).
    pub fn stream_names(&self) -> impl Iterator<Item = &str> {
        self.streams.iter().map(|s| s.name.as_str())
    }
}

/// Which kind of object a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    Stream,
    Consumer,
    Kv,
}

/// What happened (or would happen) to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    /// Only from [`check`]: the object is absent.
    Missing,
    /// Only from [`check`]: the object differs from the declaration.
    Drifted,
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: ObjectKind,
    /// `STREAM` or `STREAM/consumer` or the bucket name.
    pub name: String,
    pub action: Action,
    /// Fields that differ (`field: server → declared`).
    pub fields: Vec<String>,
}

/// The outcome of [`apply`] or [`check`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub changes: Vec<Change>,
}

impl Report {
    /// True when nothing was (or would be) changed.
    pub fn is_unchanged(&self) -> bool {
        self.changes.iter().all(|c| c.action == Action::Unchanged)
    }

    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.changes.iter().filter(|c| c.action != Action::Unchanged) {
            let action = serde_json::to_value(c.action).ok().and_then(|v| v.as_str().map(str::to_owned));
            let kind = serde_json::to_value(c.kind).ok().and_then(|v| v.as_str().map(str::to_owned));
            write!(f, "{:<9} {:<8} {}", action.unwrap_or_default(), kind.unwrap_or_default(), c.name)?;
            if !c.fields.is_empty() {
                write!(f, " ({})", c.fields.join("; "))?;
            }
            writeln!(f)?;
        }
        if self.is_unchanged() {
            write!(f, "no changes ({} objects up to date)", self.changes.len())
        } else {
            write!(
                f,
                "{} created, {} updated, {} unchanged, {} missing, {} drifted",
                self.count(Action::Created),
                self.count(Action::Updated),
                self.count(Action::Unchanged),
                self.count(Action::Missing),
                self.count(Action::Drifted)
            )
        }
    }
}

/// Why the topology could not be applied or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream request for {object} failed: {detail}")]
    Request { object: String, detail: String },
    #[error("{object} cannot be changed in place ({fields}); {detail}")]
    Immutable { object: String, fields: String, detail: String },
}

fn request_err(object: &str, e: impl fmt::Display) -> Error {
    Error::Request { object: object.to_owned(), detail: e.to_string() }
}

macro_rules! diff_fields {
    ($out:ident, $have:expr, $want:expr, [$($field:ident),+ $(,)?]) => {
        $(
            if $have.$field != $want.$field {
                $out.push(format!("{}: {:?} → {:?}", stringify!($field), $have.$field, $want.$field));
            }
        )+
    };
}

/// Fields of a stream that conv manages and that differ on the server.
pub fn stream_diff(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    diff_fields!(
        out,
        have,
        want,
        [
            subjects,
            retention,
            storage,
            discard,
            max_age,
            max_bytes,
            duplicate_window,
            num_replicas,
            max_message_size,
            allow_direct,
            subject_transform,
            description,
        ]
    );
    out
}

/// Fields of a consumer that conv manages and that differ on the server.
pub fn consumer_diff(have: &jetstream::consumer::Config, want: &pull::Config) -> Vec<String> {
    let mut out = Vec::new();
    let want = want.clone().into_consumer_config();
    diff_fields!(
        out,
        have,
        want,
        [
            durable_name,
            deliver_policy,
            ack_policy,
            ack_wait,
            max_deliver,
            filter_subject,
            max_ack_pending,
            priority_policy,
            priority_groups,
            priority_timeout,
            description,
        ]
    );
    // Replicas of 0 on the server mean "inherit from the stream".
    if have.num_replicas != want.num_replicas && !(have.num_replicas == 0 && want.num_replicas == 1) {
        out.push(format!("num_replicas: {:?} → {:?}", have.num_replicas, want.num_replicas));
    }
    out
}

fn kv_diff(have: &stream::Config, want: &kv::Config) -> Vec<String> {
    let mut out = Vec::new();
    if have.max_messages_per_subject != want.history {
        out.push(format!("history: {} → {}", have.max_messages_per_subject, want.history));
    }
    if have.max_age != want.max_age {
        out.push(format!("max_age: {:?} → {:?}", have.max_age, want.max_age));
    }
    if have.num_replicas != want.num_replicas {
        out.push(format!("num_replicas: {} → {}", have.num_replicas, want.num_replicas));
    }
    if have.storage != want.storage {
        out.push(format!("storage: {:?} → {:?}", have.storage, want.storage));
    }
    if have.subject_delete_marker_ttl != want.limit_markers {
        out.push(format!("limit_markers: {:?} → {:?}", have.subject_delete_marker_ttl, want.limit_markers));
    }
    out
}

/// Reads one stream's config; `None` when it does not exist.
async fn stream_config(js: &jetstream::Context, name: &str) -> Result<Option<stream::Config>, Error> {
    match js.get_stream(name).await {
        Ok(mut s) => Ok(Some(s.info().await.map_err(|e| request_err(name, e))?.config.clone())),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref je)
            if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(request_err(name, e)),
    }
}

async fn consumer_config(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Result<Option<jetstream::consumer::Config>, Error> {
    let object = format!("{stream}/{name}");
    let s = js.get_stream_no_info(stream).await.map_err(|e| request_err(&object, e))?;
    match s.consumer_info(name).await {
        Ok(info) => Ok(Some(info.config.clone())),
        Err(e) if consumer_not_found(&e.kind()) => Ok(None),
        Err(e) => Err(request_err(&object, e)),
    }
}

/// True when a consumer-info error means the consumer does not exist.
pub fn consumer_not_found(kind: &jetstream::context::ConsumerInfoErrorKind) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match kind {
        K::NotFound => true,
        K::JetStream(je) => je.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// Creates what is missing and updates what drifted. Idempotent: a second
/// run reports every object `unchanged`.
pub async fn apply(js: &jetstream::Context, topology: &Topology) -> Result<Report, Error> {
    run(js, topology, true).await
}

/// Reports what [`apply`] would do, changing nothing (`missing` / `drifted`).
pub async fn check(js: &jetstream::Context, topology: &Topology) -> Result<Report, Error> {
    run(js, topology, false).await
}

async fn run(js: &jetstream::Context, topology: &Topology, write: bool) -> Result<Report, Error> {
    let mut report = Report::default();
    let verdict = |exists: bool, fields: &[String]| match (exists, fields.is_empty(), write) {
        (false, _, true) => Action::Created,
        (false, _, false) => Action::Missing,
        (true, true, _) => Action::Unchanged,
        (true, false, true) => Action::Updated,
        (true, false, false) => Action::Drifted,
    };

    for want in &topology.streams {
        let have = stream_config(js, &want.name).await?;
        let fields = have.as_ref().map(|h| stream_diff(h, want)).unwrap_or_default();
        let action = verdict(have.is_some(), &fields);
        match action {
            Action::Created => {
                js.create_stream(want.clone()).await.map_err(|e| request_err(&want.name, e))?;
            }
            Action::Updated => {
                js.update_stream(want.clone()).await.map_err(|e| Error::Immutable {
                    object: want.name.clone(),
                    fields: fields.join("; "),
                    detail: e.to_string(),
                })?;
            }
            _ => {}
        }
        report.changes.push(Change { kind: ObjectKind::Stream, name: want.name.clone(), action, fields });
    }

    for spec in &topology.consumers {
        let name = spec.config.durable_name.clone().unwrap_or_default();
        let object = format!("{}/{}", spec.stream, name);
        let have = if write || stream_config(js, &spec.stream).await?.is_some() {
            consumer_config(js, &spec.stream, &name).await?
        } else {
            None
        };
        let fields = have.as_ref().map(|h| consumer_diff(h, &spec.config)).unwrap_or_default();
        let action = verdict(have.is_some(), &fields);
        if matches!(action, Action::Created | Action::Updated) {
            let stream = js.get_stream_no_info(&spec.stream).await.map_err(|e| request_err(&object, e))?;
            let result = if action == Action::Created {
                stream.create_consumer(spec.config.clone()).await.map(drop).map_err(|e| e.to_string())
            } else {
                stream.update_consumer(spec.config.clone()).await.map(drop).map_err(|e| e.to_string())
            };
            result.map_err(|detail| Error::Immutable { object: object.clone(), fields: fields.join("; "), detail })?;
        }
        report.changes.push(Change { kind: ObjectKind::Consumer, name: object, action, fields });
    }

    for want in &topology.kv {
        let stream_name = format!("KV_{}", want.bucket);
        let have = stream_config(js, &stream_name).await?;
        let fields = have.as_ref().map(|h| kv_diff(h, want)).unwrap_or_default();
        let action = verdict(have.is_some(), &fields);
        // The leases bucket holds only what instances write again within a
        // heartbeat: when its storage must change (it was memory, lost on
        // every NATS restart), it is recreated rather than refused.
        if want.bucket == KV_LEASES
            && let Some(h) = &have
            && h.storage != want.storage
        {
            js.delete_key_value(&want.bucket).await.map_err(|e| request_err(&want.bucket, e))?;
        }
        if matches!(action, Action::Created | Action::Updated) {
            js.create_or_update_key_value(want.clone()).await.map_err(|e| Error::Immutable {
                object: want.bucket.clone(),
                fields: fields.join("; "),
                detail: e.to_string(),
            })?;
        }
        report.changes.push(Change { kind: ObjectKind::Kv, name: want.bucket.clone(), action, fields });
    }
    Ok(report)
}

/// Which pinned streams are missing (readiness uses this).
pub async fn missing_streams(js: &jetstream::Context, topology: &Topology) -> Result<Vec<String>, Error> {
    let mut missing = Vec::new();
    for name in topology.stream_names() {
        if stream_config(js, name).await?.is_none() {
            missing.push(name.to_owned());
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declares_the_pinned_streams_and_a_consumer_per_partition() {
        let t = Topology::declare(&TopologyConfig::default());
        let names: Vec<&str> = t.stream_names().collect();
        assert_eq!(names, conv_contracts::subject::STREAMS.to_vec());
        let runtime = t.consumers.iter().filter(|c| c.stream == STREAM_IN).count();
        assert_eq!(runtime, 32, "a main and a control consumer per partition");
        assert_eq!(t.kv.len(), 5);
        assert!(stream_diff(&t.streams[0], &t.streams[0]).is_empty());
    }

    #[test]
    fn config_validation() {
        assert!(TopologyConfig::default().validate().is_ok());
        let bad = TopologyConfig { partitions: 0, ..Default::default() };
        assert!(bad.validate().is_err());
        let bad = TopologyConfig { replicas: 7, ..Default::default() };
        assert!(bad.validate().is_err());
    }
}

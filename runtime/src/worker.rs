//! A partition worker: pulls the partition's inputs (control plane first),
//! schedules them, applies them with the pure reducer, makes the result
//! durable and only then acks.
//!
//! Per input: `reducer::apply` → publish the emitted directives and outputs
//! (deterministic ids, so a redelivered input produces no duplicates) →
//! await their acks → publish the applied marker, the commit record → await
//! its ack → ack the input. Batches do each step for many inputs at once.
//! The state is snapshotted every `snapshot_every` applies and when the conversation goes
//! idle, with the expected revision; idle conversations are evicted and later
//! restored from snapshot + journal tail.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind, Message};
use conv_contracts::subject::STREAM_IN;
use conv_contracts::{ConversationId, Envelope, Limits};
use conv_nats::topology::{RUNTIME_GROUP, runtime_consumer, runtime_control_consumer};
use futures::{FutureExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::hints::Board;
use crate::metrics::Metrics;
use conv_core::reducer;
use conv_core::scheduler::{Pending, Scheduler};
use conv_core::snapshot::Snapshot;
use conv_core::state::State;
use conv_store::journal;
use conv_store::snapshot::{self, Snapshots};

/// Tuning of a partition worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Applies between snapshot writes of a conversation.
    pub snapshot_every: u64,
    /// A conversation with unsnapshotted applies is snapshotted after this much quiet.
    pub idle_snapshot: Duration,
    /// A snapshotted conversation is dropped from memory after this much quiet.
    pub evict_after: Duration,
    /// Progress is sent for held inputs this often (well below the ack wait).
    pub progress_every: Duration,
    /// Wait for the acks of emitted events.
    pub publish_timeout: Duration,
    /// How long an input waits for a runtime-derived cause before it is dead-lettered.
    pub causality_wait: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 32,
            idle_snapshot: Duration::from_secs(1),
            evict_after: Duration::from_secs(60),
            progress_every: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(5),
            causality_wait: Duration::from_secs(5),
        }
    }
}

/// What a worker shares with its siblings.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The service's connection, the control consumers' too: read on a
    /// connection of their own (2026-11-28, twice), a `retry_requested`
    /// was lost after a NATS restart in the compose chaos (docs/perf.md).
    pub js: jetstream::Context,
    pub snapshots: Snapshots,
    pub metrics: Metrics,
    pub config: WorkerConfig,
    /// A span per committed input and per event it emitted.
    pub tracer: conv_telemetry::Tracer,
}

/// Starts the worker of `partition` (for [`conv_nats::ownership`]); it
/// publishes only while `lease` is valid.
pub fn start(
    shared: &Arc<Shared>,
    partition: u16,
    stop: CancellationToken,
    lease: conv_nats::ownership::Lease,
) -> tokio::task::JoinHandle<Result<(), Stopped>> {
    tokio::spawn(run(partition, shared.clone(), stop, lease))
}

/// Why a worker stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("stale owner of partition {partition}: {detail}")]
    Stale { partition: u16, detail: String },
    #[error("partition {partition}: {detail}")]
    Failed { partition: u16, detail: String },
    /// The lease may have passed to another instance (renewals stalled):
    /// nothing more is published; ownership starts a worker again once the
    /// lease is surely this instance's.
    #[error("partition {partition}: the lease was not renewed in time; stopped before publishing")]
    Lapsed { partition: u16 },
}

struct Loaded {
    snap: Snapshot,
    revision: Option<u64>,
    /// The store revision of each entry's latest copy (`conv_entries`).
    entries: Vec<u64>,
    /// Applies since the last snapshot write.
    dirty: u64,
    /// The conversation's last marker in `CONV_APPLIED` (0: none): the next
    /// marker is stored only if it is still the last.
    last_marker: u64,
    touched: Instant,
}

/// Why an event or a marker is not stored (or a state not loaded).
#[derive(Debug, thiserror::Error)]
pub enum StoreFailed {
    #[error("not connected to NATS (or the connection dropped meanwhile)")]
    Disconnected,
    #[error("not published")]
    NotPublished,
    #[error("the NATS connection dropped before the ack")]
    AckCutOff,
    #[error("publish: {0}")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
    #[error("loading the snapshot: {0}")]
    Snapshot(#[from] conv_store::snapshot::Error),
    #[error("restoring from the journal: {0}")]
    Journal(#[from] conv_store::journal::Error),
    #[error("CONV_IN #{seq} is {found}, not the input {expected} its output names")]
    WrongInput { seq: u64, found: String, expected: String },
    #[error("the lease was not renewed in time")]
    LeaseLapsed,
    #[error("republishing the output of {input}: {source}")]
    Republish { input: String, source: Box<StoreFailed> },
    #[error("the marker of {input}: {source}")]
    Marker { input: String, source: Box<StoreFailed> },
    #[error("state vanished")]
    Vanished,
}

/// Publishes every event pipelined, then awaits all the acks: the stream
/// sequence of each, or why it is not stored, tagged as given.
async fn publish_all(
    js: &async_nats::jetstream::Context,
    events: Vec<(usize, &Envelope)>,
) -> Vec<(usize, Result<u64, StoreFailed>)> {
    let mut acks = Vec::new();
    let connected = connected(js);
    for (i, event) in events {
        if !connected {
            acks.push((i, None));
            continue;
        }
        match conv_nats::headers::publish(js, event).await {
            Ok(ack) => acks.push((i, Some(ack))),
            Err(error) => {
                tracing::warn!(message = "Publish failed.", event_id = %event.id(), %error);
                acks.push((i, None));
            }
        }
    }
    futures::future::join_all(acks.into_iter().map(|(i, ack)| async move {
        match ack {
            Some(ack) => (i, stored_at(ack).await),
            None => (i, Err(StoreFailed::NotPublished)),
        }
    }))
    .await
}

/// While disconnected the client would buffer a publish and send it after
/// the reconnect, maybe after the lease passed on: publishes are refused at
/// once instead.
fn connected(js: &async_nats::jetstream::Context) -> bool {
    js.client().connection_state() == async_nats::connection::State::Connected
}

/// The stream sequence a publish was stored at, or why it was not (an ack
/// cut off by a disconnect ends at once).
async fn stored_at(ack: async_nats::jetstream::context::PublishAckFuture) -> Result<u64, StoreFailed> {
    match conv_nats::connect::unless_disconnected(ack).await {
        Some(acked) => Ok(acked?.sequence),
        None => Err(StoreFailed::AckCutOff),
    }
}

/// How long a worker waits for a late lease renewal before it gives up
/// what it holds.
const LEASE_PATIENCE: Duration = Duration::from_secs(2);

/// True when the lease is valid now or is renewed within [`LEASE_PATIENCE`].
async fn lease_holds(lease: &conv_nats::ownership::Lease) -> bool {
    let deadline = Instant::now() + LEASE_PATIENCE;
    while !lease.valid() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Publishes an applied marker expecting `last` (the conversation's
/// previous marker in `CONV_APPLIED`, 0: none) and awaits its ack.
async fn publish_marker(js: &async_nats::jetstream::Context, marker: &Envelope, last: u64) -> Result<u64, StoreFailed> {
    if !connected(js) {
        return Err(StoreFailed::Disconnected);
    }
    stored_at(conv_nats::headers::publish_expecting(js, marker, last).await?).await
}

/// The derived-id tag of an input's applied marker: its id is
/// `derived_id(input, MARKER_TAG)`, past any output position.
const MARKER_TAG: usize = usize::MAX;

/// The applied marker of `input` (stored at `seq` in `CONV_IN`), after which
/// the conversation is at `state` (its version, hash and rules).
fn marker(input: &Envelope, seq: u64, state: &State) -> Envelope {
    Envelope::derived(input, MARKER_TAG, reducer::SOURCE, state.marker(input, seq))
}

struct Worker {
    partition: u16,
    shared: Arc<Shared>,
    scheduler: Scheduler<Message>,
    states: HashMap<ConversationId, Loaded>,
    depths: [usize; 4],
    /// Inputs waiting for their cause, with the time they started waiting.
    parked: Vec<(Instant, Pending<Message>)>,
    /// When each input in the scheduler was queued (by `CONV_IN` sequence:
    /// the scheduler holds one copy of an input at a time), for the
    /// queue-wait metric; the scheduler itself has no clock.
    queued_at: HashMap<u64, Instant>,
    /// What the control reader hints from: committed cancelable effects.
    board: Arc<Board>,
    /// Until when the partition's lease is surely this instance's: checked
    /// before each publish phase.
    lease: conv_nats::ownership::Lease,
}

/// Aborts and stops handed from the control reader to the worker.
const CONTROL_QUEUE: usize = 1024;

/// Runs partition `partition` until `stop` fires (then hands its held inputs
/// back and snapshots what is dirty) or it finds it is a stale owner.
pub async fn run(
    partition: u16,
    shared: Arc<Shared>,
    stop: CancellationToken,
    lease: conv_nats::ownership::Lease,
) -> Result<(), Stopped> {
    let failed = |detail: String| Stopped::Failed { partition, detail };
    // Nothing in the start may hang the partition (a connection that is
    // reconnecting, a server that does not answer): a start that takes too
    // long fails, and ownership releases the lease and starts it again.
    let Opened { main, control, control_backlog, control_msgs } =
        match tokio::time::timeout(START_WITHIN, open(partition, &shared)).await {
            Ok(opened) => opened?,
            Err(_) => return Err(failed(format!("did not start within {} s", START_WITHIN.as_secs()))),
        };
    let board = Arc::new(Board::default());
    // The control plane has its own reader: it hints effects the moment an
    // abort or stop arrives, whatever the worker is busy with.
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(CONTROL_QUEUE);
    let reader_stop = stop.child_token();
    let reader = tokio::spawn(read_control(
        partition,
        control.clone(),
        control_msgs,
        board.clone(),
        shared.js.client(),
        control_tx,
        reader_stop.clone(),
    ));
    let mut w = Worker {
        partition,
        shared: shared.clone(),
        scheduler: Scheduler::new(),
        states: HashMap::new(),
        depths: [0; 4],
        parked: Vec::new(),
        queued_at: HashMap::new(),
        board,
        lease,
    };
    // Taking over a backlog: hold every waiting control event before the
    // first input of the main consumer can be applied, so an abort recorded
    // behind thousands of deltas still goes first.
    let deadline = Instant::now() + Duration::from_secs(3);
    while (w.scheduler.len() as u64) < control_backlog && Instant::now() < deadline && !stop.is_cancelled() {
        if let Ok(Some(delivered)) = tokio::time::timeout(Duration::from_millis(200), control_rx.recv()).await {
            w.admit(delivered).await;
        }
    }
    let result = 'serve: {
        let mut main_msgs = match tokio::time::timeout(START_WITHIN, pull(&main, 500)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => break 'serve Err(failed(e.to_string())),
            Err(_) => break 'serve Err(failed(format!("did not start within {} s", START_WITHIN.as_secs()))),
        };
        tracing::info!(message = "Partition started.", partition, control_backlog);

        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        let mut last_progress = Instant::now();
        loop {
            if stop.is_cancelled() {
                break Ok(());
            }
            // Take what has already arrived, control plane first, without waiting.
            while let Ok(delivered) = control_rx.try_recv() {
                w.admit(delivered).await;
            }
            w.drain(&mut main_msgs, 1000).await;
            if last_progress.elapsed() >= shared.config.progress_every {
                w.progress().await;
                last_progress = Instant::now();
            }
            w.unpark().await;
            let batch = w.next_batch();
            if !batch.is_empty() {
                if let Err(stopped) = w.apply_batch(batch).await {
                    break Err(stopped);
                }
                w.update_depths();
                continue;
            }
            w.update_depths();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break Ok(()),
                delivered = control_rx.recv() => match delivered {
                    Some(delivered) => w.admit(delivered).await,
                    // The reader stops with the worker's own stop too.
                    None if stop.is_cancelled() => break Ok(()),
                    None => break Err(failed("the control reader stopped".to_owned())),
                },
                m = main_msgs.next() => match m {
                    Some(m) => w.accept(Some(m)).await,
                    None => {
                        tracing::warn!(message = "Consumer stream ended; pulling again.", partition);
                        match repull(&main, 500, &stop).await {
                            Some(m) => main_msgs = m,
                            None => break Ok(()),
                        }
                    }
                },
                _ = housekeeping.tick() => {
                    if let Err(stopped) = w.housekeeping(false).await {
                        break Err(stopped);
                    }
                }
            }
        }
    };
    // Hand held inputs back at once, for the next owner: what the worker
    // holds and what the control reader took but did not hand over yet.
    reader_stop.cancel();
    let _ = reader.await;
    while let Ok(delivered) = control_rx.try_recv() {
        conv_nats::consume::settle(&delivered.message, AckKind::Nak(None), "hand back").await;
    }
    let parked: Vec<Pending<Message>> = std::mem::take(&mut w.parked).into_iter().map(|(_, p)| p).collect();
    for pending in w.scheduler.drain().into_iter().chain(parked) {
        conv_nats::consume::settle(&pending.token, AckKind::Nak(None), "hand back").await;
    }
    w.update_depths();
    if result.is_ok() {
        let _ = w.housekeeping(true).await;
    }
    tracing::info!(message = "Partition stopped.", partition, ok = result.is_ok());
    result
}

/// How long the control reader waits to hand a cancel hint to its connection.
const HINT_WITHIN: Duration = Duration::from_millis(500);

/// How long a partition's start (consumers, pins, first pulls) may take.
const START_WITHIN: Duration = Duration::from_secs(15);

/// A partition's consumers, opened.
struct Opened {
    main: PullConsumer,
    control: PullConsumer,
    /// Control inputs waiting when the partition started.
    control_backlog: u64,
    control_msgs: PullStream,
}

/// Opens the partition's two consumers, takes their pins and starts pulling
/// the control one (the main one is pulled once the control backlog is held).
async fn open(partition: u16, shared: &Shared) -> Result<Opened, Stopped> {
    let failed = |e: &dyn std::fmt::Display| Stopped::Failed { partition, detail: e.to_string() };
    let stream = shared.js.get_stream_no_info(STREAM_IN).await.map_err(|e| failed(&e))?;
    let main: PullConsumer = stream.get_consumer(&runtime_consumer(partition)).await.map_err(|e| failed(&e))?;
    let mut control: PullConsumer =
        stream.get_consumer(&runtime_control_consumer(partition)).await.map_err(|e| failed(&e))?;
    // A new owner takes the pin at once and gets what the old one held now.
    conv_nats::ownership::take_consumer(&stream, &runtime_consumer(partition), RUNTIME_GROUP).await;
    conv_nats::ownership::take_consumer(&stream, &runtime_control_consumer(partition), RUNTIME_GROUP).await;
    // Read after the reset: what the old owner held counts too.
    let control_backlog = match control.info().await {
        Ok(info) => info.num_pending,
        Err(error) => {
            tracing::warn!(message = "Cannot read the control backlog.", partition, %error);
            control.cached_info().num_pending
        }
    };
    let control_msgs = pull(&control, 50).await.map_err(|e| failed(&e))?;
    Ok(Opened { main, control, control_backlog, control_msgs })
}

/// Reads a partition's control consumer: hints each abort or stop to
/// effects from the board (`crate::hints`), then hands it to the worker,
/// which applies it in its order. Hints go only for first deliveries: a
/// redelivered abort may have been applied by an earlier owner, and the
/// board of a new owner does not know that (a hint not sent costs only speed).
async fn read_control(
    partition: u16,
    consumer: PullConsumer,
    mut messages: PullStream,
    board: Arc<Board>,
    client: async_nats::Client,
    worker: tokio::sync::mpsc::Sender<Delivered>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = messages.next() => next,
        };
        let Some(next) = next else {
            // The pull ends when the consumer's leader goes away (a cluster
            // electing one): pull again rather than stop the partition.
            tracing::warn!(message = "Control consumer stream ended; pulling again.", partition);
            match repull(&consumer, 50, &stop).await {
                Some(m) => messages = m,
                None => return,
            }
            continue;
        };
        let Some(delivered) = Delivered::decode(partition, Some(next)) else { continue };
        let first = delivered.message.info().map(|i| i.delivered <= 1).unwrap_or(false);
        if let (true, Ok(event)) = (first, &delivered.event)
            && let Some((mode, effect_ids)) = board.targets(event)
        {
            let hint = conv_contracts::live::LiveCancel {
                input_id: event.id().to_owned(),
                mode,
                effect_ids,
                time: event.time(),
            };
            let subject = conv_contracts::subject::live_cancel_subject(event.conversation_id());
            // Best effort, and never a wait (a reconnecting client's buffer
            // may be full): the cancel directive follows anyway.
            match tokio::time::timeout(HINT_WITHIN, client.publish(subject, hint.to_bytes().into())).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(message = "Cancel hint not sent.", conversation_id = %event.conversation_id(), %error)
                }
                Err(_) => {
                    tracing::debug!(message = "Cancel hint not sent in time.", conversation_id = %event.conversation_id())
                }
            }
        }
        // A full channel must not hold the reader past its stop (the worker
        // awaits the reader before it drains the channel): what it holds
        // then goes back at once.
        let permit = tokio::select! {
            _ = stop.cancelled() => None,
            permit = worker.reserve() => permit.ok(),
        };
        let Some(permit) = permit else {
            conv_nats::consume::settle(&delivered.message, AckKind::Nak(None), "hand back").await;
            return;
        };
        permit.send(delivered);
    }
}

async fn pull(consumer: &PullConsumer, batch: usize) -> Result<PullStream, jetstream::consumer::StreamError> {
    consumer
        .stream()
        .group(RUNTIME_GROUP)
        .max_messages_per_batch(batch)
        .expires(Duration::from_secs(2))
        .messages()
        .await
}

type PullStream = jetstream::consumer::pull::Stream;

/// Pulls again after a pull stream ended, every 250 ms until it works;
/// `None` once `stop` fires.
async fn repull(consumer: &PullConsumer, batch: usize, stop: &CancellationToken) -> Option<PullStream> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        match pull(consumer, batch).await {
            Ok(m) => return Some(m),
            Err(error) => tracing::warn!(message = "Cannot pull yet.", %error),
        }
    }
}

/// Acks inputs whose effect is durable. A plain ack, sent without waiting
/// for the server to confirm it: the worker goes on to the next group at
/// once, and an ack that is lost only means a redelivery, which the
/// reducer's dedupe by input id acks as a duplicate.
async fn ack_all(partition: u16, inputs: &[Pending<Message>]) {
    for p in inputs {
        if let Err(error) = p.token.ack().await {
            tracing::warn!(message = "Failed to ack an applied input.", partition, %error, seq = p.seq);
        }
    }
}

/// A delivered input, decoded once.
struct Delivered {
    message: Message,
    seq: u64,
    event: Result<Envelope, conv_contracts::Rejection>,
}

impl Delivered {
    fn decode<E: std::fmt::Display>(partition: u16, next: Option<Result<Message, E>>) -> Option<Self> {
        let message = match next? {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(message = "Consumer stream error.", partition, %error);
                return None;
            }
        };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or_default();
        let event =
            conv_nats::headers::decode(&message.subject, message.headers.as_ref(), &message.payload, Limits::default());
        Some(Self { message, seq, event })
    }
}

/// Inputs committed together at most. The scheduler hands out P0 first, so
/// a group of aborts commits together; a P0 input that arrives while a group
/// is being committed waits for that one group only.
const BATCH: usize = 64;

impl Worker {
    /// The next inputs to apply, in the scheduler's order.
    fn next_batch(&mut self) -> Vec<Pending<Message>> {
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            let Some(p) = self.scheduler.pop() else { break };
            if let Some(at) = self.queued_at.remove(&p.seq) {
                let priority = p.event.priority().as_str();
                self.shared.metrics.queue_wait.with_label_values(&[priority]).observe(at.elapsed().as_secs_f64());
            }
            batch.push(p);
        }
        batch
    }

    async fn drain<S, E>(&mut self, messages: &mut S, max: usize)
    where
        S: Stream<Item = Result<Message, E>> + Unpin,
        E: std::fmt::Display,
    {
        for _ in 0..max {
            match messages.next().now_or_never() {
                Some(m) => self.accept(m).await,
                None => return,
            }
        }
    }

    /// Validates a delivered message and queues it (or terminates it).
    async fn accept<E: std::fmt::Display>(&mut self, next: Option<Result<Message, E>>) {
        let Some(delivered) = Delivered::decode(self.partition, next) else { return };
        if delivered.message.info().is_ok_and(|i| i.delivered > 1) {
            self.shared.metrics.redeliveries.inc();
        }
        self.admit(delivered).await;
    }

    /// Queues a decoded delivery (or terminates it).
    async fn admit(&mut self, delivered: Delivered) {
        let Delivered { message, seq, event } = delivered;
        match event {
            Err(rejection) => {
                self.shared.metrics.terminated.inc();
                tracing::warn!(message = "Invalid input terminated.", partition = self.partition, seq, reason = %rejection);
                let reason = format!("{}: {rejection}", rejection.code());
                conv_nats::consume::term_or_log(&message, &reason).await;
            }
            Ok(event) if self.scheduler.contains(event.id()) => {
                // The same control event through the control and the main consumer.
                if let Err(error) = message.ack().await {
                    tracing::debug!(message = "Failed to ack a second copy.", partition = self.partition, %error);
                }
            }
            Ok(event) => self.queue(Pending { seq, event, token: message }),
        }
    }

    /// Hands an input to the scheduler, noting when (`queued_at`).
    fn queue(&mut self, pending: Pending<Message>) {
        self.queued_at.insert(pending.seq, Instant::now());
        self.scheduler.push(pending);
    }

    async fn progress(&self) {
        for message in self.scheduler.tokens().chain(self.parked.iter().map(|(_, p)| &p.token)) {
            conv_nats::consume::settle(message, AckKind::Progress, "progress").await;
        }
    }

    /// The runtime-derived cause (`<input id>~<n>`) this input waits for, if
    /// that input is neither applied nor pending here. Only causes the
    /// conversation's dedupe window can vouch for are checked; ids from other
    /// systems are recorded but not waited for.
    fn missing_cause(&self, state: &State, event: &Envelope) -> Option<String> {
        let cause = event.causation_id()?;
        let (input, _) = cause.rsplit_once('~')?;
        let window_complete = state.version < conv_core::state::RECENT_IDS as u64;
        (window_complete && !state.has_applied(input) && !self.scheduler.contains(input)).then(|| input.to_owned())
    }

    /// Requeues parked inputs whose cause got applied; dead-letters those
    /// that waited longer than the bound.
    async fn unpark(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let wait = self.shared.config.causality_wait;
        for (since, pending) in std::mem::take(&mut self.parked) {
            let conv = pending.event.conversation_id().clone();
            // An evicted conversation is restored only by applying; until the
            // cause comes, keep waiting (and keep the clock running).
            let missing = match self.states.get(&conv) {
                Some(l) => self.missing_cause(&l.snap.state, &pending.event),
                None => pending.event.causation_id().map(str::to_owned),
            };
            match missing {
                None => self.queue(pending),
                Some(cause) if since.elapsed() >= wait => {
                    let reason = format!(
                        "causality_timeout: cause {cause} of {} was not applied within {}ms",
                        pending.event.id(),
                        wait.as_millis()
                    );
                    tracing::warn!(message = "Input dead-lettered: its cause never came.", conversation_id = %conv, %reason);
                    self.shared.metrics.terminated.inc();
                    conv_nats::consume::term_or_log(&pending.token, &reason).await;
                }
                Some(_) => self.parked.push((since, pending)),
            }
        }
    }

    fn update_depths(&mut self) {
        let now = self.scheduler.depths();
        for (i, p) in conv_contracts::Priority::ALL.iter().enumerate() {
            let delta = i64::try_from(now[i]).unwrap_or(0) - i64::try_from(self.depths[i]).unwrap_or(0);
            if delta != 0 {
                self.shared.metrics.queue_depth.with_label_values(&[p.as_str()]).add(delta);
            }
        }
        self.depths = now;
    }

    /// The conversation's state: cached, or restored from snapshot + journal.
    async fn load(&mut self, conv: &ConversationId) -> Result<&mut Loaded, StoreFailed> {
        if !self.states.contains_key(conv) {
            let stored = self.shared.snapshots.load(conv.as_str()).await?;
            let (revision, entries) = (stored.revision, stored.entries);
            let mut rebuilt = journal::rebuild(&self.shared.js, conv, stored.snapshot).await?;
            if !rebuilt.mismatches.is_empty() {
                tracing::error!(message = "Restored state differs from recorded hashes.", conversation_id = %conv, markers = ?rebuilt.mismatches);
            }
            let adopted = self.adopt(conv, &mut rebuilt.snapshot, &mut rebuilt.last_marker_seq).await?;
            self.shared.metrics.restores.inc();
            self.states.insert(
                conv.clone(),
                Loaded {
                    snap: rebuilt.snapshot,
                    revision,
                    entries,
                    dirty: rebuilt.applied + adopted,
                    last_marker: rebuilt.last_marker_seq,
                    touched: Instant::now(),
                },
            );
        }
        self.states.get_mut(conv).ok_or(StoreFailed::Vanished)
    }

    /// Applies the inputs whose output a previous owner stored without their
    /// markers ([`journal::orphans`]), in its order, before anything else of
    /// the conversation: another order would emit different output at the
    /// same positions. Publishes what is not stored yet, then the markers.
    /// Returns how many inputs were adopted.
    async fn adopt(
        &self,
        conv: &ConversationId,
        snapshot: &mut conv_core::snapshot::Snapshot,
        last_marker: &mut u64,
    ) -> Result<u64, StoreFailed> {
        let js = &self.shared.js;
        let found = journal::orphans(js, conv, snapshot.state.pointers.outputs, *last_marker).await?;
        let Some(orphans) = found else { return Ok(0) };
        let mut adopted = 0;
        for (seq, id) in &orphans.inputs {
            let input = journal::input(js, *seq).await?;
            if input.id() != *id {
                return Err(StoreFailed::WrongInput { seq: *seq, found: input.id().to_owned(), expected: id.clone() });
            }
            let applied = reducer::apply(&mut snapshot.state, &input);
            if applied.duplicate {
                continue;
            }
            tracing::warn!(
                message = "Adopting output stored without its marker: applying its input first.",
                conversation_id = %conv,
                event_id = %input.id(),
                seq
            );
            if !lease_holds(&self.lease).await {
                return Err(StoreFailed::LeaseLapsed);
            }
            let events: Vec<Envelope> = applied
                .emitted
                .into_iter()
                .filter(|e| !orphans.stored.contains(e.id()))
                .map(|e| e.with_input_seq(*seq))
                .collect();
            for (_, result) in publish_all(js, events.iter().enumerate().collect()).await {
                result.map_err(|e| StoreFailed::Republish { input: id.clone(), source: Box::new(e) })?;
            }
            let state = &snapshot.state;
            let marker = marker(&input, *seq, state);
            if !lease_holds(&self.lease).await {
                return Err(StoreFailed::LeaseLapsed);
            }
            let marker_seq = publish_marker(js, &marker, *last_marker)
                .await
                .map_err(|e| StoreFailed::Marker { input: id.clone(), source: Box::new(e) })?;
            snapshot.applied_seq = snapshot.applied_seq.max(marker_seq);
            *last_marker = marker_seq;
            adopted += 1;
        }
        self.shared.metrics.adopted.inc_by(adopted);
        Ok(adopted)
    }

    /// Group commit: applies a batch of scheduled inputs (in the scheduler's
    /// order, in place), publishes every emitted event of the batch
    /// pipelined and awaits their acks together, then the markers of the
    /// conversations whose events are all stored (each conversation's in
    /// order, conversations side by side), then acks the inputs together. A
    /// conversation any of whose events failed to publish is dropped from memory (restored from the journal later) and its inputs
    /// in the batch are handed back; their ids are deterministic, so what was
    /// stored is deduped when they are applied again.
    async fn apply_batch(&mut self, batch: Vec<Pending<Message>>) -> Result<(), Stopped> {
        let started = Instant::now();
        let started_at = std::time::SystemTime::now();
        let vanished = |partition| Stopped::Failed { partition, detail: "state vanished".into() };
        // Staged: the input, its conversation and its events (marker last).
        let mut staged: Vec<(Pending<Message>, Vec<Envelope>)> = Vec::with_capacity(batch.len());
        let mut failed: HashSet<ConversationId> = HashSet::new();
        // Inputs applied before (the control consumer's copy of an abort
        // went first, or a redelivery): acked with the group, not one by one.
        let mut duplicates: Vec<Pending<Message>> = Vec::new();
        for pending in batch {
            let conv = pending.event.conversation_id().clone();
            if failed.contains(&conv) {
                conv_nats::consume::settle(&pending.token, AckKind::Nak(Some(Duration::from_millis(500))), "retry")
                    .await;
                continue;
            }
            let loaded = conv_nats::connect::unless_disconnected(self.load(&conv)).await;
            if let Err(error) = loaded.unwrap_or(Err(StoreFailed::Disconnected)) {
                tracing::warn!(message = "Cannot load state; will retry.", conversation_id = %conv, %error);
                conv_nats::consume::settle(&pending.token, AckKind::Nak(Some(Duration::from_millis(500))), "retry")
                    .await;
                failed.insert(conv);
                continue;
            }
            let missing = match self.states.get(&conv) {
                Some(l) => self.missing_cause(&l.snap.state, &pending.event),
                None => return Err(vanished(self.partition)),
            };
            if let Some(cause) = missing {
                tracing::debug!(message = "Input waits for its cause.", conversation_id = %conv, event_id = %pending.event.id(), %cause);
                self.parked.push((Instant::now(), pending));
                continue;
            }
            // Applied in place: nothing is copied.
            let Some(loaded) = self.states.get_mut(&conv) else { return Err(vanished(self.partition)) };
            let applied = tracing::debug_span!(
                "apply",
                partition = self.partition,
                conversation_id = %conv,
                event_id = %pending.event.id(),
                seq = pending.seq,
            )
            .in_scope(|| reducer::apply(&mut loaded.snap.state, &pending.event));
            if applied.duplicate {
                self.shared.metrics.duplicates.inc();
                duplicates.push(pending);
                continue;
            }
            let state = &loaded.snap.state;
            let mut events: Vec<Envelope> =
                applied.emitted.into_iter().map(|e| e.with_input_seq(pending.seq)).collect();
            events.push(marker(&pending.event, pending.seq, state));
            staged.push((pending, events));
        }
        for pending in &duplicates {
            self.board.applied(&pending.event);
        }
        ack_all(self.partition, &duplicates).await;
        if staged.is_empty() {
            return Ok(());
        }

        // Nothing is published once the lease may be someone else's (a
        // renewal that is merely late is waited for a moment).
        if !lease_holds(&self.lease).await {
            for (pending, _) in staged {
                self.forget(pending.event.conversation_id());
                conv_nats::consume::settle(&pending.token, AckKind::Nak(None), "hand back").await;
            }
            return Err(Stopped::Lapsed { partition: self.partition });
        }
        // An LLM step's context is read by reference: its entries are stored
        // before its directive is published.
        let steps: HashSet<ConversationId> = staged
            .iter()
            .filter(|(_, events)| events.iter().any(|e| matches!(e.data(), conv_contracts::Payload::LlmRequested(_))))
            .map(|(p, _)| p.event.conversation_id().clone())
            .collect();
        for conv in steps {
            let Some(loaded) = self.states.get_mut(&conv) else { return Err(vanished(self.partition)) };
            let flushed = self.shared.snapshots.flush(conv.as_str(), &mut loaded.snap.state, &mut loaded.entries).await;
            match flushed {
                Ok(n) => self.shared.metrics.entry_writes.inc_by(n as u64),
                Err(error) => {
                    tracing::warn!(message = "Storing context entries failed; will retry.", conversation_id = %conv, %error);
                    failed.insert(conv);
                }
            }
        }
        if !failed.is_empty() {
            let mut kept = Vec::with_capacity(staged.len());
            for (pending, events) in staged {
                if failed.contains(pending.event.conversation_id()) {
                    self.forget(pending.event.conversation_id());
                    conv_nats::consume::settle(&pending.token, AckKind::Nak(Some(Duration::from_millis(500))), "retry")
                        .await;
                } else {
                    kept.push((pending, events));
                }
            }
            staged = kept;
        }

        // Each conversation's first marker expects the conversation's last
        // marker this worker knows: another owner's marker in between is
        // refused (`wrong last sequence`), so no applied index is taken twice.
        let last_markers: HashMap<ConversationId, u64> = staged
            .iter()
            .filter_map(|(p, _)| {
                let conv = p.event.conversation_id();
                self.states.get(conv).map(|l| (conv.clone(), l.last_marker))
            })
            .collect();
        let lease = self.lease.clone();
        // Publish in two phases, each pipelined with its acks awaited
        // together: first every event but the markers, then the markers of
        // the inputs all of whose events are stored. A stored marker is the
        // commit record: an input with a marker is acked as a duplicate when
        // it comes again, so nothing it emitted may be missing (a NATS
        // restart can store one stream's message and drop another's).
        let js = self.shared.js.clone();
        let work = async {
            let mut effects = Vec::new();
            for (i, (_, events)) in staged.iter().enumerate() {
                effects.extend(events[..events.len().saturating_sub(1)].iter().map(|e| (i, e)));
            }
            let mut broken: HashSet<&ConversationId> = HashSet::new();
            for (i, result) in publish_all(&js, effects).await {
                if let Err(error) = result {
                    tracing::warn!(message = "Publishing a result failed; will retry.", %error);
                    broken.insert(staged[i].0.event.conversation_id());
                }
            }
            // A conversation's later inputs build on its earlier ones: none
            // of its markers when any of its events is missing.
            // One conversation's markers one after another (a later marker
            // stored without an earlier one would replay its inputs out of
            // order: a publish lost with a dropped connection while the next
            // is sent after the reconnect); conversations side by side.
            let mut chains: HashMap<&ConversationId, Vec<(usize, &Envelope)>> = HashMap::new();
            for (i, (p, events)) in staged.iter().enumerate() {
                let conv = p.event.conversation_id();
                if let Some(marker) = events.last()
                    && !broken.contains(conv)
                {
                    chains.entry(conv).or_default().push((i, marker));
                }
            }
            // The outputs took time: markers only while the lease holds.
            if !lease_holds(&lease).await {
                return (vec![None; staged.len()], true);
            }
            let js = &js;
            let last_markers = &last_markers;
            let stored = futures::future::join_all(chains.into_iter().map(|(conv, chain)| async move {
                let mut stored = Vec::new();
                let mut last = last_markers.get(conv).copied().unwrap_or(0);
                for (i, marker) in chain {
                    match publish_marker(js, marker, last).await {
                        Ok(seq) => {
                            stored.push((i, seq));
                            last = seq;
                        }
                        Err(error) => {
                            tracing::warn!(message = "Publishing a marker failed; will retry.", conversation_id = %conv, %error);
                            break; // none of this conversation's later markers
                        }
                    }
                }
                stored
            }))
            .await;
            let mut marker_seqs: Vec<Option<u64>> = vec![None; staged.len()];
            for (i, seq) in stored.into_iter().flatten() {
                marker_seqs[i] = Some(seq);
            }
            (marker_seqs, false)
        };
        // Aborts and stops that arrive meanwhile are hinted by the control
        // reader and wait in its queue.
        let committed = tokio::time::timeout(self.shared.config.publish_timeout, work).await;
        let (marker_seqs, lapsed) = committed.unwrap_or_else(|_| (vec![None; staged.len()], false));
        let stale = if lapsed { Some(Stopped::Lapsed { partition: self.partition }) } else { None };
        for ((pending, _), marker_seq) in staged.iter().zip(&marker_seqs) {
            if marker_seq.is_none() {
                failed.insert(pending.event.conversation_id().clone());
            }
        }

        // Commit: record what is durable, hand back what is not, ack together.
        let mut to_ack = Vec::with_capacity(staged.len());
        let mut stale = stale;
        for ((pending, events), marker_seq) in staged.into_iter().zip(marker_seqs) {
            let conv = pending.event.conversation_id().clone();
            let Some(marker_seq) = marker_seq.filter(|_| !failed.contains(&conv)) else {
                // Whether or not some of it was stored, a retry republishes
                // the same ids (deduped) after restoring from the journal.
                self.forget(&conv);
                conv_nats::consume::settle(&pending.token, AckKind::Nak(Some(Duration::from_millis(500))), "retry")
                    .await;
                continue;
            };
            if stale.is_some() {
                conv_nats::consume::settle(&pending.token, AckKind::Nak(None), "hand back").await;
                continue;
            }
            let Some(loaded) = self.states.get_mut(&conv) else { return Err(vanished(self.partition)) };
            loaded.snap.applied_seq = loaded.snap.applied_seq.max(marker_seq);
            loaded.last_marker = loaded.last_marker.max(marker_seq);
            loaded.dirty += 1;
            loaded.touched = Instant::now();
            if loaded.dirty >= self.shared.config.snapshot_every
                && let Err(e) = self.save(&conv).await
            {
                // Hand the input back at once: the rightful owner applies it.
                conv_nats::consume::settle(&pending.token, AckKind::Nak(None), "hand back").await;
                stale = Some(e);
                continue;
            }
            self.trace(&pending, &events, marker_seq, started_at);
            to_ack.push(pending);
        }
        // The board learns what is now durable: applied aborts and stops
        // first, then what each conversation would cancel from here.
        for pending in &to_ack {
            self.board.applied(&pending.event);
        }
        let committed: HashSet<&ConversationId> = to_ack.iter().map(|p| p.event.conversation_id()).collect();
        for conv in committed {
            if let Some(loaded) = self.states.get(conv) {
                self.board.record(conv, reducer::cancelable(&loaded.snap.state));
            }
        }
        ack_all(self.partition, &to_ack).await;
        let n = to_ack.len() as u64;
        self.shared.metrics.applied.inc_by(n);
        let per_input = started.elapsed().as_secs_f64();
        for _ in 0..n {
            self.shared.metrics.apply_seconds.observe(per_input);
        }
        match stale {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Spans of a committed input: the apply (a child of the input's span)
    /// and each event it emitted (children of the apply; the marker is
    /// internal and has none).
    fn trace(&self, input: &Pending<Message>, events: &[Envelope], marker_seq: u64, started: std::time::SystemTime) {
        let tracer = &self.shared.tracer;
        let Some(apply) = tracer.work("runtime.apply", "runtime", &input.event, started) else { return };
        let parent = apply.span_id;
        let emitted = &events[..events.len().saturating_sub(1)];
        tracer.finish(
            apply
                .attr(conv_telemetry::attr::PARTITION, self.partition)
                .attr(conv_telemetry::attr::STREAM_SEQ, input.seq)
                .attr(conv_telemetry::attr::MARKER_SEQ, marker_seq)
                .attr(conv_telemetry::attr::EMITTED, emitted.len()),
        );
        for event in emitted {
            tracer.finish(conv_telemetry::Span::event(event, Some(parent), started));
        }
    }

    async fn save(&mut self, conv: &ConversationId) -> Result<(), Stopped> {
        let Some(loaded) = self.states.get_mut(conv) else { return Ok(()) };
        let saved =
            self.shared.snapshots.save(conv.as_str(), &mut loaded.snap, &mut loaded.entries, loaded.revision).await;
        match saved {
            Ok(revision) => {
                loaded.revision = Some(revision);
                loaded.dirty = 0;
                self.shared.metrics.snapshot_writes.inc();
                Ok(())
            }
            Err(snapshot::Error::Conflict { .. }) => {
                self.shared.metrics.snapshot_conflicts.inc();
                self.states.clear();
                self.board.clear();
                Err(Stopped::Stale {
                    partition: self.partition,
                    detail: format!("the snapshot of {conv} was written by someone else"),
                })
            }
            Err(error) => {
                tracing::warn!(message = "Snapshot write failed; will retry.", conversation_id = %conv, %error);
                Ok(())
            }
        }
    }

    /// Snapshots quiet conversations and evicts idle ones (`all`: snapshot everything dirty).
    async fn housekeeping(&mut self, all: bool) -> Result<(), Stopped> {
        let cfg = self.shared.config.clone();
        let dirty: Vec<ConversationId> = self
            .states
            .iter()
            .filter(|(_, l)| {
                // A run in progress is snapshotted every `snapshot_every`
                // applies, not at every pause between chunks of a reply; a
                // quiet conversation (or one waiting very long) is saved now.
                let quiet = l.touched.elapsed();
                let running = l.snap.state.run_status == conv_contracts::payload::RunStatus::Running;
                l.dirty > 0 && (all || (quiet >= cfg.idle_snapshot && !running) || quiet >= cfg.evict_after)
            })
            .map(|(c, _)| c.clone())
            .collect();
        for conv in dirty {
            self.save(&conv).await?;
        }
        let board = &self.board;
        self.states.retain(|conv, l| {
            let keep = l.dirty > 0 || l.touched.elapsed() < cfg.evict_after;
            if !keep {
                board.forget(conv);
            }
            keep
        });
        Ok(())
    }

    /// Drops a conversation from memory (restored from the journal later).
    fn forget(&mut self, conv: &ConversationId) {
        self.states.remove(conv);
        self.board.forget(conv);
    }
}

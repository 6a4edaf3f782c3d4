//! Runs one effect directive and journals its lifecycle in `CONV_IN`:
//! `started`, coalesced `delta`s / `progress`, then exactly one of
//! `completed`, `failed` or `canceled`, each caused by the directive and
//! with an id derived from what it reports (so a re-run after a crash
//! publishes the same ids and JetStream drops the repeats).

use std::time::{Duration, Instant};

use chrono::Utc;
use conv_contracts::live::LiveDelta;
use conv_contracts::payload::*;
use conv_contracts::{Envelope, Payload};
use conv_nats::journal;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cancel::Registry;
use crate::llm::{Provider, Retry};
use crate::metrics::Metrics;
use crate::scripted::Chunk;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;

/// The longest `sleep` (and timer) a tool call may ask for: 24 hours.
pub const MAX_DELAY_MS: u64 = conv_contracts::payload::MAX_DELAY_MS;

/// CloudEvents `source` of lifecycle events.
pub const SOURCE: &str = "/conv/effects";

pub use crate::coalesce::Coalesce;
use crate::coalesce::{self, Coalescer};

/// How far before a directive's time a resumed stream looks for its
/// journaled chunks: the input's time is stamped by ingress, the journal's
/// by the NATS server.
const RESUME_CLOCK_SLACK: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// What an executor needs.
#[derive(Debug, Clone)]
pub struct Executor {
    pub js: async_nats::jetstream::Context,
    pub registry: Registry,
    pub metrics: Metrics,
    pub provider: Provider,
    pub retry: Retry,
    pub coalesce: Coalesce,
    pub publish_timeout: Duration,
    /// Progress is sent this often for a running effect (below the ack wait).
    pub progress_every: Duration,
    /// Webhook tools by name.
    pub webhooks: std::collections::HashMap<String, crate::webhook::WebhookTool>,
    /// Secret of the callback tokens sent to webhook tools (`CONV_CALLBACK_SECRET`).
    pub callback_secret: Option<conv_nats::secret::Secret>,
    pub http: reqwest::Client,
    /// The `conv_timers` bucket.
    pub timers: async_nats::jetstream::kv::Store,
    /// Where LLM contexts are read by reference.
    pub snapshots: conv_store::Snapshots,
    /// The provider's context window in bytes.
    pub context_window: usize,
    /// The longest answer text a step may stream: `llm.completed` carries
    /// it whole, so it must fit one journaled event.
    pub max_answer_bytes: usize,
    /// A span per directive run and per event it journaled.
    pub tracer: conv_telemetry::Tracer,
}

/// The worker name of effects' spans ([`conv_telemetry::work_span_id`]).
const WORKER: &str = "effects";

/// How long a step waits for an unavailable context store before handing
/// its directive back.
const CONTEXT_PATIENCE: Duration = Duration::from_secs(10);

/// How long a lifecycle event whose journal is unavailable is retried in
/// place (backoff 250 ms doubling to 5 s) before the directive is handed
/// back. A cluster's leader election or a NATS restart takes seconds; the
/// directive's progress acks keep it meanwhile, and neither the model nor a
/// tool is called again. Handing back at once spent the consumer's
/// deliveries within an election and dead-lettered directives (found by
/// `convctl chaos --cluster`).
const JOURNAL_PATIENCE: Duration = Duration::from_secs(60);

/// The directive cannot be carried out now — a lifecycle event could not be
/// journaled, or what it reads is unavailable (NATS restarting): it is
/// handed back and retried later, costing none of the model's attempts.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RetryLater(pub String);

impl Executor {
    async fn emit(&self, directive: &Envelope, data: impl Into<Payload>) -> Result<(), RetryLater> {
        let data = data.into();
        let id = match data.natural_key() {
            Some(key) => format!("{}.{key}", directive.conversation_id()),
            None => format!("{}~{}", directive.id(), Utc::now().timestamp_nanos_opt().unwrap_or_default()),
        };
        let event = Envelope::service(id, SOURCE, directive.conversation_id().clone(), data)
            .caused_by(directive)
            .with_time(Utc::now());
        let msg_id = conv_contracts::trust::derived_msg_id(event.conversation_id(), event.id());
        let span = self.tracer.event(
            &event,
            Some(conv_telemetry::work_span_id(directive.conversation_id().as_str(), directive.id(), WORKER)),
            std::time::SystemTime::now(),
        );
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(250);
        let appended = loop {
            match journal::append(&self.js, &event, &msg_id, &[], self.publish_timeout).await {
                Err(journal::AppendError::Unavailable(detail)) if started.elapsed() + backoff < JOURNAL_PATIENCE => {
                    tracing::info!(
                        message = "Journal unavailable; retrying the event in place.",
                        event_id = %event.id(),
                        conversation_id = %event.conversation_id(),
                        %detail,
                        backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX)
                    );
                    self.metrics.retries_in_place.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                other => break other,
            }
        };
        match appended {
            Ok(a) => {
                if let Some(span) = span.filter(|_| !a.duplicate) {
                    self.tracer.finish(span.attr(conv_telemetry::attr::STREAM_SEQ, a.seq));
                }
                Ok(())
            }
            Err(journal::AppendError::TooLarge(detail)) => match too_large_outcome(event.data(), &detail) {
                // An outcome the journal cannot take ends its effect visibly
                // instead of being retried forever.
                Some(instead) => {
                    tracing::warn!(message = "Outcome too large for the journal; failing the effect.", event_id = %event.id(), %detail);
                    Box::pin(self.emit(directive, instead)).await
                }
                None => Err(RetryLater(format!(
                    "journaling a lifecycle event failed: {}",
                    journal::AppendError::TooLarge(detail)
                ))),
            },
            Err(e) => Err(RetryLater(format!("journaling a lifecycle event failed: {e}"))),
        }
    }

    /// Runs a directive to its end (or its cancel).
    /// `redelivered`: an earlier run of this directive may have journaled part
    /// of its output (its instance died); the run then resumes after it.
    pub async fn run(&self, directive: &Envelope, redelivered: bool) -> Result<(), RetryLater> {
        let name = match directive.data() {
            Payload::LlmRequested(_) => "effects.llm",
            Payload::ToolRequested(_) => "effects.tool",
            Payload::TimerScheduled(_) => "effects.timer.schedule",
            Payload::TimerCancelRequested(_) => "effects.timer.cancel",
            // A cancel's span is recorded where it takes effect (`cancel`).
            _ => return self.run_inner(directive, redelivered).await,
        };
        let span = self.tracer.work(name, WORKER, directive, std::time::SystemTime::now());
        let outcome = self.run_inner(directive, redelivered).await;
        if let Some(span) = span {
            let span = span.attr(conv_telemetry::attr::REDELIVERED, redelivered);
            self.tracer.finish(match &outcome {
                Ok(()) => span,
                // The run that ends the directive has the id its events
                // link to; an attempt handed back is a sibling of its own.
                Err(e) => {
                    span.with_id(conv_telemetry::SpanId::unique()).failed(format!("handed back to be retried: {e}"))
                }
            });
        }
        outcome
    }

    async fn run_inner(&self, directive: &Envelope, redelivered: bool) -> Result<(), RetryLater> {
        match directive.data() {
            Payload::LlmRequested(r) => self.llm(directive, r, redelivered).await,
            Payload::ToolRequested(t) => self.tool(directive, t).await,
            Payload::CancelRequested(c) => {
                self.cancel(directive, c);
                Ok(())
            }
            Payload::TimerScheduled(t) => {
                let start = directive.time().unwrap_or_else(Utc::now);
                let timer = crate::timers::Timer {
                    conversation_id: directive.conversation_id().to_string(),
                    timer_id: t.timer_id.clone(),
                    fire_at_ms: start
                        .timestamp_millis()
                        .saturating_add(i64::try_from(t.delay_ms.min(MAX_DELAY_MS)).unwrap_or(i64::MAX)),
                    directive_id: directive.id().to_owned(),
                    correlation_id: directive.correlation_id().map(str::to_owned),
                };
                crate::timers::schedule(&self.timers, &timer).await.map_err(|e| RetryLater(e.to_string()))
            }
            Payload::TimerCancelRequested(t) => {
                crate::timers::cancel(&self.timers, directive.conversation_id().as_str(), &t.timer_id)
                    .await
                    .map_err(|e| RetryLater(e.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Calls a webhook tool with retries; journals its result (or nothing when
    /// it answers later through ingress).
    async fn webhook(
        &self,
        directive: &Envelope,
        t: &ToolRequested,
        hook: &crate::webhook::WebhookTool,
        cancel: &CancellationToken,
    ) -> Result<(), RetryLater> {
        use crate::webhook::{Answer, CallError, call};
        let id = t.tool_call_id.clone();
        // Lets the webhook post its result later, for this call only.
        let token = self.callback_secret.as_ref().map(|secret| {
            conv_contracts::trust::callback_token(
                secret.expose().as_bytes(),
                directive.conversation_id(),
                conv_contracts::trust::CallbackTarget::Tool { tool_call_id: &id },
            )
        });
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_jitter()
            .with_max_times(hook.retries)
            .build();
        loop {
            let attempt = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.metrics.canceled.with_label_values(&["tool"]).inc();
                    return self.emit(directive, ToolCanceled { tool_call_id: id, reason: Some("canceled".into()) }).await;
                }
                a = call(&self.http, hook, directive, &id, &t.args, token.as_deref()) => a,
            };
            if let Err(CallError::Transient(e)) = &attempt
                && e.contains("timed out")
            {
                self.metrics.timeouts.with_label_values(&["tool"]).inc();
            }
            match attempt {
                Ok(Answer::Done(result)) => {
                    self.metrics.completed.with_label_values(&["tool"]).inc();
                    return self.emit(directive, ToolCompleted { tool_call_id: id, result }).await;
                }
                Ok(Answer::Later) => return Ok(()),
                Err(CallError::Transient(e)) => match backoff.next() {
                    Some(delay) => {
                        self.metrics.retries.with_label_values(&["tool"]).inc();
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => {
                                self.metrics.canceled.with_label_values(&["tool"]).inc();
                                return self.emit(directive, ToolCanceled { tool_call_id: id, reason: Some("canceled".into()) }).await;
                            }
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    None => {
                        self.metrics.failed.with_label_values(&["tool"]).inc();
                        self.metrics.dispatch_failures.inc();
                        let error = format!("gave up after {} retries: {e}", hook.retries);
                        return self.emit(directive, ToolFailed { tool_call_id: id, error, retryable: true }).await;
                    }
                },
                Err(CallError::Permanent(error)) => {
                    self.metrics.failed.with_label_values(&["tool"]).inc();
                    self.metrics.dispatch_failures.inc();
                    return self.emit(directive, ToolFailed { tool_call_id: id, error, retryable: false }).await;
                }
            }
        }
    }

    /// Stops the named effects if they run here. The directive's `time` is the
    /// abort's (or stop's) acceptance time, so this observes the abort
    /// latency: accepted → the running effect told to stop.
    pub fn cancel(&self, directive: &Envelope, c: &CancelRequested) {
        let mut stopped = 0usize;
        for id in &c.effect_ids {
            if self.registry.cancel(directive.conversation_id().as_str(), id) {
                stopped += 1;
                if let Some(t) = directive.time() {
                    let latency = (Utc::now() - t).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                    self.metrics.abort_latency.observe(latency);
                }
            }
        }
        // Once per instance: by the first of the cancel's copies that stops
        // something here (every instance sees a cancel; each has its share).
        if stopped > 0 {
            let start = directive.time().map(std::time::SystemTime::from).unwrap_or_else(std::time::SystemTime::now);
            if let Some(span) = self.tracer.work("effects.cancel", WORKER, directive, start) {
                self.tracer.finish(
                    span.with_id(conv_telemetry::SpanId::unique()).attr(conv_telemetry::attr::STOPPED, stopped),
                );
            }
        }
    }

    async fn llm(&self, directive: &Envelope, r: &LlmRequested, redelivered: bool) -> Result<(), RetryLater> {
        let conv = directive.conversation_id().as_str();
        let (step_id, attempt) = (r.step_id.clone(), r.attempt);
        let effect = llm_effect_id(&step_id, attempt);
        let Some(cancel) = self.registry.start(conv, &effect) else {
            self.metrics.canceled.with_label_values(&["llm"]).inc();
            return self
                .emit(directive, LlmCanceled { step_id, attempt, reason: Some("canceled before it started".into()) })
                .await;
        };
        let started = Instant::now();
        let resume = if redelivered { self.journaled_deltas(directive, r).await } else { (String::new(), 0) };
        let result = self.llm_inner(directive, r, &cancel, resume).await;
        self.registry.finish(conv, &effect);
        self.metrics.duration.with_label_values(&["llm"]).observe(started.elapsed().as_secs_f64());
        result
    }

    /// The step's context: read by reference from the stored entries (or,
    /// for a directive journaled before references, the inline one), within
    /// the provider's window.
    async fn context(
        &self,
        directive: &Envelope,
        r: &LlmRequested,
    ) -> Result<Vec<ContextMessage>, conv_store::context::ContextError> {
        let conv = directive.conversation_id().as_str();
        let read = match r.context_ref {
            Some(reference) => conv_store::context::read(&self.snapshots, conv, reference, self.context_window).await?,
            None => {
                let mut window = conv_core::context::Window::new(self.context_window);
                for m in r.context.iter().rev() {
                    if !window.offer_older(m.clone())? {
                        break;
                    }
                }
                let (messages, dropped) = window.finish();
                conv_store::context::Context { messages, dropped }
            }
        };
        if read.dropped > 0 {
            self.metrics.context_dropped.inc_by(read.dropped as u64);
            tracing::debug!(
                message = "Older context left out by the window.",
                conversation_id = conv,
                step_id = %r.step_id,
                dropped = read.dropped,
                kept = read.messages.len(),
            );
        }
        Ok(read.messages)
    }

    /// The text and count of deltas an earlier run of this step attempt journaled.
    async fn journaled_deltas(&self, directive: &Envelope, r: &LlmRequested) -> (String, u64) {
        let filter = conv_contracts::subject::in_family_filter("llm", directive.conversation_id());
        let in_stream = conv_contracts::subject::STREAM_IN;
        // The step's chunks were journaled after the input that asked for it
        // was accepted (the directive's time): read from there, with room for
        // clocks apart, not the conversation's whole history.
        let stored = match directive.time() {
            Some(at) => conv_nats::read::since(&self.js, in_stream, &filter, at - RESUME_CLOCK_SLACK, false).await,
            None => conv_nats::read::all(&self.js, in_stream, &filter, false).await,
        };
        let Ok(stored) = stored else {
            return (String::new(), 0);
        };
        let mut deltas: Vec<LlmDelta> = stored
            .iter()
            .filter_map(|m| {
                conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, conv_contracts::Limits::default())
                    .ok()
            })
            .filter_map(|e| match e.into_data() {
                Payload::LlmDelta(d) if d.step_id == r.step_id && d.attempt == r.attempt => Some(d),
                _ => None,
            })
            .collect();
        deltas.sort_by_key(|d| d.seq);
        deltas.dedup_by_key(|d| d.seq);
        let next = deltas.last().map(|d| d.seq + 1).unwrap_or(0);
        (deltas.into_iter().map(|d| d.text).collect(), next)
    }

    async fn llm_inner(
        &self,
        directive: &Envelope,
        r: &LlmRequested,
        cancel: &CancellationToken,
        (already, next_seq): (String, u64),
    ) -> Result<(), RetryLater> {
        let (step_id, attempt) = (r.step_id.clone(), r.attempt);
        self.emit(directive, LlmStarted { step_id: step_id.clone(), attempt }).await?;
        // A store that does not answer (NATS restarting) is waited for a
        // while here, so that the directive is not handed back (and dead-
        // lettered after max_deliver) for an outage of a few seconds.
        let mut waited = Duration::ZERO;
        let context = loop {
            let context = tokio::select! {
                biased;
                _ = cancel.cancelled() => return self.canceled(directive, &step_id, attempt).await,
                c = self.context(directive, r) => c,
            };
            match context {
                Err(e) if e.is_transient() && waited < CONTEXT_PATIENCE => {
                    tracing::debug!(message = "Context store unavailable; reading again.", step_id = %step_id, error = %e);
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return self.canceled(directive, &step_id, attempt).await,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    waited += Duration::from_millis(500);
                }
                other => break other,
            }
        };
        let context = match context {
            Ok(c) => c,
            // The store is unavailable (NATS restarting): not the model's
            // failure; the directive comes back and reads again.
            Err(e) if e.is_transient() => return Err(RetryLater(format!("reading the step's context failed: {e}"))),
            Err(e) => return self.failed(directive, &step_id, attempt, format!("context: {e}"), false).await,
        };
        // Start the call, retrying transient failures with jittered backoff.
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.retry.max_retries)
            .build();
        let call_started = Instant::now();
        let mut first_chunk = true;
        let mut chunks = loop {
            let started = tokio::select! {
                biased;
                _ = cancel.cancelled() => return self.canceled(directive, &step_id, attempt).await,
                s = self.provider.start(&context, &step_id) => s,
            };
            match started {
                Ok(stream) => break stream,
                Err(e) if e.is_transient() => match backoff.next() {
                    Some(delay) => {
                        self.metrics.retries.with_label_values(&["llm"]).inc();
                        tracing::info!(message = "Model call failed; retrying.", step_id = %step_id, error = %e, delay_ms = delay.as_millis() as u64);
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return self.canceled(directive, &step_id, attempt).await,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    None => {
                        return self
                            .failed(
                                directive,
                                &step_id,
                                attempt,
                                format!("gave up after {} retries: {e}", self.retry.max_retries),
                                true,
                            )
                            .await;
                    }
                },
                Err(e) => return self.failed(directive, &step_id, attempt, e.to_string(), false).await,
            }
        };
        let entry_id = r.entry_id.clone().unwrap_or_else(|| llm_effect_id(&step_id, attempt));
        let live_subject = conv_contracts::subject::live_subject(directive.conversation_id());
        let live = self.js.client();
        // Resuming: what an earlier run journaled stays; its bytes are not
        // sent again and the answer continues after them.
        let mut skip = already.len();
        let mut text = already;
        let mut tool_calls = Vec::new();
        let mut durable = Coalescer::new(self.coalesce.clone());
        let mut seq = next_seq;
        let mut stall_at = tokio::time::Instant::now() + self.retry.stall_timeout;
        loop {
            let next = tokio::select! {
                biased;
                // Returning drops `chunks`, and with it the provider connection.
                _ = cancel.cancelled() => return self.canceled(directive, &step_id, attempt).await,
                // Buffered text is journaled when due, also while the provider is quiet.
                () = coalesce::until(durable.deadline()) => None,
                n = tokio::time::timeout_at(stall_at, chunks.next()) => Some(n),
            };
            let chunk = match next {
                None => None,
                Some(Err(_)) => {
                    self.metrics.timeouts.with_label_values(&["llm"]).inc();
                    let error = format!("the stream stalled: nothing for {} ms", self.retry.stall_timeout.as_millis());
                    return self.failed(directive, &step_id, attempt, error, true).await;
                }
                Some(Ok(None)) => break,
                Some(Ok(Some(Err(e)))) => {
                    return self.failed(directive, &step_id, attempt, e.to_string(), e.is_transient()).await;
                }
                Some(Ok(Some(Ok(chunk)))) => {
                    stall_at = tokio::time::Instant::now() + self.retry.stall_timeout;
                    Some(chunk)
                }
            };
            if chunk.is_some() && first_chunk {
                first_chunk = false;
                self.metrics.first_token.observe(call_started.elapsed().as_secs_f64());
            }
            match chunk {
                None => {}
                Some(Chunk::Text(t)) => {
                    let fresh = if skip >= t.len() {
                        skip -= t.len();
                        ""
                    } else {
                        let cut = (skip..=t.len()).find(|i| t.is_char_boundary(*i)).unwrap_or(t.len());
                        skip = 0;
                        &t[cut..]
                    };
                    if !fresh.is_empty() {
                        // The live lane: at once, not journaled.
                        let piece = LiveDelta {
                            entry_id: entry_id.clone(),
                            step_id: step_id.clone(),
                            attempt,
                            offset: text.len() as u64,
                            text: fresh.to_owned(),
                            time: Some(Utc::now()),
                        };
                        if let Err(error) = live.publish(live_subject.clone(), piece.to_bytes().into()).await {
                            tracing::debug!(message = "Live delta not sent.", %error);
                        }
                        self.metrics.live_deltas.inc();
                        text.push_str(fresh);
                        if text.len() > self.max_answer_bytes {
                            // `completed` carries the whole text: past this it could not be journaled.
                            let error = format!(
                                "the answer passed {} bytes, the longest a step may stream here \
                                 (CONV_LLM_MAX_ANSWER_BYTES, at most what one journaled event holds); stopped",
                                self.max_answer_bytes
                            );
                            return self.failed(directive, &step_id, attempt, error, false).await;
                        }
                        durable.push(fresh);
                    }
                }
                Some(Chunk::ToolCall(call)) => tool_calls.push(call),
            }
            if let Some(chunk_text) = durable.take_due() {
                // The durable lane: a chunk through the journal.
                let delta = LlmDelta { step_id: step_id.clone(), attempt, seq, text: chunk_text };
                // Under load the ack of a chunk can take a while: a cancel
                // does not wait for it. The chunk is journaled before the
                // `canceled` or not at all (same connection, in order), and
                // nothing follows the `canceled`, so no gap is left behind.
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return self.canceled(directive, &step_id, attempt).await,
                    emitted = self.emit(directive, delta) => emitted?,
                }
                self.metrics.deltas.inc();
                seq += 1;
            }
        }
        drop(chunks);
        // What is still buffered is journaled as part of `completed`, whose
        // text is exactly the step's deltas joined (plus this rest).
        let finish_reason = Some(if tool_calls.is_empty() { "stop" } else { "tool_calls" }.to_owned());
        self.metrics.completed.with_label_values(&["llm"]).inc();
        self.emit(directive, LlmCompleted { step_id, attempt, text, tool_calls, finish_reason }).await
    }

    async fn failed(
        &self,
        directive: &Envelope,
        step_id: &str,
        attempt: u32,
        error: String,
        retryable: bool,
    ) -> Result<(), RetryLater> {
        self.metrics.failed.with_label_values(&["llm"]).inc();
        tracing::warn!(message = "Model call failed.", step_id, %error, retryable);
        self.emit(directive, LlmFailed { step_id: step_id.to_owned(), attempt, error, retryable }).await
    }

    async fn canceled(&self, directive: &Envelope, step_id: &str, attempt: u32) -> Result<(), RetryLater> {
        self.metrics.canceled.with_label_values(&["llm"]).inc();
        self.emit(directive, LlmCanceled { step_id: step_id.to_owned(), attempt, reason: Some("canceled".into()) })
            .await
    }

    async fn tool(&self, directive: &Envelope, t: &ToolRequested) -> Result<(), RetryLater> {
        let conv = directive.conversation_id().as_str();
        let id = t.tool_call_id.clone();
        let Some(cancel) = self.registry.start(conv, &id) else {
            self.metrics.canceled.with_label_values(&["tool"]).inc();
            return self
                .emit(directive, ToolCanceled { tool_call_id: id, reason: Some("canceled before it started".into()) })
                .await;
        };
        let started = Instant::now();
        let result = async {
            self.emit(directive, ToolStarted { tool_call_id: id.clone() }).await?;
            match t.name.as_str() {
                "echo" => {
                    self.metrics.completed.with_label_values(&["tool"]).inc();
                    self.emit(directive, ToolCompleted { tool_call_id: id.clone(), result: t.args.clone() }).await
                }
                "sleep" => {
                    let ms = t.args.get("ms").and_then(serde_json::Value::as_u64).unwrap_or(1000);
                    if ms > MAX_DELAY_MS {
                        self.metrics.failed.with_label_values(&["tool"]).inc();
                        let error = format!("sleep: `ms` must be at most {MAX_DELAY_MS} (24 h), got {ms}");
                        return self.emit(directive, ToolFailed { tool_call_id: id.clone(), error, retryable: false }).await;
                    }
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => {
                            self.metrics.canceled.with_label_values(&["tool"]).inc();
                            self.emit(directive, ToolCanceled { tool_call_id: id.clone(), reason: Some("canceled".into()) }).await
                        }
                        _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                            self.metrics.completed.with_label_values(&["tool"]).inc();
                            self.emit(directive, ToolCompleted { tool_call_id: id.clone(), result: json!({"slept_ms": ms}) }).await
                        }
                    }
                }
                name => match self.webhooks.get(name) {
                    Some(hook) => self.webhook(directive, t, hook, &cancel).await,
                    None => {
                        self.metrics.failed.with_label_values(&["tool"]).inc();
                        let error = format!("unknown tool {name:?}; built-in tools are echo and sleep");
                        self.emit(directive, ToolFailed { tool_call_id: id.clone(), error, retryable: false }).await
                    }
                },
            }
        }
        .await;
        self.registry.finish(conv, &id);
        self.metrics.duration.with_label_values(&["tool"]).observe(started.elapsed().as_secs_f64());
        result
    }
}

/// The failure that replaces a completed outcome too large to journal (a
/// tool result, an answer with huge tool-call arguments); `None` for
/// anything else.
fn too_large_outcome(data: &Payload, detail: &str) -> Option<Payload> {
    match data {
        Payload::LlmCompleted(c) => Some(
            LlmFailed {
                step_id: c.step_id.clone(),
                attempt: c.attempt,
                error: format!("the answer is larger than the journal takes ({detail})"),
                retryable: false,
            }
            .into(),
        ),
        Payload::ToolCompleted(t) => Some(
            ToolFailed {
                tool_call_id: t.tool_call_id.clone(),
                error: format!("the tool result is larger than the journal takes ({detail})"),
                retryable: false,
            }
            .into(),
        ),
        _ => None,
    }
}

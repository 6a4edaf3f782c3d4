//! # conv-effects
//!
//! Effect workers. Instances share the `CONV_EFFECT` work queue (the durable
//! `effects` consumer: any instance runs any effect; add instances to
//! scale), run each directive with bounded concurrency ([`executor`]) and
//! journal its lifecycle in `CONV_IN`; the directive is acked only after the
//! final lifecycle event is stored, and progress is sent while it runs.
//!
//! Cancellation: every instance also reads every `conv.effect.cancel.*`
//! directive (an ordered consumer of its own) and stops the effects it runs
//! itself ([`cancel`]): the sleeping tool returns, the stream stops, and
//! `canceled` is journaled. A cancel that arrives first keeps the effect from
//! starting.
//!
//! LLM providers: `scripted` and `openai` ([`llm`]); built-in tools `echo`
//! and `sleep`, HTTP webhook tools ([`webhook`]), durable timers ([`timers`]).

pub mod cancel;
pub mod coalesce;
pub mod executor;
pub mod hints;
pub mod llm;
pub mod metrics;
pub mod openai;
pub mod scripted;
pub mod timers;
pub mod webhook;

/// The tool name that schedules a timer (the runtime answers it; effects
/// keeps the timer).
pub use conv_contracts::payload::TIMER_TOOL;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{AckKind, Message};
use conv_contracts::payload::CancelRequested;
use conv_contracts::subject::STREAM_EFFECT;
use conv_contracts::{Limits, Payload};
use conv_nats::service::{self, ConfigError, Env, Identity, Options, Settings};
use conv_nats::topology::EFFECTS_CONSUMER;
use futures::StreamExt;
use prometheus::Registry;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-effects",
    about: "Effect workers of conv: LLM streaming, tools and timers, with cancellation, retry and timeouts.",
    addr_env: "CONV_EFFECTS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9102),
    options_help: concat!(
        "  CONV_LLM_PROVIDER               scripted (default; offline, deterministic) or openai\n",
        "  CONV_LLM_BASE_URL               OpenAI-compatible base URL, e.g. https://api.openai.com/v1\n",
        "  CONV_LLM_MODEL                  model name for openai\n",
        "  CONV_LLM_API_KEY                bearer token for openai (may be empty for local servers)\n",
        "  CONV_LLM_MAX_RETRIES            retries of a failing model call (default 3)\n",
        "  CONV_LLM_STALL_TIMEOUT_MS       a stream silent this long fails (default 30000)\n",
        "  CONV_LLM_RETRY_MIN_MS           backoff between retries: first delay (default 200)\n",
        "  CONV_LLM_RETRY_MAX_MS           backoff between retries: longest delay (default 5000)\n",
        "  CONV_LLM_CONNECT_TIMEOUT_MS     connect timeout of one attempt (default 10000)\n",
        "  CONV_LLM_MAX_CONTEXT_BYTES      context window: the newest messages up to this many bytes are sent,\n",
        "                                  older ones dropped whole (default: openai 400000, scripted 262144)\n",
        "  CONV_LLM_MAX_ANSWER_BYTES       longest answer a step may stream; past it the step fails (default and\n",
        "                                  upper bound: the NATS server's max_payload less 16 KiB)\n",
        "  CONV_SCRIPTED_TOKENS            tokens per scripted answer (default 24)\n",
        "  CONV_SCRIPTED_TOKEN_DELAY_MS    delay per scripted token (default 15)\n",
        "  CONV_EFFECTS_CONCURRENCY        effects run at once on this instance, all classes (default 1280)\n",
        "  CONV_EFFECTS_LLM_CONCURRENCY    LLM streams run at once (default 1024)\n",
        "  CONV_EFFECTS_TOOL_CONCURRENCY   tool calls run at once (default 256); cancels never wait for a slot\n",
        "  CONV_EFFECTS_COALESCE_MS        durable lane: journal a text chunk once its oldest byte is this old (default 3000)\n",
        "  CONV_EFFECTS_COALESCE_BYTES     durable lane: or once this many bytes wait (default 16384); the live lane sends every piece at once\n",
        "  CONV_EFFECTS_PROGRESS_MS        progress of running and queued effects (default 1000; below effects_ack_wait_secs)\n",
        "  CONV_WEBHOOK_TOOLS              JSON array of webhook tools [{name, url, timeout_ms?, retries?, hmac_secret?}]\n",
        "  CONV_CALLBACK_SECRET            secret of the callback tokens sent to webhook tools (same as ingress's)\n",
    ),
};

/// Effects settings beyond the common ones (`[options]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EffectsOptions {
    pub llm_provider: String,
    pub scripted_tokens: usize,
    pub scripted_token_delay_ms: u64,
    pub concurrency: usize,
    pub llm_concurrency: usize,
    pub tool_concurrency: usize,
    pub coalesce_ms: u64,
    pub coalesce_bytes: usize,
    pub llm_base_url: String,
    pub llm_model: String,
    pub llm_api_key: conv_nats::secret::Secret,
    pub llm_max_retries: usize,
    pub llm_retry_min_ms: u64,
    pub llm_retry_max_ms: u64,
    pub llm_stall_timeout_ms: u64,
    pub llm_connect_timeout_ms: u64,
    /// The context window in bytes (0: the provider's default, see
    /// [`EffectsOptions::context_window`]).
    pub llm_max_context_bytes: usize,
    /// The longest answer a step may stream (0, or more than the journal
    /// takes: what one journaled event holds, see
    /// [`EffectsOptions::max_answer_bytes`]).
    pub llm_max_answer_bytes: usize,
    /// Progress interval for running effects (keep it well below the consumer's ack wait).
    pub progress_ms: u64,
    /// Webhook tools (`[[options.tools]]`, or JSON in `CONV_WEBHOOK_TOOLS`).
    pub tools: Vec<webhook::WebhookTool>,
    /// Secret of the callback tokens given to webhook tools, the same as
    /// ingress's (`CONV_CALLBACK_SECRET`; empty: no token is sent).
    pub callback_secret: conv_nats::secret::Secret,
}

impl Default for EffectsOptions {
    fn default() -> Self {
        Self {
            llm_provider: "scripted".into(),
            scripted_tokens: 24,
            scripted_token_delay_ms: 15,
            concurrency: 1_280,
            llm_concurrency: 1_024,
            tool_concurrency: 256,
            coalesce_ms: 3_000,
            coalesce_bytes: 16_384,
            llm_base_url: String::new(),
            llm_model: String::new(),
            llm_api_key: conv_nats::secret::Secret::default(),
            llm_max_retries: 3,
            llm_retry_min_ms: 200,
            llm_retry_max_ms: 5_000,
            llm_stall_timeout_ms: 30_000,
            llm_connect_timeout_ms: 10_000,
            llm_max_context_bytes: 0,
            llm_max_answer_bytes: 0,
            progress_ms: 1_000,
            tools: Vec::new(),
            callback_secret: conv_nats::secret::Secret::default(),
        }
    }
}

impl EffectsOptions {
    /// The admission limits (each class within the total).
    pub fn admission(&self) -> Admission {
        Admission {
            total: self.concurrency,
            llm: self.llm_concurrency.min(self.concurrency),
            tools: self.tool_concurrency.min(self.concurrency),
        }
    }

    /// The context window in bytes: the configured one, else the provider's
    /// default (openai: 400 000 bytes, about 100 000 tokens; scripted:
    /// 256 KiB — it answers from the last messages only).
    pub fn context_window(&self) -> usize {
        match (self.llm_max_context_bytes, self.llm_provider.as_str()) {
            (0, "openai") => 400_000,
            (0, _) => 256 * 1024,
            (n, _) => n,
        }
    }

    /// The longest answer text a step may stream: `llm.completed` carries
    /// it whole, so at most the server's `max_payload` less 16 KiB for the
    /// rest of the event; less if configured.
    pub fn max_answer_bytes(&self, max_payload: usize) -> usize {
        let journal = max_payload.saturating_sub(16 * 1024);
        match self.llm_max_answer_bytes {
            0 => journal,
            n => n.min(journal),
        }
    }
}

impl Options for EffectsOptions {
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        conv_nats::env_overrides!(env, self, "CONV_": llm_provider, scripted_tokens, scripted_token_delay_ms,
            llm_base_url, llm_model, llm_api_key, llm_max_retries, llm_stall_timeout_ms, llm_retry_min_ms,
            llm_retry_max_ms, llm_connect_timeout_ms, llm_max_context_bytes, llm_max_answer_bytes, callback_secret);
        conv_nats::env_overrides!(env, self, "CONV_EFFECTS_": concurrency, llm_concurrency, tool_concurrency,
            coalesce_ms, coalesce_bytes, progress_ms);
        if let Some(json) = env("CONV_WEBHOOK_TOOLS") {
            // The error names the place, not the text there: it may hold an HMAC secret.
            self.tools = serde_json::from_str(&json).map_err(|e| ConfigError::Env {
                var: "CONV_WEBHOOK_TOOLS".into(),
                detail: format!(
                    "expected a JSON array of {{name, url, timeout_ms?, retries?, hmac_secret?}}: {:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            })?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), conv_nats::service::Invalid> {
        match self.llm_provider.as_str() {
            "scripted" => {}
            "openai" if self.llm_base_url.is_empty() || self.llm_model.is_empty() => {
                return Err("CONV_LLM_PROVIDER=openai needs CONV_LLM_BASE_URL and CONV_LLM_MODEL".into());
            }
            "openai" => {}
            other => return Err(format!("CONV_LLM_PROVIDER={other:?}: use `scripted` or `openai`").into()),
        }
        if self.llm_stall_timeout_ms == 0 || self.llm_retry_min_ms == 0 {
            return Err("options.llm_stall_timeout_ms and options.llm_retry_min_ms must be positive".into());
        }
        for tool in &self.tools {
            if ["echo", "sleep", TIMER_TOOL].contains(&tool.name.as_str()) || tool.name.is_empty() {
                return Err(format!("webhook tool name {:?} is empty or taken by a built-in tool", tool.name).into());
            }
            if !(tool.url.starts_with("http://") || tool.url.starts_with("https://")) {
                // The URL may carry credentials: it is not repeated.
                return Err(format!("webhook tool {}: its url is not http(s)", tool.name).into());
            }
        }
        if self.concurrency == 0
            || self.llm_concurrency == 0
            || self.tool_concurrency == 0
            || self.coalesce_bytes == 0
            || self.progress_ms == 0
        {
            return Err("CONV_EFFECTS_CONCURRENCY, CONV_EFFECTS_LLM_CONCURRENCY, CONV_EFFECTS_TOOL_CONCURRENCY, options.coalesce_bytes and options.progress_ms must be positive".into());
        }
        Ok(())
    }
}

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings<EffectsOptions>;

/// Why the service stopped with an error.
pub type Error = service::ServiceError;

fn provider(o: &EffectsOptions) -> Result<llm::Provider, Error> {
    Ok(match o.llm_provider.as_str() {
        "openai" => llm::Provider::OpenAi(
            openai::OpenAi::new(
                &o.llm_base_url,
                &o.llm_model,
                o.llm_api_key.expose(),
                Duration::from_millis(o.llm_connect_timeout_ms),
                openai::tool_specs(&o.tools),
            )
            .map_err(Error::part("LLM provider"))?,
        ),
        _ => llm::Provider::Scripted(scripted::Scripted {
            tokens: o.scripted_tokens,
            delay: Duration::from_millis(o.scripted_token_delay_ms),
        }),
    })
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let o = &config.options;
    // What cannot start fails before anything runs.
    let provider = provider(o)?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(o.llm_connect_timeout_ms))
        .build()
        .map_err(Error::part("HTTP client of webhook tools"))?;
    let registry = Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let running = service::Running::start(&IDENTITY, &config, registry, &shutdown).await?;
    let booted = &running.booted;
    if !o.tools.is_empty() && o.callback_secret.is_empty() {
        tracing::warn!(
            message = "Webhook tools are configured without CONV_CALLBACK_SECRET: a webhook that answers 202 gets no callback token, and ingress refuses its result.",
            tools = o.tools.len()
        );
    }
    // Until `convctl setup` ran there is nothing to consume: wait, not ready.
    let attached = service::wait_for(&shutdown, || attach(&booted.js)).await;
    if let Some(Attached { inbox, timers, snapshots }) = attached {
        let executor = Arc::new(executor::Executor {
            js: booted.js.clone(),
            registry: cancel::Registry::default(),
            metrics,
            provider,
            retry: llm::Retry {
                max_retries: o.llm_max_retries,
                min_delay: Duration::from_millis(o.llm_retry_min_ms),
                max_delay: Duration::from_millis(o.llm_retry_max_ms.max(o.llm_retry_min_ms)),
                stall_timeout: Duration::from_millis(o.llm_stall_timeout_ms),
            },
            coalesce: executor::Coalesce {
                max_delay: Duration::from_millis(o.coalesce_ms),
                max_bytes: o.coalesce_bytes,
            },
            publish_timeout: Duration::from_secs(5),
            progress_every: Duration::from_millis(o.progress_ms),
            webhooks: o.tools.iter().map(|t| (t.name.clone(), t.clone())).collect(),
            callback_secret: (!o.callback_secret.is_empty()).then(|| o.callback_secret.clone()),
            http,
            timers: timers.clone(),
            snapshots,
            context_window: o.context_window(),
            max_answer_bytes: o.max_answer_bytes(conv_nats::connect::max_payload(&booted.client)),
            tracer: booted.tracer.clone(),
        });
        // Cancel hints on a thread and a connection of their own.
        let (hint_tx, hint_rx) = tokio::sync::mpsc::unbounded_channel();
        let listener = match hints::spawn(&config.nats, executor.clone(), hint_tx, shutdown.clone()).await {
            Ok(l) => l,
            Err(error) => return Err(running.fail("the cancel hint listener", error).await),
        };
        booted.health.watch_connection("nats-hints", listener.client().clone());
        let timer_task = tokio::spawn(timers::run(timers, booted.js.clone(), booted.tracer.clone(), shutdown.clone()));
        serve(executor, inbox, hint_rx, o.admission(), shutdown.clone()).await;
        shutdown.cancel();
        listener.join().await;
        service::joined("timers", timer_task).await;
    }
    running.stop().await
}

type Messages = async_nats::jetstream::consumer::pull::Stream;
type Ordered = async_nats::jetstream::consumer::pull::Ordered;

/// What effects read from and write to once the topology exists.
struct Attached {
    inbox: Inbox,
    timers: async_nats::jetstream::kv::Store,
    snapshots: conv_store::Snapshots,
}

/// What the serve loop reads: the shared work queue, and this instance's
/// own view of cancel directives (hints come from [`hints`]).
struct Inbox {
    work: Messages,
    cancels: Ordered,
}

async fn attach(js: &async_nats::jetstream::Context) -> Option<Attached> {
    let timers = js.get_key_value(conv_nats::topology::KV_TIMERS).await.ok()?;
    let snapshots = conv_store::Snapshots::open(js).await.ok()?;
    let stream = js.get_stream_no_info(STREAM_EFFECT).await.ok()?;
    let work: PullConsumer = stream.get_consumer(EFFECTS_CONSUMER).await.ok()?;
    let work = work.stream().max_messages_per_batch(64).expires(Duration::from_secs(2)).messages().await.ok()?;
    let cancels = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: conv_contracts::subject::cancel_filter(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .ok()?
        .messages()
        .await
        .ok()?;
    Some(Attached { inbox: Inbox { work, cancels }, timers, snapshots })
}

/// A cancel hint as the cancel directive it anticipates (same effect ids,
/// the abort's time), for the one cancel path.
fn hint_directive(subject: &str, payload: &[u8]) -> Option<(conv_contracts::Envelope, CancelRequested)> {
    let hint = conv_contracts::live::LiveCancel::from_bytes(payload)?;
    let conversation = conv_contracts::ConversationId::parse(subject.rsplit('.').next()?).ok()?;
    let cancel = CancelRequested { mode: hint.mode, effect_ids: hint.effect_ids, reason: None };
    let id = conv_contracts::id::derived_id(&hint.input_id, "hint");
    let event =
        conv_contracts::Envelope::service(id, executor::SOURCE, conversation, cancel.clone()).with_time(hint.time);
    Some((event, cancel))
}

fn decode(m: &Message) -> Result<conv_contracts::Envelope, conv_contracts::Rejection> {
    conv_nats::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, Limits::default())
}

/// How many effects of each class run at once on this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// All effects (`CONV_EFFECTS_CONCURRENCY`).
    pub total: usize,
    /// LLM streams (`CONV_EFFECTS_LLM_CONCURRENCY`).
    pub llm: usize,
    /// Tool calls (`CONV_EFFECTS_TOOL_CONCURRENCY`).
    pub tools: usize,
}

/// The admission class of a directive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Llm,
    Tool,
    /// Timer bookkeeping and cancels: quick, never queued.
    Quick,
}

fn class(p: &Payload) -> Class {
    match p {
        Payload::LlmRequested(_) => Class::Llm,
        Payload::ToolRequested(_) => Class::Tool,
        _ => Class::Quick,
    }
}

/// The id a cancel names the effect of this directive by.
fn effect_id(p: &Payload) -> Option<String> {
    match p {
        Payload::LlmRequested(r) => Some(conv_contracts::payload::llm_effect_id(&r.step_id, r.attempt)),
        Payload::ToolRequested(t) => Some(t.tool_call_id.clone()),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct Slots {
    total: usize,
    llm: usize,
    tools: usize,
}

impl Slots {
    fn free(&self, class: Class, limits: Admission) -> bool {
        match class {
            Class::Quick => true,
            Class::Llm => self.total < limits.total && self.llm < limits.llm,
            Class::Tool => self.total < limits.total && self.tools < limits.tools,
        }
    }

    fn take(&mut self, class: Class) {
        match class {
            Class::Quick => return,
            Class::Llm => self.llm += 1,
            Class::Tool => self.tools += 1,
        }
        self.total += 1;
    }

    fn give(&mut self, class: Class) {
        match class {
            Class::Quick => return,
            Class::Llm => self.llm -= 1,
            Class::Tool => self.tools -= 1,
        }
        self.total -= 1;
    }
}

struct Queued {
    event: conv_contracts::Envelope,
    message: Message,
    class: Class,
}

/// The effects running on this instance: each task's directive (event id)
/// and the class of slot it holds.
#[derive(Default)]
struct Running {
    tasks: JoinSet<()>,
    ids: HashMap<tokio::task::Id, (String, Class)>,
}

/// Runs one directive to its end and acks (or naks) it.
fn spawn_effect(running: &mut Running, executor: &Arc<executor::Executor>, q: Queued, class: Class) {
    let executor = executor.clone();
    let id = q.event.id().to_owned();
    let task = running.tasks.spawn(async move {
        let Queued { event, message, .. } = q;
        executor.metrics.in_flight.inc();
        let outcome = run_with_progress(&executor, &event, &message).await;
        executor.metrics.in_flight.dec();
        match outcome {
            Ok(()) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(message = "Failed to ack a directive.", event_id = %event.id(), %error);
                }
            }
            Err(error) => {
                tracing::warn!(message = "Effect will be retried.", event_id = %event.id(), %error);
                if let Err(error) = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await {
                    tracing::debug!(message = "Failed to nak a directive.", %error);
                }
            }
        }
    });
    running.ids.insert(task.id(), (id, class));
}

/// Handles a cancel at once: running effects are told to stop, queued ones
/// are taken out of the queue and journal their `canceled` without a slot.
fn cancel_now(
    executor: &Arc<executor::Executor>,
    event: &conv_contracts::Envelope,
    c: &CancelRequested,
    queue: &mut VecDeque<Queued>,
    running: &mut Running,
) {
    executor.cancel(event, c);
    let named = |q: &Queued| {
        q.event.conversation_id() == event.conversation_id()
            && effect_id(q.event.data()).is_some_and(|id| c.effect_ids.contains(&id))
    };
    let (hit, keep): (VecDeque<Queued>, VecDeque<Queued>) = std::mem::take(queue).into_iter().partition(named);
    *queue = keep;
    for q in hit {
        // The registry knows the cancel: the run journals `canceled` at once.
        spawn_effect(running, executor, q, Class::Quick);
    }
}

async fn serve(
    executor: Arc<executor::Executor>,
    inbox: Inbox,
    mut hints: tokio::sync::mpsc::UnboundedReceiver<hints::Hint>,
    limits: Admission,
    shutdown: CancellationToken,
) {
    let Inbox { mut work, mut cancels } = inbox;
    let mut queue: VecDeque<Queued> = VecDeque::new();
    let mut slots = Slots::default();
    let mut running = Running::default();
    // The directives queued or running here (event ids): a directive
    // delivered again while its effect runs here (its progress acks came
    // late) is left to that run instead of taking a second slot — under
    // load such copies filled every slot and new directives waited forever.
    let mut held: HashSet<String> = HashSet::new();
    let mut progress = tokio::time::interval(executor.progress_every);
    // Read ahead at most this far: the queue is what keeps acks alive.
    let max_queue = limits.total.max(64) * 2;
    tracing::info!(message = "Consuming effects.", total = limits.total, llm = limits.llm, tools = limits.tools);
    loop {
        // Admit what fits, oldest first per class.
        let mut i = 0;
        while i < queue.len() {
            if slots.free(queue[i].class, limits) {
                if let Some(q) = queue.remove(i) {
                    slots.take(q.class);
                    let class = q.class;
                    spawn_effect(&mut running, &executor, q, class);
                }
            } else {
                i += 1;
            }
        }
        executor.metrics.queued.set(i64::try_from(queue.len()).unwrap_or(i64::MAX));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // Already stopped through the registry by the listener; here
            // what still waits for a slot leaves the queue.
            Some((event, c)) = hints.recv() => cancel_now(&executor, &event, &c, &mut queue, &mut running),
            Some(Ok(m)) = cancels.next() => {
                if let Ok(event) = decode(&m)
                    && let Payload::CancelRequested(c) = event.data()
                {
                    cancel_now(&executor, &event, c, &mut queue, &mut running);
                }
            }
            Some(done) = running.tasks.join_next_with_id(), if !running.tasks.is_empty() => {
                let task = match done {
                    Ok((task, ())) => task,
                    Err(join) => {
                        tracing::error!(message = "An effect task failed.", error = %join);
                        join.id()
                    }
                };
                if let Some((id, class)) = running.ids.remove(&task) {
                    slots.give(class);
                    held.remove(&id);
                }
            }
            _ = progress.tick() => {
                for q in &queue {
                    if let Err(error) = q.message.ack_with(AckKind::Progress).await {
                        tracing::debug!(message = "Failed to send progress for a queued directive.", %error);
                    }
                }
            }
            next = work.next(), if queue.len() < max_queue => {
                let Some(next) = next else { break };
                let message = match next {
                    Ok(m) => m,
                    Err(error) => {
                        tracing::warn!(message = "Consumer stream error.", %error);
                        continue;
                    }
                };
                let event = match decode(&message) {
                    Ok(e) => e,
                    Err(rejection) => {
                        let reason = format!("{}: {rejection}", rejection.code());
                        if let Err(error) = conv_nats::consume::term_with_reason(&message, &reason).await {
                            tracing::warn!(message = "Failed to terminate an invalid directive.", %error);
                        }
                        continue;
                    }
                };
                if let Payload::CancelRequested(c) = event.data() {
                    // Cancels never wait for a slot.
                    cancel_now(&executor, &event, c, &mut queue, &mut running);
                    // Acked off the loop: a round trip per cancel would hold
                    // every other cancel and hint behind it in an abort storm.
                    tokio::spawn(async move {
                        if let Err(error) = message.double_ack().await {
                            tracing::warn!(message = "Failed to ack a cancel.", %error);
                        }
                    });
                    continue;
                }
                if !held.insert(event.id().to_owned()) {
                    tracing::debug!(message = "Delivered again while held here; the run in progress keeps it.", event_id = %event.id());
                    continue;
                }
                let class = class(event.data());
                queue.push_back(Queued { event, message, class });
            }
        }
    }
    // Queued directives go back at once, for another instance; running
    // effects get a moment to finish, what does not is redelivered.
    for q in queue {
        if let Err(error) = q.message.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(message = "Failed to hand a queued directive back.", %error);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while running.tasks.join_next().await.is_some() {} })
        .await;
    running.tasks.abort_all();
}

/// Runs an effect, sending progress so a long one is not redelivered under it.
async fn run_with_progress(
    executor: &executor::Executor,
    event: &conv_contracts::Envelope,
    message: &Message,
) -> Result<(), executor::RetryLater> {
    let redelivered = message.info().map(|i| i.delivered > 1).unwrap_or(false);
    if redelivered {
        executor.metrics.redeliveries.inc();
    }
    conv_nats::consume::with_progress(message, executor.progress_every, executor.run(event, redelivered)).await
}

#[cfg(test)]
mod options_tests {
    use super::*;

    #[test]
    fn every_option_has_an_env_override() {
        conv_nats::test_util::assert_every_key_has_env(EffectsOptions::apply_env, Some(IDENTITY.options_help));
    }
}

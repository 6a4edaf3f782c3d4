//! `convctl bench`: the whole pipeline under load, next to raw JetStream on
//! the same server in the same run.
//!
//! It starts its own `nats-server` (temp dir, free port) and one process of
//! every service (the binaries next to `convctl`; scripted provider, 0 ms
//! per token), then:
//! 1. N conversations × M turns through HTTP, each conversation reading its
//!    SSE stream: turns/s, first-delta latency (message accepted → first
//!    delta on the stream), journal writes per turn;
//! 2. abort latency: K conversations start a 30 s `sleep` tool, then all are
//!    aborted; latency = abort accepted → the canceled tool result on the stream;
//! 3. the abort storm: effects restarted with a slow scripted provider, S
//!    conversations streaming, all aborted at once; latency = abort `time`
//!    → `llm.canceled` `time`, read from the journal, next to the raw
//!    JetStream floor of such a storm on the same server
//!    ([`baseline::storm`]);
//! 4. raw JetStream async publish and consume+ack of the same number of
//!    messages as the pipeline journaled, on the same server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use conv_contracts::EventType;
use conv_nats::baseline;
use serde::Serialize;
use serde_json::{Value, json};

use super::chaos::stack::free_addr;
use crate::cli::Global;
use crate::{Error, Outcome};

#[derive(Debug, Serialize)]
pub struct Report {
    pub conversations: usize,
    pub turns_per_conversation: usize,
    pub turns: usize,
    pub turns_per_sec: f64,
    pub journal_writes_per_turn: f64,
    pub first_delta_ms_p50: f64,
    pub first_delta_ms_p99: f64,
    pub aborts: usize,
    pub abort_ms_p50: f64,
    pub abort_ms_p99: f64,
    pub pipeline_journal_writes_per_sec: f64,
    pub raw_async_publish_per_sec: f64,
    pub raw_consume_ack_per_sec: f64,
    pub ratio_writes_vs_raw_publish: f64,
    /// The abort storm: conversations streaming long replies, all aborted
    /// at once (0: not run).
    pub storm: usize,
    /// Of those, how many journaled `llm.canceled`.
    pub storm_canceled: usize,
    /// Abort `time` (set by ingress on acceptance) → `llm.canceled` `time`
    /// (set by effects once the stream stopped), read from the journal.
    pub storm_abort_ms_p50: f64,
    pub storm_abort_ms_p99: f64,
    /// The raw floor of such a storm on the same server while the streams
    /// run ([`baseline::storm`]): published together, read by one pull
    /// consumer per partition, answered on core NATS.
    pub raw_storm_ms_p50: f64,
    pub raw_storm_ms_p99: f64,
    /// `storm_abort_ms_p99 / raw_storm_ms_p99`: conv's storm against its
    /// floor in the same run (ADR 0013); like the storm's other figures,
    /// NaN (`null` in JSON) with `--storm 0`.
    pub ratio_storm_vs_raw_p99: f64,
    /// Where the storm's time goes: abort `time` → stored by JetStream
    /// (the server's clock), and → the runtime's cancel hint seen by the
    /// bench (a process of its own).
    pub storm_stored_ms_p50: f64,
    pub storm_stored_ms_p99: f64,
    pub storm_hints: usize,
    pub storm_hint_ms_p50: f64,
    pub storm_hint_ms_p99: f64,
    /// P0 inputs (aborts, stops; both consumers' copies) over the whole
    /// run, and their wait in the runtime's scheduler: the upper bounds of
    /// the `conv_runtime_queue_wait_seconds{priority="P0"}` buckets that
    /// hold the p50 and the p99 (the SLO: p99 ≤ 20 ms).
    pub p0_queued: u64,
    pub p0_queue_wait_ms_p50: f64,
    pub p0_queue_wait_ms_p99: f64,
    pub seconds: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// The median and the 99th percentile of `v`.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    (pct(&mut v, 0.5), pct(&mut v, 0.99))
}

async fn sse(http: &reqwest::Client, projections: SocketAddr, conv: &str) -> Result<Events, Error> {
    let stream = conv_client::EventStream::open(http, &format!("http://{projections}"), conv, None, None)
        .await
        .map_err(Error::http(format!("the stream of {conv}")))?;
    Ok(Events(stream))
}

/// A conversation's stream, with a deadline for each event.
struct Events(conv_client::EventStream);

impl Events {
    /// The next event; an error says why there is none (the server ended
    /// or closed the stream, it broke, or nothing came for 30 s).
    async fn next(&mut self, conv: &str) -> Result<conv_client::Event, Error> {
        match tokio::time::timeout(Duration::from_secs(30), self.0.next()).await {
            Err(_) => Err(Error::Failed(format!("{conv}: nothing on the stream for 30 s"))),
            Ok(None) => Err(Error::Failed(format!("{conv}: the server ended the stream"))),
            Ok(Some(Err(e))) => Err(Error::Failed(format!("{conv}: {e}"))),
            Ok(Some(Ok(event))) => Ok(event),
        }
    }
}

async fn post(http: &reqwest::Client, ingress: SocketAddr, conv: &str, what: &str, body: Value) -> Result<(), Error> {
    let r = http
        .post(format!("http://{ingress}/v1/conversations/{conv}/{what}"))
        .json(&body)
        .send()
        .await
        .map_err(Error::http(format!("POST {what} of {conv}")))?;
    if r.status().as_u16() != 202 {
        return Err(Error::Failed(format!("ingress answered {} to {what} of {conv}", r.status())));
    }
    Ok(())
}

/// Runs `work` for conversations `<prefix>-0` … `<prefix>-<n-1>` at once;
/// their results in that order, or the first error.
async fn each<T, F, Fut>(n: usize, prefix: &str, http: &reqwest::Client, work: F) -> Result<Vec<T>, Error>
where
    T: Send + 'static,
    F: Fn(reqwest::Client, String) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|c| tokio::spawn(work(http.clone(), format!("{prefix}-{c}")))).collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.map_err(|e| Error::Failed(format!("a bench task failed: {e}")))??);
    }
    Ok(out)
}

/// Messages in the journal's streams.
async fn stream_messages(js: &async_nats::jetstream::Context) -> Result<u64, Error> {
    let mut total = 0;
    for s in conv_contracts::subject::JOURNAL_STREAMS {
        let mut stream = js.get_stream(s).await.map_err(Error::js(s))?;
        total += stream.info().await.map_err(Error::js(s))?.state.messages;
    }
    Ok(total)
}

pub async fn run(
    g: &Global,
    conversations: usize,
    turns: usize,
    aborts: usize,
    storm: usize,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("conv-bench-{}", std::process::id()));
    let port = free_addr()?.port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut nats = super::up::start_nats(&url, &dir, true).await?;
    // On SIGINT/SIGTERM the bench is dropped, and with it the services
    // (killed on drop); the server is stopped here either way.
    let result = tokio::select! {
        r = bench(&url, conversations, turns, aborts, storm) => r,
        () = super::up::signalled() => Err(Error::Failed("interrupted".into())),
    };
    super::up::stop("nats-server", &mut nats).await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    let output = if g.json {
        crate::to_json(&report)
    } else {
        let r = &report;
        format!(
            "conv bench: {} conversations × {} turns, scripted provider (0 ms/token), one instance of each service\n\
             turns/s                          {:>10.1}\n\
             journal writes per turn          {:>10.1}\n\
             first delta after accept         p50 {:.1} ms, p99 {:.1} ms\n\
             abort → canceled on the stream   p50 {:.1} ms, p99 {:.1} ms ({} aborts)\n\
             pipeline journal writes/s        {:>10.0}\n\
             raw JetStream async publish/s    {:>10.0}\n\
             raw JetStream consume+ack/s      {:>10.0}\n\
             ratio writes / raw publish       {:>10.3}\n\
             abort storm: {} streaming, {} canceled; abort → canceled (journal) p50 {:.1} ms, p99 {:.1} ms\n\
               of which abort → stored p50 {:.1} ms, p99 {:.1} ms; abort → cancel hint seen p50 {:.1} ms, p99 {:.1} ms ({} hints)\n\
             raw JetStream storm (same server) p50 {:.1} ms, p99 {:.1} ms; storm p99 / raw p99 {:.1}\n\
             P0 wait in the runtime's scheduler  p50 ≤ {} ms, p99 ≤ {} ms ({} P0 inputs; bucket bounds)\n\
             took {:.1} s",
            r.conversations,
            r.turns_per_conversation,
            r.turns_per_sec,
            r.journal_writes_per_turn,
            r.first_delta_ms_p50,
            r.first_delta_ms_p99,
            r.abort_ms_p50,
            r.abort_ms_p99,
            r.aborts,
            r.pipeline_journal_writes_per_sec,
            r.raw_async_publish_per_sec,
            r.raw_consume_ack_per_sec,
            r.ratio_writes_vs_raw_publish,
            r.storm,
            r.storm_canceled,
            r.storm_abort_ms_p50,
            r.storm_abort_ms_p99,
            r.storm_stored_ms_p50,
            r.storm_stored_ms_p99,
            r.storm_hint_ms_p50,
            r.storm_hint_ms_p99,
            r.storm_hints,
            r.raw_storm_ms_p50,
            r.raw_storm_ms_p99,
            r.ratio_storm_vs_raw_p99,
            r.p0_queue_wait_ms_p50,
            r.p0_queue_wait_ms_p99,
            r.p0_queued,
            r.seconds,
        )
    };
    Ok(Outcome::ok(output))
}

async fn bench(url: &str, conversations: usize, turns: usize, aborts: usize, storm: usize) -> Result<Report, Error> {
    let nats = conv_nats::NatsConfig { url: url.to_owned(), ..Default::default() };
    let client = conv_nats::connect(&nats, "convctl-bench").await?;
    let js = conv_nats::jetstream(client, &nats);
    conv_nats::topology::apply(&js, &conv_nats::Topology::declare(&conv_nats::TopologyConfig::default())).await?;

    let (ingress, projections, runtime) = (free_addr()?, free_addr()?, free_addr()?);
    let launcher =
        Launcher { dir: super::up::bin_dir()?, url: url.to_owned(), callback_secret: super::up::random_secret()? };
    let mut services = Vec::new();
    for (name, var, addr) in [
        ("conv-ingress", "CONV_INGRESS_ADDR", ingress),
        ("conv-runtime", "CONV_RUNTIME_ADDR", runtime),
        ("conv-effects", EFFECTS_ADDR, free_addr()?),
        ("conv-projections", "CONV_PROJECTIONS_ADDR", projections),
    ] {
        services.push((name, addr, launcher.spawn(name, var, addr, &[])?));
    }
    // From here on, children left on an early return are killed when dropped.
    ready(&mut services, runtime, conv_nats::TopologyConfig::default().partitions).await?;
    let stack = Stack { services, ingress, projections, runtime, launcher };
    measure(&js, stack, conversations, turns, aborts, storm).await
}

const EFFECTS_ADDR: &str = "CONV_EFFECTS_ADDR";

/// A histogram's count and where its p50 and p99 fall (bucket upper bounds, ms).
struct Waits {
    count: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The runtime's `conv_runtime_queue_wait_seconds{priority="P0"}`.
async fn p0_queue_wait(http: &reqwest::Client, runtime: SocketAddr) -> Result<Waits, Error> {
    let scrape = async { http.get(format!("http://{runtime}/metrics")).send().await?.error_for_status()?.text().await };
    let text = scrape.await.map_err(|e| Error::Failed(format!("the runtime's metrics: {e}")))?;
    Ok(waits(&text, "conv_runtime_queue_wait_seconds", r#"priority="P0""#))
}

/// Histogram `metric`'s series with label `label` in a `/metrics` text
/// (read as `convctl readiness` reads the services' histograms).
fn waits(text: &str, metric: &str, label: &str) -> Waits {
    use conv_admin::readiness::{buckets, quantile};
    let b = buckets(text, metric, label);
    let at = |q: f64| quantile(&b, q).map_or(f64::NAN, |(le, _)| le * 1000.0);
    Waits { count: b.last().map_or(0, |(_, n)| *n), p50_ms: at(0.5), p99_ms: at(0.99) }
}

/// Starts the services' binaries (next to `convctl`) for the bench.
struct Launcher {
    dir: std::path::PathBuf,
    url: String,
    callback_secret: String,
}

impl Launcher {
    /// Starts service `name` listening on `addr` (its address variable
    /// `var`), with [`BENCH_ENV`] and then `extra`.
    fn spawn(
        &self,
        name: &str,
        var: &str,
        addr: SocketAddr,
        extra: &[(&str, &str)],
    ) -> Result<tokio::process::Child, Error> {
        let bin = self.dir.join(name);
        // Nothing of the operator's environment (a real provider, API keys,
        // partitions, trace export) reaches the services: only what the
        // bench sets, with every other option at its default.
        let mut command = tokio::process::Command::new(&bin);
        command.env_clear().envs(BENCH_ENV).envs(extra.iter().copied());
        command.env("NATS_URL", &self.url).env(var, addr.to_string());
        command.env("CONV_CALLBACK_SECRET", &self.callback_secret);
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!(
                "cannot start {} (build the services with `cargo build --release --workspace --bins`)",
                bin.display()
            )))
    }
}

/// The bench's services and where they listen.
struct Stack {
    services: Services,
    ingress: SocketAddr,
    projections: SocketAddr,
    runtime: SocketAddr,
    launcher: Launcher,
}

/// What the services run with in a bench: the scripted provider answering
/// 24 tokens at once, runtime heartbeats as in the tests, warnings only.
const BENCH_ENV: [(&str, &str); 5] = [
    ("CONV_LLM_PROVIDER", "scripted"),
    ("CONV_SCRIPTED_TOKENS", "24"),
    ("CONV_SCRIPTED_TOKEN_DELAY_MS", "0"),
    ("CONV_RUNTIME_HEARTBEAT_MS", "200"),
    ("RUST_LOG", "warn"),
];

type Services = Vec<(&'static str, SocketAddr, tokio::process::Child)>;

/// Waits (30 s at most) until every service answers `/readyz` and the
/// runtime runs all `partitions`; fails at once when a service exits.
async fn ready(services: &mut Services, runtime: SocketAddr, partitions: u16) -> Result<(), Error> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut waiting = None;
        for (name, addr, child) in services.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Failed(format!("{name} exited ({status}) before it was ready")));
            }
            let ok = http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status().is_success());
            if !ok && waiting.is_none() {
                waiting = Some(format!("{name} is not ready at http://{addr}/readyz"));
            }
        }
        if waiting.is_none() {
            let owned = owned_partitions(&http, runtime).await;
            if owned == Some(u64::from(partitions)) {
                return Ok(());
            }
            waiting = Some(format!("the runtime runs {} of {partitions} partitions", owned.unwrap_or(0)));
        }
        if Instant::now() >= deadline {
            return Err(Error::Failed(format!(
                "the stack did not get ready within 30 s: {}",
                waiting.unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `conv_runtime_partitions_owned` from the runtime's `/metrics`.
async fn owned_partitions(http: &reqwest::Client, runtime: SocketAddr) -> Option<u64> {
    let text = http.get(format!("http://{runtime}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("conv_runtime_partitions_owned "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn measure(
    js: &async_nats::jetstream::Context,
    mut stack: Stack,
    conversations: usize,
    turns: usize,
    aborts: usize,
    storm: usize,
) -> Result<Report, Error> {
    let (ingress, projections) = (stack.ingress, stack.projections);
    let http = reqwest::Client::new();
    // 1. Turns.
    let writes_before = stream_messages(js).await?;
    let phase = Instant::now();
    let per_conversation = each(conversations, "bench", &http, move |http, conv| async move {
        let mut events = sse(&http, projections, &conv).await?;
        let mut first = Vec::new();
        for t in 0..turns {
            let t0 = Instant::now();
            post(&http, ingress, &conv, "messages", json!({"text": format!("turn {t}")})).await?;
            let mut seen_delta = false;
            let mut running = false;
            loop {
                let event = events.next(&conv).await?;
                match event.ty {
                    Some(EventType::OutMessageDelta) if !seen_delta => {
                        seen_delta = true;
                        first.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Some(EventType::OutRunStatus) => {
                        let status = event.data()["status"].as_str().unwrap_or("");
                        if status == "running" {
                            running = true;
                        } else if running {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(first)
    })
    .await?;
    let first_delta: Vec<f64> = per_conversation.into_iter().flatten().collect();
    let turn_secs = phase.elapsed().as_secs_f64();
    let writes = stream_messages(js).await? - writes_before;
    let total_turns = conversations * turns;

    // 2. Aborts during a long tool call.
    let abort_ms = each(aborts, "abort", &http, move |http, conv| async move {
        let mut events = sse(&http, projections, &conv).await?;
        post(&http, ingress, &conv, "messages", json!({"text": "/tool sleep {\"ms\": 30000}"})).await?;
        while !events.next(&conv).await?.is(EventType::OutToolCalled) {}
        let t0 = Instant::now();
        post(&http, ingress, &conv, "abort", json!({})).await?;
        loop {
            let e = events.next(&conv).await?;
            if e.is(EventType::OutToolResult) && e.data()["outcome"] == "canceled" {
                return Ok(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
    })
    .await?;
    // 3. The abort storm.
    let storm = if storm > 0 { abort_storm(js, &mut stack, storm).await? } else { Storm::default() };
    // The aborts' wait in the runtime's scheduler, over the whole run.
    let p0_wait = p0_queue_wait(&http, stack.runtime).await?;
    // The raw baseline runs on a server the services have left.
    for (name, _, mut child) in stack.services {
        super::up::stop(name, &mut child).await;
    }

    // 3. Raw JetStream on the same server, as many messages as the pipeline journaled.
    let n = usize::try_from(writes.max(1000)).unwrap_or(1000);
    let body = bytes::Bytes::from(vec![b'x'; 300]);
    let publish_rate =
        baseline::publish(js, "BENCH_RAW", "bench.raw", n, body, 1000).await.map_err(Error::js("baseline"))?;
    let consume_rate =
        baseline::consume(js, "BENCH_RAW", "bench", n, baseline::Ack::Sent).await.map_err(Error::js("baseline"))?;

    let write_rate = writes as f64 / turn_secs;
    let (first_delta_ms_p50, first_delta_ms_p99) = p50_p99(first_delta);
    let (abort_ms_p50, abort_ms_p99) = p50_p99(abort_ms);
    let (storm_canceled, storm_hints) = (storm.abort_ms.len(), storm.hint_ms.len());
    let (storm_abort_ms_p50, storm_abort_ms_p99) = p50_p99(storm.abort_ms);
    let (raw_storm_ms_p50, raw_storm_ms_p99) = p50_p99(storm.raw_ms);
    let (storm_stored_ms_p50, storm_stored_ms_p99) = p50_p99(storm.stored_ms);
    let (storm_hint_ms_p50, storm_hint_ms_p99) = p50_p99(storm.hint_ms);
    Ok(Report {
        conversations,
        turns_per_conversation: turns,
        turns: total_turns,
        turns_per_sec: total_turns as f64 / turn_secs,
        journal_writes_per_turn: writes as f64 / total_turns.max(1) as f64,
        first_delta_ms_p50,
        first_delta_ms_p99,
        aborts,
        abort_ms_p50,
        abort_ms_p99,
        pipeline_journal_writes_per_sec: write_rate,
        raw_async_publish_per_sec: publish_rate,
        raw_consume_ack_per_sec: consume_rate,
        ratio_writes_vs_raw_publish: write_rate / publish_rate,
        storm: storm.conversations,
        storm_canceled,
        storm_abort_ms_p50,
        storm_abort_ms_p99,
        raw_storm_ms_p50,
        raw_storm_ms_p99,
        ratio_storm_vs_raw_p99: storm_abort_ms_p99 / raw_storm_ms_p99,
        storm_stored_ms_p50,
        storm_stored_ms_p99,
        storm_hints,
        storm_hint_ms_p50,
        storm_hint_ms_p99,
        p0_queued: p0_wait.count,
        p0_queue_wait_ms_p50: p0_wait.p50_ms,
        p0_queue_wait_ms_p99: p0_wait.p99_ms,
        seconds: 0.0,
    })
}

/// What the abort storm measured.
#[derive(Default)]
struct Storm {
    conversations: usize,
    /// Abort → `llm.canceled`, per canceled conversation.
    abort_ms: Vec<f64>,
    /// The raw floor ([`baseline::storm`]).
    raw_ms: Vec<f64>,
    /// Abort → stored, per abort.
    stored_ms: Vec<f64>,
    /// Abort → cancel hint seen, per hinted conversation.
    hint_ms: Vec<f64>,
}

/// `n` conversations stream long replies (effects restarted with a slow
/// scripted provider: 200 ms per token), then all are aborted at once
/// through ingress; latency = each abort's `time` → its conversation's
/// `llm.canceled` `time`, read from the journal. Before the aborts, the raw
/// floor of such a storm is measured on the same server, under the same
/// load.
async fn abort_storm(js: &async_nats::jetstream::Context, stack: &mut Stack, n: usize) -> Result<Storm, Error> {
    use futures::{StreamExt, TryStreamExt};
    let partitions = conv_nats::TopologyConfig::default().partitions;
    let at = stack.services.iter().position(|(name, ..)| *name == "conv-effects");
    let (name, addr, mut child) =
        stack.services.remove(at.ok_or_else(|| Error::Failed("the bench has no effects service".into()))?);
    super::up::stop(name, &mut child).await;
    let slow = [("CONV_SCRIPTED_TOKENS", "100000"), ("CONV_SCRIPTED_TOKEN_DELAY_MS", "200")];
    stack.services.push((name, addr, stack.launcher.spawn(name, EFFECTS_ADDR, addr, &slow)?));
    ready(&mut stack.services, stack.runtime, partitions).await?;

    let client = js.client();
    let mut live = client
        .subscribe(format!("{}.*", conv_contracts::subject::LIVE_PREFIX))
        .await
        .map_err(|e| Error::Failed(format!("cannot watch the live lane: {e}")))?;
    let http = reqwest::Client::new();
    let ingress = stack.ingress;
    let conv = |i: usize| format!("storm-{i}");
    futures::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            async move { post(&http, ingress, &conv(i), "messages", json!({"text": "a long answer, please"})).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    let mut streaming = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while streaming.len() < n {
        match tokio::time::timeout_at(deadline, live.next()).await {
            Ok(Some(m)) => {
                streaming.insert(m.subject.to_string());
            }
            _ => {
                let missing = (0..n).map(conv).find(|c| {
                    conv_contracts::ConversationId::parse(c)
                        .is_ok_and(|id| !streaming.contains(&conv_contracts::subject::live_subject(&id)))
                });
                let mut story = match &missing {
                    Some(c) => story(js, c).await,
                    None => String::new(),
                };
                if let Some((_, fx, _)) = stack.services.iter().find(|(name, ..)| *name == "conv-effects")
                    && let Ok(r) = http.get(format!("http://{fx}/metrics")).send().await
                    && let Ok(text) = r.text().await
                {
                    for l in text.lines().filter(|l| {
                        l.starts_with("conv_effects_in_flight")
                            || l.starts_with("conv_effects_queued")
                            || l.starts_with("conv_effects_retries")
                            || l.starts_with("conv_effects_failed")
                    }) {
                        story.push_str("; ");
                        story.push_str(l);
                    }
                }
                return Err(Error::Failed(format!(
                    "abort storm: {} of {n} conversations streamed within 120 s; {} has: {story}",
                    streaming.len(),
                    missing.unwrap_or_default()
                )));
            }
        }
    }
    drop(live);

    // The raw floor, now: same server, the streams running.
    let observer = async_nats::connect(stack.launcher.url.as_str())
        .await
        .map_err(|e| Error::Failed(format!("raw storm: cannot connect: {e}")))?;
    let raw_ms = baseline::storm(&client, &observer, "BENCH_STORM", "bench.storm", n, partitions, 50)
        .await
        .map_err(Error::js("raw storm"))?;

    // Canceled steps, as published (the journal is read once they are all in).
    let mut inputs = client
        .subscribe(conv_contracts::subject::kind_wildcard(conv_contracts::Kind::In))
        .await
        .map_err(|e| Error::Failed(format!("cannot watch the inputs: {e}")))?;
    // The runtime's cancel hints, seen on a connection of their own.
    let mut hint_sub = observer
        .subscribe(conv_contracts::subject::live_cancel_filter())
        .await
        .map_err(|e| Error::Failed(format!("cannot watch the cancel hints: {e}")))?;
    let hints_seen = tokio::spawn(async move {
        let mut seen = std::collections::HashMap::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), hint_sub.next()).await {
            if let Some(c) = m.subject.as_str().rsplit('.').next() {
                seen.entry(c.to_owned()).or_insert_with(chrono::Utc::now);
            }
        }
        seen
    });
    let aborts: Vec<_> = (0..n)
        .map(|i| {
            let http = http.clone();
            tokio::spawn(async move { post(&http, ingress, &conv(i), "abort", json!({})).await })
        })
        .collect();
    for a in aborts {
        a.await.map_err(|e| Error::Failed(format!("an abort task failed: {e}")))??;
    }
    // Distinct conversations: a publish that effects retried is seen twice here.
    let mut canceled = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while canceled.len() < n {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, inputs.next()).await else { break };
        if let Ok(e) = conv_nats::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, Default::default())
            && e.event_type() == EventType::LlmCanceled
            && e.conversation_id().as_str().starts_with("storm-")
        {
            canceled.insert(e.conversation_id().to_string());
        }
    }
    drop(inputs);

    let journal = conv_nats::read::all(js, conv_contracts::subject::STREAM_IN, "", false)
        .await
        .map_err(|e| Error::Failed(format!("cannot read the journal: {e}")))?;
    let mut aborted_at = std::collections::HashMap::new();
    let mut canceled_at = std::collections::HashMap::new();
    let mut stored_ms = Vec::new();
    for m in &journal {
        let Ok(e) = conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Default::default()) else {
            continue;
        };
        let (Some(time), true) = (e.time(), e.conversation_id().as_str().starts_with("storm-")) else { continue };
        let at = match e.event_type() {
            EventType::AbortRequested => {
                let stored = chrono::DateTime::from_timestamp_nanos(m.stored_at.unix_timestamp_nanos() as i64);
                stored_ms.extend(ms(time, stored));
                &mut aborted_at
            }
            EventType::LlmCanceled => &mut canceled_at,
            _ => continue,
        };
        at.entry(e.conversation_id().to_string()).or_insert(time);
    }
    let since_abort = |to: &std::collections::HashMap<String, chrono::DateTime<chrono::Utc>>| -> Vec<f64> {
        to.iter().filter_map(|(c, at)| ms(*aborted_at.get(c)?, *at)).collect()
    };
    let abort_ms = since_abort(&canceled_at);
    let hint_ms = since_abort(&hints_seen.await.unwrap_or_default());
    Ok(Storm { conversations: n, abort_ms, raw_ms, stored_ms, hint_ms })
}

/// Milliseconds from `from` to `to`.
fn ms(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> Option<f64> {
    Some((to - from).num_microseconds()? as f64 / 1000.0)
}

/// What the journal holds of conversation `c`: its inputs' types and how
/// many effect directives name it.
async fn story(js: &async_nats::jetstream::Context, c: &str) -> String {
    let Ok(conv) = conv_contracts::ConversationId::parse(c) else { return String::new() };
    let filter = conv_contracts::subject::in_conversation_filter(&conv);
    let inputs = conv_nats::read::all(js, conv_contracts::subject::STREAM_IN, &filter, false).await;
    let types: Vec<String> = inputs
        .iter()
        .flatten()
        .filter_map(|m| conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Default::default()).ok())
        .map(|e| e.event_type().as_str().to_owned())
        .collect();
    let suffix = format!(".{c}");
    let directives = conv_nats::read::all(js, conv_contracts::subject::STREAM_EFFECT, "", true)
        .await
        .map(|all| {
            all.iter().filter(|m| m.subject.ends_with(&suffix)).map(|m| m.subject.to_string()).collect::<Vec<_>>()
        })
        .unwrap_or_default();
    format!("inputs {types:?}; directives {directives:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_read_one_label_of_a_histogram() {
        let text = "\
# TYPE conv_runtime_queue_wait_seconds histogram
conv_runtime_queue_wait_seconds_bucket{priority=\"P0\",le=\"0.001\"} 50
conv_runtime_queue_wait_seconds_bucket{priority=\"P0\",le=\"0.005\"} 98
conv_runtime_queue_wait_seconds_bucket{priority=\"P0\",le=\"0.02\"} 99
conv_runtime_queue_wait_seconds_bucket{priority=\"P0\",le=\"+Inf\"} 100
conv_runtime_queue_wait_seconds_bucket{priority=\"P3\",le=\"0.001\"} 0
conv_runtime_queue_wait_seconds_bucket{priority=\"P3\",le=\"+Inf\"} 7
conv_runtime_queue_wait_seconds_count{priority=\"P0\"} 100
";
        let w = waits(text, "conv_runtime_queue_wait_seconds", r#"priority="P0""#);
        assert_eq!((w.count, w.p50_ms, w.p99_ms), (100, 1.0, 20.0));
        let none = waits(text, "conv_runtime_queue_wait_seconds", r#"priority="P1""#);
        assert_eq!(none.count, 0);
        assert!(none.p50_ms.is_nan() && none.p99_ms.is_nan());
    }
}

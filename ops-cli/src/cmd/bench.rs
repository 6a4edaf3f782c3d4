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
//! 3. raw JetStream async publish and consume+ack of the same number of
//!    messages as the pipeline journaled, on the same server.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use conv_contracts::EventType;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cli::Global;
use crate::{Error, Outcome};

fn free_addr() -> Result<SocketAddr, Error> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| Error::Invalid(e.to_string()))
}

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
    pub seconds: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

async fn sse(http: &reqwest::Client, projections: SocketAddr, conv: &str) -> Result<Events, Error> {
    let stream = conv_client::EventStream::open(http, &format!("http://{projections}"), conv, None, None)
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(Events(stream))
}

/// A conversation's stream; `None` when it ended, broke or fell silent for 30 s.
struct Events(conv_client::EventStream);

impl Events {
    async fn next(&mut self) -> Option<conv_client::Event> {
        tokio::time::timeout(Duration::from_secs(30), self.0.next()).await.ok()??.ok()
    }
}

async fn post(http: &reqwest::Client, ingress: SocketAddr, conv: &str, what: &str, body: Value) -> Result<(), Error> {
    let r = http
        .post(format!("http://{ingress}/v1/conversations/{conv}/{what}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
    if r.status().as_u16() != 202 {
        return Err(Error::Invalid(format!("ingress answered {}", r.status())));
    }
    Ok(())
}

async fn stream_messages(js: &async_nats::jetstream::Context) -> u64 {
    let mut total = 0;
    for s in ["CONV_IN", "CONV_EFFECT", "CONV_APPLIED", "CONV_OUT"] {
        if let Ok(mut st) = js.get_stream(s).await
            && let Ok(info) = st.info().await
        {
            total += info.state.messages;
        }
    }
    total
}

pub async fn run(g: &Global, conversations: usize, turns: usize, aborts: usize) -> Result<Outcome, Error> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("conv-bench-{}", std::process::id()));
    let port = free_addr()?.port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut nats = super::up::start_nats(&url, &dir, true).await?;
    let result = bench(&url, conversations, turns, aborts).await;
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
            r.seconds,
        )
    };
    Ok(Outcome::ok(output))
}

async fn bench(url: &str, conversations: usize, turns: usize, aborts: usize) -> Result<Report, Error> {
    let nats = conv_nats::NatsConfig { url: url.to_owned(), ..Default::default() };
    let client = conv_nats::connect(&nats, "convctl-bench").await?;
    let js = conv_nats::jetstream(client, &nats);
    conv_nats::topology::apply(&js, &conv_nats::Topology::declare(&conv_nats::TopologyConfig::default())).await?;

    let (ingress, projections) = (free_addr()?, free_addr()?);
    let mut services = Vec::new();
    let dir = super::up::bin_dir()?;
    let callback_secret = super::up::random_secret()?;
    for (name, var, addr) in [
        ("conv-ingress", "CONV_INGRESS_ADDR", ingress),
        ("conv-runtime", "CONV_RUNTIME_ADDR", free_addr()?),
        ("conv-effects", "CONV_EFFECTS_ADDR", free_addr()?),
        ("conv-projections", "CONV_PROJECTIONS_ADDR", projections),
    ] {
        let bin = dir.join(name);
        let child = tokio::process::Command::new(&bin)
            .env("NATS_URL", url)
            .env(var, addr.to_string())
            .env("CONV_CALLBACK_SECRET", &callback_secret)
            .env("CONV_RUNTIME_HEARTBEAT_MS", "200")
            .env("CONV_SCRIPTED_TOKEN_DELAY_MS", "0")
            .env("RUST_LOG", "warn")
            .env_remove("CONV_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(c) => services.push((name, c)),
            Err(e) => {
                for (n, mut c) in services {
                    super::up::stop(n, &mut c).await;
                }
                return Err(Error::Invalid(format!(
                    "cannot start {} ({e}); build the services with `cargo build --workspace`",
                    bin.display()
                )));
            }
        }
    }
    // Children left on an early return are killed when dropped.
    measure(&js, services, ingress, projections, conversations, turns, aborts).await
}

async fn measure(
    js: &async_nats::jetstream::Context,
    services: Vec<(&'static str, tokio::process::Child)>,
    ingress: SocketAddr,
    projections: SocketAddr,
    conversations: usize,
    turns: usize,
    aborts: usize,
) -> Result<Report, Error> {
    let http = reqwest::Client::new();
    for addr in [ingress, projections] {
        for _ in 0..100 {
            if http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Let the runtime take its partitions.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 1. Turns.
    let writes_before = stream_messages(js).await;
    let phase = Instant::now();
    let mut workers = Vec::new();
    for c in 0..conversations {
        let http = http.clone();
        workers.push(tokio::spawn(async move {
            let conv = format!("bench-{c}");
            let mut events = sse(&http, projections, &conv).await?;
            let mut first = Vec::new();
            for t in 0..turns {
                let t0 = Instant::now();
                post(&http, ingress, &conv, "messages", json!({"text": format!("turn {t}")})).await?;
                let mut seen_delta = false;
                let mut running = false;
                loop {
                    let Some(event) = events.next().await else {
                        return Err(Error::Invalid(format!("{conv}: the stream ended")));
                    };
                    match event.ty {
                        EventType::OutMessageDelta if !seen_delta => {
                            seen_delta = true;
                            first.push(t0.elapsed().as_secs_f64() * 1000.0);
                        }
                        EventType::OutRunStatus => {
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
            Ok::<Vec<f64>, Error>(first)
        }));
    }
    let mut first_delta = Vec::new();
    for w in workers {
        first_delta.extend(w.await.map_err(|e| Error::Invalid(e.to_string()))??);
    }
    let turn_secs = phase.elapsed().as_secs_f64();
    let writes = stream_messages(js).await - writes_before;
    let total_turns = conversations * turns;

    // 2. Aborts during a long tool call.
    let mut workers = Vec::new();
    for c in 0..aborts {
        let http = http.clone();
        workers.push(tokio::spawn(async move {
            let conv = format!("abort-{c}");
            let mut events = sse(&http, projections, &conv).await?;
            post(&http, ingress, &conv, "messages", json!({"text": "/tool sleep {\"ms\": 30000}"})).await?;
            loop {
                match events.next().await {
                    Some(e) if e.ty == EventType::OutToolCalled => break,
                    Some(_) => {}
                    None => return Err(Error::Invalid(format!("{conv}: the stream ended"))),
                }
            }
            let t0 = Instant::now();
            post(&http, ingress, &conv, "abort", json!({})).await?;
            loop {
                match events.next().await {
                    Some(e) if e.ty == EventType::OutToolResult && e.data()["outcome"] == "canceled" => {
                        return Ok(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Some(_) => {}
                    None => return Err(Error::Invalid(format!("{conv}: the stream ended"))),
                }
            }
        }));
    }
    let mut abort_ms = Vec::new();
    for w in workers {
        abort_ms.push(w.await.map_err(|e| Error::Invalid(e.to_string()))??);
    }
    // The raw baseline runs on a server the services have left.
    for (name, mut child) in services {
        super::up::stop(name, &mut child).await;
    }

    // 3. Raw JetStream on the same server, as many messages as the pipeline journaled.
    let n = usize::try_from(writes.max(1000)).unwrap_or(1000);
    let raw = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.raw.>".into()],
            ..Default::default()
        })
        .await
        .map_err(|e| Error::JetStream(e.to_string()))?;
    let body = bytes::Bytes::from(vec![b'x'; 300]);
    let t0 = Instant::now();
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(
            js.publish(format!("bench.raw.{}", i % 64), body.clone())
                .await
                .map_err(|e| Error::JetStream(e.to_string()))?,
        );
        if acks.len() >= 1000 {
            for a in acks.drain(..) {
                a.await.map_err(|e| Error::JetStream(e.to_string()))?;
            }
        }
    }
    for a in acks {
        a.await.map_err(|e| Error::JetStream(e.to_string()))?;
    }
    let publish_rate = n as f64 / t0.elapsed().as_secs_f64();
    let consumer = raw
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::JetStream(e.to_string()))?;
    let t0 = Instant::now();
    let mut messages = consumer.messages().await.map_err(|e| Error::JetStream(e.to_string()))?;
    for _ in 0..n {
        let m = messages
            .next()
            .await
            .ok_or_else(|| Error::JetStream("raw stream ended".into()))?
            .map_err(|e| Error::JetStream(e.to_string()))?;
        m.ack().await.map_err(|e| Error::JetStream(e.to_string()))?;
    }
    let consume_rate = n as f64 / t0.elapsed().as_secs_f64();

    let write_rate = writes as f64 / turn_secs;
    Ok(Report {
        conversations,
        turns_per_conversation: turns,
        turns: total_turns,
        turns_per_sec: total_turns as f64 / turn_secs,
        journal_writes_per_turn: writes as f64 / total_turns.max(1) as f64,
        first_delta_ms_p50: pct(&mut first_delta.clone(), 0.5),
        first_delta_ms_p99: pct(&mut first_delta, 0.99),
        aborts,
        abort_ms_p50: pct(&mut abort_ms.clone(), 0.5),
        abort_ms_p99: pct(&mut abort_ms, 0.99),
        pipeline_journal_writes_per_sec: write_rate,
        raw_async_publish_per_sec: publish_rate,
        raw_consume_ack_per_sec: consume_rate,
        ratio_writes_vs_raw_publish: write_rate / publish_rate,
        seconds: 0.0,
    })
}

//! `convctl bench`: the whole pipeline under load, next to raw JetStream on
//! the same server in the same run.
//!
//! It starts its own `nats-server` (temp dir, free port) and every service
//! in-process (scripted provider, 0 ms per token), then:
//! 1. N conversations × M turns through HTTP, each conversation reading its
//!    SSE stream: turns/s, first-delta latency (message accepted → first
//!    delta on the stream), journal writes per turn;
//! 2. abort latency: K conversations start a 30 s `sleep` tool, then all are
//!    aborted; latency = abort accepted → the canceled tool result on the stream;
//! 3. raw JetStream async publish and consume+ack of the same number of
//!    messages as the pipeline journaled, on the same server.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

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

/// Reads SSE events (type, data) from a response body.
struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut ty = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ty = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if ty.is_empty() {
                    continue;
                }
                return Some((ty, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.body.next()).await.ok()??.ok()?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn sse(http: &reqwest::Client, projections: SocketAddr, conv: &str) -> Result<Sse, Error> {
    let r = http
        .get(format!("http://{projections}/v1/conversations/{conv}/stream"))
        .send()
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(Sse { body: r.bytes_stream().boxed(), buf: String::new() })
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

    let shutdown = CancellationToken::new();
    let (ingress, projections) = (free_addr()?, free_addr()?);
    let mut tasks = Vec::new();
    let ic: conv_ingress::Config = conv_nats::service::Settings::for_test(nats.clone(), ingress);
    tasks.push(tokio::spawn({
        let t = shutdown.clone();
        async move { conv_ingress::run(ic, t).await.map_err(|e| e.to_string()) }
    }));
    let mut rc: conv_runtime::Config = conv_nats::service::Settings::for_test(nats.clone(), free_addr()?);
    rc.options.heartbeat_ms = 200;
    tasks.push(tokio::spawn({
        let t = shutdown.clone();
        async move { conv_runtime::run(rc, t).await.map_err(|e| e.to_string()) }
    }));
    let mut ec: conv_effects::Config = conv_nats::service::Settings::for_test(nats.clone(), free_addr()?);
    ec.options.scripted_token_delay_ms = 0;
    ec.options.concurrency = 256;
    tasks.push(tokio::spawn({
        let t = shutdown.clone();
        async move { conv_effects::run(ec, t).await.map_err(|e| e.to_string()) }
    }));
    let pc: conv_projections::Config = conv_nats::service::Settings::for_test(nats.clone(), projections);
    tasks.push(tokio::spawn({
        let t = shutdown.clone();
        async move { conv_projections::run(pc, t).await.map_err(|e| e.to_string()) }
    }));
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
    let writes_before = stream_messages(&js).await;
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
                    let Some((ty, data)) = events.next().await else {
                        return Err(Error::Invalid(format!("{conv}: the stream ended")));
                    };
                    match ty.as_str() {
                        "conv.out.message.delta" if !seen_delta => {
                            seen_delta = true;
                            first.push(t0.elapsed().as_secs_f64() * 1000.0);
                        }
                        "conv.out.run.status_changed" => {
                            let status = data["data"]["status"].as_str().unwrap_or("");
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
    let writes = stream_messages(&js).await - writes_before;
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
                    Some((ty, _)) if ty == "conv.out.tool.called" => break,
                    Some(_) => {}
                    None => return Err(Error::Invalid(format!("{conv}: the stream ended"))),
                }
            }
            let t0 = Instant::now();
            post(&http, ingress, &conv, "abort", json!({})).await?;
            loop {
                match events.next().await {
                    Some((ty, d)) if ty == "conv.out.tool.result" && d["data"]["outcome"] == "canceled" => {
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
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
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

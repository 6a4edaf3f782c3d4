//! Benchmark (not a test) of the serving path, in-process over a real
//! nats-server, with raw JetStream baselines from the same run:
//! 1. fold rate: N output events folded into views by one projections
//!    instance, next to raw consume + ack of the same events;
//! 2. `GET …/timeline` of a 5 000-entry conversation;
//! 3. SSE fan-out: 1 → 10 000 readers of one conversation on one instance
//!    (resident memory per reader, time until every reader has a burst);
//! 4. live-lane latency: a delta published by "effects" → read by an SSE client;
//! 5. one 500-token turn at 10 ms/token through the whole pipeline: durable
//!    writes (growth of every file-backed stream's last sequence) and delta
//!    events at the client;
//! 6. 200 conversations streaming, all aborted at once: abort accepted → the
//!    timeline shows it.
//!
//! prlimit --nofile=65536 cargo run --release -p conv-projections --example bench_projections -- \
//!     [events=100000] [max_readers=10000] [--json]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use conv_client::{Event, EventStream, Text};
use conv_contracts::live::LiveDelta;
use conv_contracts::payload::*;
use conv_contracts::subject::STREAM_OUT;
use conv_contracts::{ConversationId, Envelope, EventType, Payload};
use conv_nats::service::Settings;
use conv_nats::test_util::{ServiceHandle, TestNats, free_addr, publish_all, spawn_service, wait_http_ok};
use serde_json::{Value, json};
use support::post_message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").to_owned()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn out(conv: &ConversationId, position: u64, data: impl Into<Payload>) -> Envelope {
    let mut e = Envelope::new(format!("bench.{conv}.{position}"), "/bench", conv.clone(), data)
        .expect("valid event")
        .with_position(position);
    e = e.with_time(Some(chrono::Utc::now()));
    e
}

/// A realistic mix: per turn a user entry, running, an assistant entry,
/// `deltas` chunks, finished, idle.
fn turns(conv: &ConversationId, events: usize, deltas: usize) -> Vec<Envelope> {
    let mut v = Vec::with_capacity(events);
    let mut p = 0;
    let mut turn = 0;
    while v.len() < events {
        turn += 1;
        let entry = format!("r{turn}.s1.a1");
        let mut push = |d: Payload| {
            p += 1;
            v.push(out(conv, p, d));
        };
        push(
            OutMessageAppended {
                entry_id: format!("u{turn}"),
                role: EntryRole::User,
                text: "hi".into(),
                status: EntryStatus::Completed,
            }
            .into(),
        );
        push(OutRunStatus { run_id: format!("r{turn}"), status: RunStatus::Running }.into());
        push(
            OutMessageAppended {
                entry_id: entry.clone(),
                role: EntryRole::Assistant,
                text: String::new(),
                status: EntryStatus::Streaming,
            }
            .into(),
        );
        let mut offset = 0;
        for i in 0..deltas {
            let text = format!("chunk{i} of the answer ");
            push(
                OutMessageDelta { entry_id: entry.clone(), seq: i as u64, text: text.clone(), offset: Some(offset) }
                    .into(),
            );
            offset += text.len() as u64;
        }
        push(OutMessageFinished { entry_id: entry, status: EntryStatus::Completed, text: "the answer".into() }.into());
        push(OutRunStatus { run_id: format!("r{turn}"), status: RunStatus::Idle }.into());
    }
    v.truncate(events);
    v
}

/// Raw consume + ack of every message in CONV_OUT with a fresh consumer.
async fn raw_consume_ack(js: &async_nats::jetstream::Context, n: usize) -> f64 {
    conv_nats::baseline::consume(js, STREAM_OUT, "bench-raw", n, conv_nats::baseline::Ack::Sent)
        .await
        .expect("baseline")
}

async fn metric(http: &reqwest::Client, at: SocketAddr, name: &str) -> f64 {
    let text = http.get(format!("http://{at}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn projections(nats: &TestNats) -> (SocketAddr, ServiceHandle<conv_projections::Error>) {
    let addr = free_addr();
    let mut c: conv_projections::Config = Settings::for_test(nats.config(), addr);
    c.options.heartbeat_ms = 200;
    c.options.sse_buffer = 16_384;
    let h = spawn_service("conv-projections", |t| conv_projections::run(c, t));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    (addr, h)
}

/// A minimal SSE reader on a raw socket: counts frames (`id: ` lines).
async fn raw_reader(addr: SocketAddr, conv: String, frames: Arc<AtomicUsize>, connected: Arc<AtomicUsize>) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return };
    let req =
        format!("GET /v1/conversations/{conv}/stream HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let mut headers_done = false;
    loop {
        let Ok(n) = s.read(&mut buf).await else { return };
        if n == 0 {
            return;
        }
        tail.extend_from_slice(&buf[..n]);
        if !headers_done {
            if let Some(i) = tail.windows(4).position(|w| w == b"\r\n\r\n") {
                headers_done = true;
                connected.fetch_add(1, Ordering::SeqCst);
                tail.drain(..i + 4);
            } else {
                continue;
            }
        }
        let count = tail.windows(4).filter(|w| w == b"id: ").count();
        frames.fetch_add(count, Ordering::SeqCst);
        let keep = tail.len().saturating_sub(3);
        tail.drain(..keep);
    }
}

/// A conversation's stream, read with the shared client.
async fn open_stream(http: &reqwest::Client, at: SocketAddr, conv: &str) -> EventStream {
    EventStream::open(http, &format!("http://{at}"), conv, None, None).await.expect("stream")
}

/// Reads the child's `connected frames` progress lines.
async fn next_progress(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Option<(usize, usize)> {
    let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.ok()?.ok()??;
    let mut parts = line.split_whitespace().map(|p| p.parse::<usize>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Child mode: `--readers <addr> <conversation> <n>` keeps n raw SSE readers
/// open and prints `connected frames` every 100 ms.
async fn readers_mode(args: &[String]) {
    let addr: SocketAddr = args[1].parse().expect("addr");
    let conv = args[2].clone();
    let n: usize = args[3].parse().expect("n");
    let frames = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    for i in 0..n {
        tokio::spawn(raw_reader(addr, conv.clone(), frames.clone(), connected.clone()));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    loop {
        println!("{} {}", connected.load(Ordering::SeqCst), frames.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--readers") {
        return readers_mode(&args).await;
    }
    let json_out = args.iter().any(|a| a == "--json");
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let events = nums.first().copied().unwrap_or(100_000);
    let max_readers = nums.get(1).copied().unwrap_or(10_000);
    let mut report = serde_json::Map::new();

    let nats = TestNats::start_process().await.expect("nats-server (scripts/ensure-nats.sh)");
    nats.setup().await.expect("topology");
    let js = nats.jetstream().await;
    let http = reqwest::Client::new();
    // ---- 3. SSE fan-out sweep (first, on a fresh instance, so that
    // resident memory growth is the readers' and not reused heap). The
    // readers run in a child process: their sockets are not this process's.
    let (at, fanout_instance) = projections(&nats).await;
    let mut sweep = Vec::new();
    let mut r = 1;
    while r <= max_readers {
        let conv = format!("fan-{r}");
        let before = rss_kib();
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
            .args(["--readers", &at.to_string(), &conv, &r.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("reader process");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut progress = (0usize, 0usize);
        let deadline = Instant::now() + Duration::from_secs(180);
        while progress.0 < r && Instant::now() < deadline {
            progress = next_progress(&mut lines).await.unwrap_or(progress);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_reader_kib = (rss_kib().saturating_sub(before)) as f64 / r as f64;
        let c = ConversationId::parse(&conv).expect("id");
        let burst: Vec<Envelope> = (1..=20u64)
            .map(|p| out(&c, p, OutRunStatus { run_id: format!("r{p}"), status: RunStatus::Idle }))
            .collect();
        let started = Instant::now();
        publish_all(&js, &burst).await;
        while progress.1 < 20 * r && started.elapsed() < Duration::from_secs(120) {
            progress = next_progress(&mut lines).await.unwrap_or(progress);
        }
        sweep.push(json!({
            "readers": r, "connected": progress.0,
            "frames_expected": 20 * r, "frames_delivered": progress.1,
            "burst_delivered_ms": started.elapsed().as_secs_f64() * 1000.0,
            "server_rss_kib_per_reader": per_reader_kib,
        }));
        child.kill().await.ok();
        r *= 10;
    }
    report.insert("sse_fanout".into(), Value::Array(sweep));
    fanout_instance.shutdown().await.ok();

    // ---- 1. fold rate vs raw consume + ack
    let convs: Vec<ConversationId> =
        (0..200).map(|i| ConversationId::parse(&format!("fold-{i}")).expect("id")).collect();
    let per = events / convs.len();
    let mut all = Vec::with_capacity(events);
    for c in &convs {
        all.extend(turns(c, per, 20));
    }
    let n = all.len();
    let publish_time = publish_all(&js, &all).await;
    let raw = raw_consume_ack(&js, n).await;
    let (at, fold_instance) = projections(&nats).await;
    let started = Instant::now();
    loop {
        if metric(&http, at, "conv_projections_folded_total").await as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Until every view is written.
    loop {
        let mut written = 0;
        for c in &convs {
            let r = http.get(format!("http://{at}/v1/conversations/{c}/timeline")).send().await.expect("get");
            if r.status().is_success()
                && r.json::<Value>().await.expect("json")["position"].as_u64() == Some(per as u64)
            {
                written += 1;
            }
        }
        if written == convs.len() {
            break;
        }
    }
    let fold_secs = started.elapsed().as_secs_f64();
    let fold_rate = n as f64 / fold_secs;
    let writes = metric(&http, at, "conv_projections_view_writes_total").await;
    let rss_after_fold = rss_kib();
    report.insert(
        "fold".into(),
        json!({
            "events": n, "conversations": convs.len(),
            "raw_publish_per_sec": n as f64 / publish_time.as_secs_f64(),
            "raw_consume_ack_per_sec": raw, "fold_per_sec": fold_rate,
            "ratio_fold_vs_raw_consume_ack": fold_rate / raw,
            "view_writes": writes, "events_per_view_write": n as f64 / writes.max(1.0),
            "rss_mib_after_fold": rss_after_fold as f64 / 1024.0,
        }),
    );

    // ---- 2. GET of a 5 000-entry timeline
    let big = ConversationId::parse("big").expect("id");
    let entries: Vec<Envelope> = (1..=5000u64)
        .map(|p| {
            out(
                &big,
                p,
                OutMessageAppended {
                    entry_id: format!("u{p}"),
                    role: EntryRole::User,
                    text: format!("message number {p} of a long conversation, about sixty bytes"),
                    status: EntryStatus::Completed,
                },
            )
        })
        .collect();
    publish_all(&js, &entries).await;
    loop {
        let r = http.get(format!("http://{at}/v1/conversations/big/timeline")).send().await.expect("get");
        if r.status().is_success() && r.json::<Value>().await.expect("json")["position"].as_u64() == Some(5000) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let body = http
            .get(format!("http://{at}/v1/conversations/big/timeline"))
            .send()
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(body.len() > 5000 * 50);
    }
    lat.sort_by(f64::total_cmp);
    report.insert("timeline_get_5000_entries_ms".into(), json!({"p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99)}));

    // ---- 4. live-lane latency: publish → SSE reader
    let live = ConversationId::parse("live").expect("id");
    let mut stream = open_stream(&http, at, "live").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_all(
        &js,
        &[out(
            &live,
            1,
            OutMessageAppended {
                entry_id: "a".into(),
                role: EntryRole::Assistant,
                text: String::new(),
                status: EntryStatus::Streaming,
            },
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = nats.client().await;
    let subject = conv_contracts::subject::live_subject(&live);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let mut lat = Vec::new();
        while lat.len() < 1000 {
            let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await else { break };
            let now = Instant::now();
            if event.is(EventType::OutMessageDelta)
                && let Some(sent) = rx.recv().await
            {
                lat.push(now.duration_since(sent).as_secs_f64() * 1000.0);
            }
        }
        lat
    });
    let mut offset = 0u64;
    for i in 0..1000 {
        let text = format!("tok{i} ");
        let d =
            LiveDelta { entry_id: "a".into(), step_id: "s".into(), attempt: 1, offset, text: text.clone(), time: None };
        offset += text.len() as u64;
        let _ = tx.send(Instant::now());
        client.publish(subject.clone(), d.to_bytes().into()).await.expect("publish");
        client.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut lat = reader.await.expect("reader");
    lat.sort_by(f64::total_cmp);
    report.insert(
        "live_lane_latency_ms".into(),
        json!({"samples": lat.len(), "p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99)}),
    );
    fold_instance.shutdown().await.ok();
    drop(nats);

    // ---- 5 + 6. the whole pipeline
    let nats = TestNats::start_process().await.expect("nats-server");
    nats.setup().await.expect("topology");
    let js = nats.jetstream().await;
    let ingress_addr = free_addr();
    let ic: conv_ingress::Config = Settings::for_test(nats.config(), ingress_addr);
    let _ingress = spawn_service("conv-ingress", |t| conv_ingress::run(ic, t));
    let mut rc: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    rc.options.heartbeat_ms = 200;
    let _runtime = spawn_service("conv-runtime", |t| conv_runtime::run(rc, t));
    let mut ec: conv_effects::Config = Settings::for_test(nats.config(), free_addr());
    ec.options.scripted_tokens = 500;
    ec.options.scripted_token_delay_ms = 10;
    ec.options.concurrency = 512;
    let _effects = spawn_service("conv-effects", |t| conv_effects::run(ec, t));
    let (at, _p) = projections(&nats).await;
    assert_eq!(wait_http_ok(&format!("http://{ingress_addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let writes = |js: async_nats::jetstream::Context| async move { conv_nats::test_util::durable_writes(&js).await };
    let before = writes(js.clone()).await;
    let mut stream = open_stream(&http, at, "turn").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    post_message(&http, ingress_addr, "turn", "a long story").await;
    let mut got = Vec::new();
    while !got.iter().any(|e: &Event| e.is(EventType::OutRunStatus) && e.data()["status"] == "idle") {
        let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await else { break };
        got.push(event);
    }
    let delta_events = got.iter().filter(|e| e.is(EventType::OutMessageDelta)).count();
    let joined = Text::of(&got);
    let final_text = got
        .iter()
        .find(|e| e.is(EventType::OutMessageFinished))
        .and_then(|e| e.data()["text"].as_str())
        .unwrap_or("")
        .to_owned();
    let mut turn_writes = writes(js.clone()).await - before;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = writes(js.clone()).await - before;
        if now == turn_writes {
            break;
        }
        turn_writes = now;
    }
    report.insert(
        "turn_500_tokens_10ms".into(),
        json!({"durable_writes": turn_writes, "delta_events_at_client": delta_events, "joined_equals_final": joined == final_text}),
    );

    // 200 conversations streaming, all aborted together.
    let n = 200;
    for i in 0..n {
        post_message(&http, ingress_addr, &format!("ab-{i}"), "go").await;
    }
    // Until every one is streaming.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut streaming = 0;
        for i in 0..n {
            let r = http.get(format!("http://{at}/v1/conversations/ab-{i}/timeline")).send().await.expect("get");
            if r.status().is_success() && r.json::<Value>().await.expect("json")["run_status"] == "running" {
                streaming += 1;
            }
        }
        if streaming == n || Instant::now() > deadline {
            break;
        }
    }
    let mut accepted = Vec::new();
    for i in 0..n {
        let r = http
            .post(format!("http://{ingress_addr}/v1/conversations/ab-{i}/abort"))
            .json(&json!({}))
            .send()
            .await
            .expect("abort");
        assert_eq!(r.status().as_u16(), 202);
        accepted.push(Instant::now());
    }
    let mut seen: Vec<Option<f64>> = vec![None; n];
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
        for i in 0..n {
            if seen[i].is_some() {
                continue;
            }
            let r = http.get(format!("http://{at}/v1/conversations/ab-{i}/timeline")).send().await.expect("get");
            if r.status().is_success() && r.json::<Value>().await.expect("json")["run_status"] == "aborted" {
                seen[i] = Some(accepted[i].elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    let mut lat: Vec<f64> = seen.iter().flatten().copied().collect();
    lat.sort_by(f64::total_cmp);
    report.insert(
        "abort_visible_in_timeline_ms".into(),
        json!({"conversations": n, "seen": lat.len(), "p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99),
               "note": "includes the polling loop over 200 timelines (one round takes tens of ms)"}),
    );

    let report = Value::Object(report);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        println!("{report:#}");
    }
}

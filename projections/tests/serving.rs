//! The serving path under load and faults: views equal the fold of the
//! journal with several instances, after a kill and after a NATS restart;
//! one long reply streams at token rate at a small number of durable writes;
//! thousands of readers share one subscription; a reply resumed after an
//! effects crash reads as its final text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conv_client::{Event, EventStream, Text};
use conv_contracts::{ConversationId, EventType};
use conv_nats::TopologyConfig;
use conv_nats::service::Settings;
use conv_nats::test_util::{
    ServiceHandle, TestNats, durable_writes, free_addr, spawn_isolated, spawn_service, wait_http_ok,
};
use serde_json::{Value, json};

fn runtime(nats: &TestNats) -> ServiceHandle<conv_runtime::Error> {
    let mut c: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    c.options.heartbeat_ms = 200;
    spawn_service("conv-runtime", |t| conv_runtime::run(c, t))
}

fn effects_config(nats: &TestNats, tokens: usize, delay_ms: u64, coalesce_ms: u64) -> conv_effects::Config {
    let mut c: conv_effects::Config = Settings::for_test(nats.config(), free_addr());
    c.options.scripted_tokens = tokens;
    c.options.scripted_token_delay_ms = delay_ms;
    c.options.coalesce_ms = coalesce_ms;
    c.options.progress_ms = 500;
    c
}

fn effects(nats: &TestNats, tokens: usize, delay_ms: u64, coalesce_ms: u64) -> ServiceHandle<conv_effects::Error> {
    let c = effects_config(nats, tokens, delay_ms, coalesce_ms);
    spawn_service("conv-effects", |t| conv_effects::run(c, t))
}

fn projections_config(nats: &TestNats, addr: SocketAddr) -> conv_projections::Config {
    let mut c: conv_projections::Config = Settings::for_test(nats.config(), addr);
    c.options.heartbeat_ms = 200;
    c.options.flush_ms = 50;
    c
}

async fn projections(nats: &TestNats) -> (SocketAddr, ServiceHandle<conv_projections::Error>) {
    let addr = free_addr();
    let c = projections_config(nats, addr);
    let handle = spawn_service("conv-projections", |t| conv_projections::run(c, t));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    (addr, handle)
}

async fn ingress(nats: &TestNats) -> (SocketAddr, ServiceHandle<conv_ingress::Error>) {
    let addr = free_addr();
    let c: conv_ingress::Config = Settings::for_test(nats.config(), addr);
    let handle = spawn_service("conv-ingress", |t| conv_ingress::run(c, t));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    (addr, handle)
}

/// Posts a message, retrying while ingress answers 503 (NATS away).
async fn post(http: &reqwest::Client, ingress: SocketAddr, conv: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sent = http
            .post(format!("http://{ingress}/v1/conversations/{conv}/messages"))
            .json(&json!({"text": text}))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().as_u16() == 202 => return,
            Ok(r) => assert_eq!(r.status().as_u16(), 503, "only 503 is retried"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "ingress never took the message for {conv}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn timeline(http: &reqwest::Client, projections: SocketAddr, conv: &str) -> Option<Value> {
    let r = http.get(format!("http://{projections}/v1/conversations/{conv}/timeline")).send().await.ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    r.json().await.ok()
}

/// A conversation whose every message got a completed answer and whose run ended.
fn complete(t: &Value, messages: usize) -> bool {
    let entries = t["entries"].as_array().cloned().unwrap_or_default();
    let users = entries.iter().filter(|e| e["role"] == "user").count();
    let answers = entries.iter().filter(|e| e["role"] == "assistant" && e["status"] == "completed").count();
    t["run_status"] == "idle" && users == messages && answers == messages
}

/// Waits until every conversation's timeline is complete; returns how many are not.
async fn wait_complete(
    http: &reqwest::Client,
    at: SocketAddr,
    convs: &[String],
    messages: usize,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    let mut left: Vec<String> = convs.to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for c in left {
            if !timeline(http, at, &c).await.is_some_and(|t| complete(&t, messages)) {
                still.push(c);
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    left.len()
}

async fn verify_all(js: &async_nats::jetstream::Context, convs: &[String]) {
    for c in convs {
        let v = conv_store::views::verify(js, &ConversationId::parse(c).expect("id"), Duration::from_secs(10))
            .await
            .expect("verify");
        assert!(v.ok(), "{c}: {:?}", v.differences);
    }
}

#[tokio::test]
async fn two_instances_of_every_service_serve_the_fold_of_the_journal() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let (ingress, _i) = ingress(&nats).await;
    let _services = (runtime(&nats), runtime(&nats), effects(&nats, 6, 5, 30), effects(&nats, 6, 5, 30));
    let (a, _pa) = projections(&nats).await;
    let (b, _pb) = projections(&nats).await;
    let http = reqwest::Client::new();
    let convs: Vec<String> = (0..100).map(|i| format!("two-{i}")).collect();
    for c in &convs {
        post(&http, ingress, c, "first").await;
        post(&http, ingress, c, "second").await;
    }
    assert_eq!(wait_complete(&http, a, &convs, 2, Duration::from_secs(90)).await, 0, "incomplete timelines");
    for c in &convs {
        assert_eq!(timeline(&http, a, c).await, timeline(&http, b, c).await, "{c}: both instances serve one view");
    }
    verify_all(&nats.jetstream().await, &convs).await;
}

#[tokio::test]
async fn views_converge_after_a_projections_kill_and_a_nats_restart() {
    let mut nats = TestNats::start().await.expect("test NATS");
    nats.setup_with(&TopologyConfig { projections_ack_wait_secs: 2, ..Default::default() }).await.expect("topology");
    let (ingress, _i) = ingress(&nats).await;
    let _services = (runtime(&nats), effects(&nats, 20, 10, 50));
    let first_addr = free_addr();
    let c = projections_config(&nats, first_addr);
    let first = spawn_isolated("conv-projections", |t| conv_projections::run(c, t));
    assert_eq!(wait_http_ok(&format!("http://{first_addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    let (b, _pb) = projections(&nats).await;
    let http = reqwest::Client::new();
    let convs: Vec<String> = (0..30).map(|i| format!("kill-{i}")).collect();
    for c in &convs {
        post(&http, ingress, c, "one").await;
    }
    // A projections instance dies mid-stream: every task of it at once.
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.crash();
    for c in &convs {
        post(&http, ingress, c, "two").await;
    }
    // NATS restarts mid-stream.
    tokio::time::sleep(Duration::from_millis(150)).await;
    nats.restart().await.expect("restart");
    for c in &convs {
        post(&http, ingress, c, "three").await;
    }
    assert_eq!(wait_complete(&http, b, &convs, 3, Duration::from_secs(120)).await, 0, "incomplete timelines");
    verify_all(&nats.jetstream().await, &convs).await;
}

/// Reads SSE events until `done` holds (or the stream ends); with a deadline.
async fn read_sse(
    http: &reqwest::Client,
    at: SocketAddr,
    conv: &str,
    last_event_id: Option<&str>,
    done: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut stream = EventStream::open(http, &format!("http://{at}"), conv, last_event_id, None).await.expect("stream");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&out) {
        let Ok(Some(Ok(event))) = tokio::time::timeout_at(deadline.into(), stream.next()).await else {
            panic!("stream of {conv} ended or stalled before the condition; {} events", out.len());
        };
        out.push(event);
    }
    out
}

fn run_ended(events: &[Event]) -> bool {
    events.iter().any(|e| e.is(EventType::OutRunStatus) && e.data()["status"] == "idle")
}

fn deltas(events: &[Event]) -> usize {
    events.iter().filter(|e| e.is(EventType::OutMessageDelta)).count()
}

fn final_text(t: &Value) -> String {
    t["entries"]
        .as_array()
        .and_then(|e| e.iter().rev().find(|e| e["role"] == "assistant"))
        .and_then(|e| e["text"].as_str())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn a_long_reply_streams_at_token_rate_with_few_durable_writes() {
    let (nats, js) = TestNats::set_up().await;
    let (ingress, _i) = ingress(&nats).await;
    // Default durable coalescing: what the contract's budget is about.
    let defaults = conv_effects::EffectsOptions::default();
    let _services = (runtime(&nats), effects(&nats, 500, 10, defaults.coalesce_ms));
    let (at, _p) = projections(&nats).await;
    let http = reqwest::Client::new();
    let before = durable_writes(&js).await;

    let reader = tokio::spawn({
        let http = http.clone();
        async move { read_sse(&http, at, "long", None, run_ended).await }
    });
    // A second reader drops mid-reply and resumes with Last-Event-ID.
    let resumer = tokio::spawn({
        let http = http.clone();
        async move {
            let part = read_sse(&http, at, "long", None, |e| deltas(e) >= 60).await;
            let last = part.last().and_then(|e| e.id.clone()).expect("an id");
            let rest = read_sse(&http, at, "long", Some(&last), run_ended).await;
            (part, rest)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    post(&http, ingress, "long", "tell me a long story").await;
    let events = reader.await.expect("reader");
    let (part, rest) = resumer.await.expect("resumer");

    assert_eq!(wait_complete(&http, at, &["long".to_owned()], 1, Duration::from_secs(30)).await, 0);
    let t = timeline(&http, at, "long").await.expect("timeline");
    let text = final_text(&t);
    let deltas = deltas(&events);
    assert!(deltas >= 100, "the client got {deltas} delta events");
    assert_eq!(Text::of(&events), text, "deltas joined == final text");
    let mut both = part.clone();
    both.extend(rest);
    assert_eq!(Text::of(&both), text, "resumed text == final text");

    // Durable writes of the whole turn, once everything has settled.
    let mut writes = durable_writes(&js).await - before;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = durable_writes(&js).await - before;
        if now == writes || Instant::now() > deadline {
            writes = now;
            break;
        }
        writes = now;
    }
    assert!(writes <= 24, "one 500-token turn cost {writes} durable writes");
}

#[tokio::test]
async fn two_thousand_readers_of_one_conversation_get_every_event() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let (ingress, _i) = ingress(&nats).await;
    let _services = (runtime(&nats), effects(&nats, 24, 15, 30));
    let (at, _p) = projections(&nats).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let readers: Vec<_> = (0..2000)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { read_sse(&http, at, "crowd", None, run_ended).await })
        })
        .collect();
    // Wait until all are connected.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics =
            http.get(format!("http://{at}/metrics")).send().await.expect("metrics").text().await.expect("text");
        let open = metrics
            .lines()
            .find_map(|l| l.strip_prefix("conv_projections_sse_readers "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if open >= 2000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "only {open} readers connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    post(&http, ingress, "crowd", "hello everyone").await;
    let mut first: Option<Arc<Vec<Event>>> = None;
    for r in readers {
        let got = r.await.expect("reader");
        match &first {
            None => first = Some(Arc::new(got)),
            Some(f) => assert_eq!(&got, f.as_ref(), "every reader gets every event"),
        }
    }
    // The view is written shortly after the stream ends: wait for it.
    assert_eq!(wait_complete(&http, at, &["crowd".to_owned()], 1, Duration::from_secs(30)).await, 0);
    let t = timeline(&http, at, "crowd").await.expect("timeline");
    assert_eq!(Text::of(first.as_deref().expect("readers")), final_text(&t));
}

#[tokio::test]
async fn a_reply_resumed_after_an_effects_crash_reads_as_its_final_text() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup_with(&TopologyConfig { ack_wait_secs: 2, ..Default::default() }).await.expect("topology");
    let (ingress, _i) = ingress(&nats).await;
    let _runtime = runtime(&nats);
    let c = effects_config(&nats, 200, 20, 500);
    let first = spawn_isolated("conv-effects", |t| conv_effects::run(c, t));
    let (at, _p) = projections(&nats).await;
    let http = reqwest::Client::new();
    let reader = tokio::spawn({
        let http = http.clone();
        async move { read_sse(&http, at, "crash", None, run_ended).await }
    });
    let watcher = tokio::spawn({
        let http = http.clone();
        async move { read_sse(&http, at, "crash", None, |e| deltas(e) >= 40).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    post(&http, ingress, "crash", "a long answer please").await;
    watcher.await.expect("watcher");
    // Effects dies mid-reply, past a durable chunk and with live text beyond it.
    first.crash();
    let _second = effects(&nats, 200, 20, 500);
    let events = reader.await.expect("reader");
    assert_eq!(wait_complete(&http, at, &["crash".to_owned()], 1, Duration::from_secs(30)).await, 0);
    let t = timeline(&http, at, "crash").await.expect("timeline");
    assert_eq!(Text::of(&events), final_text(&t), "no duplicated or garbled text");
}

#[tokio::test]
async fn a_reader_too_slow_to_keep_up_is_closed_with_a_final_event() {
    use conv_contracts::Envelope;
    use conv_contracts::payload::{EntryRole, EntryStatus, OutMessageAppended};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (nats, js) = TestNats::set_up().await;
    let addr = free_addr();
    let mut c = projections_config(&nats, addr);
    c.options.sse_buffer = 32;
    let _p = spawn_service("conv-projections", |t| conv_projections::run(c, t));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(20)).await, Some(200));

    // A reader that connects and then does not read.
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket
        .write_all(b"GET /v1/conversations/slow/stream HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("request");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Far more output than socket buffers hold.
    let conv = ConversationId::parse("slow").expect("id");
    let text = "x".repeat(4096);
    for chunk in (1..=3000u64).collect::<Vec<_>>().chunks(500) {
        let mut acks = Vec::new();
        for p in chunk {
            let e = Envelope::new(
                format!("slow.{p}"),
                "/test",
                conv.clone(),
                OutMessageAppended {
                    entry_id: format!("u{p}"),
                    role: EntryRole::User,
                    text: text.clone(),
                    status: EntryStatus::Completed,
                },
            )
            .expect("valid event")
            .with_position(*p);
            acks.push(conv_nats::headers::publish(&js, &e).await.expect("publish"));
        }
        for a in acks {
            a.await.expect("ack");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Now read: what was buffered, then the final event, then the end.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline.into(), socket.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(7).any(|w| w == b"lagged\"") && got.ends_with(b"0\r\n\r\n") {
                    break;
                }
            }
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => panic!("the slow reader was never closed ({} bytes read)", got.len()),
        }
    }
    let body = String::from_utf8_lossy(&got);
    assert!(body.contains("event: conv.stream.closed"), "a clear final event");
    assert!(body.contains("\"reason\":\"lagged\""));
    let frames = body.matches("event: conv.out.message.appended").count();
    assert!(frames < 3000, "the reader was closed, not buffered without bound ({frames} frames)");
}

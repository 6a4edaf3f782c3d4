//! Benchmark (not a test) of the runtime:
//! 1. reducer applies per second on one core (pure, in memory);
//! 2. end-to-end applied inputs per second (partition workers over a real
//!    nats-server: pull, schedule, apply, publish effects + marker, ack) next
//!    to raw JetStream consume+ack of the same number of messages, same run;
//! 3. memory per idle conversation held in memory.
//!
//! With `--sweep`: the cost of applying one delta to a conversation of
//! 1 → 1 000 turns (p50 / p99 of the apply, and of a whole-state digest
//! for comparison), as a table and `docs/perf-apply-sweep.csv`.
//!
//! cargo run --release -p conv-runtime --example bench_runtime -- [inputs=20000]
//! cargo run --release -p conv-runtime --example bench_runtime -- --sweep

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conv_contracts::payload::{LlmCompleted, LlmDelta, MessageReceived};
use conv_contracts::{ConversationId, Envelope};
use conv_core::reducer::apply;
use conv_core::state::State;
use conv_nats::test_util::{TestNats, free_addr, spawn_service};

fn conversation(c: usize, deltas: u64) -> Vec<Envelope> {
    let conv = ConversationId::parse(&format!("bench-{c}")).expect("id");
    let mut out = vec![
        Envelope::new(
            format!("c{c}-m"),
            "/bench",
            conv.clone(),
            MessageReceived { text: "tell me something".into(), role: None, channel: None, sender: None },
        )
        .expect("valid event"),
    ];
    for i in 0..deltas {
        out.push(
            Envelope::new(
                format!("c{c}-d{i}"),
                "/bench",
                conv.clone(),
                LlmDelta { step_id: "r1.s1".into(), attempt: 1, seq: i, text: "some tokens ".into() },
            )
            .expect("valid event"),
        );
    }
    out.push(
        Envelope::new(
            format!("c{c}-done"),
            "/bench",
            conv,
            LlmCompleted {
                step_id: "r1.s1".into(),
                attempt: 1,
                text: "the answer".into(),
                tool_calls: vec![],
                finish_reason: None,
            },
        )
        .expect("valid event"),
    );
    out
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

async fn applied_count(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream("CONV_APPLIED").await.expect("stream").info().await.expect("info").state.messages
}

/// One turn of a long conversation: a message of `message_bytes`, `deltas`
/// deltas of ~30 bytes, the completion.
fn turn(conv: &ConversationId, t: usize, deltas: u64, message_bytes: usize) -> Vec<Envelope> {
    let step = format!("r{t}.s1");
    let mut out = vec![
        Envelope::new(
            format!("t{t}-m"),
            "/bench",
            conv.clone(),
            MessageReceived { text: "x".repeat(message_bytes.max(1)), role: None, channel: None, sender: None },
        )
        .expect("valid event"),
    ];
    for i in 0..deltas {
        out.push(
            Envelope::new(
                format!("t{t}-d{i}"),
                "/bench",
                conv.clone(),
                LlmDelta { step_id: step.clone(), attempt: 1, seq: i, text: "some tokens of the answer ".into() },
            )
            .expect("valid event"),
        );
    }
    out.push(
        Envelope::new(
            format!("t{t}-done"),
            "/bench",
            conv.clone(),
            LlmCompleted { step_id: step, attempt: 1, text: String::new(), tool_calls: vec![], finish_reason: None },
        )
        .expect("valid event"),
    );
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Apply cost of a delta as the conversation grows.
fn sweep() {
    let conv = ConversationId::parse("sweep").expect("id");
    let mut state = State::new("sweep");
    let mut rows = Vec::new();
    let mut turns_done = 0;
    println!("turns  state KiB  delta apply p50 µs  p99 µs  whole-state digest µs");
    for target in [1usize, 10, 50, 100, 200, 400, 700, 1000] {
        while turns_done < target {
            turns_done += 1;
            for e in turn(&conv, turns_done, 20, 2000) {
                apply(&mut state, &e);
            }
        }
        // A new turn: measure each of its deltas.
        turns_done += 1;
        let events = turn(&conv, turns_done, 200, 2000);
        let mut times = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let t = Instant::now();
            apply(&mut state, e);
            if i > 0 && i < events.len() - 1 {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        times.sort_by(f64::total_cmp);
        let t = Instant::now();
        let digest = state.digest();
        let digest_us = t.elapsed().as_secs_f64() * 1e6;
        assert!(!digest.is_empty());
        let kib = state.to_bytes().len() as f64 / 1024.0;
        println!("{target:>5}  {kib:>9.0}  {:>18.2}  {:>6.2}  {digest_us:>21.0}", pct(&times, 0.5), pct(&times, 0.99));
        rows.push(format!("{target},{kib:.0},{:.2},{:.2},{digest_us:.0}", pct(&times, 0.5), pct(&times, 0.99)));
    }
    let csv = format!("turns,state_kib,apply_p50_us,apply_p99_us,digest_us\n{}\n", rows.join("\n"));
    if std::fs::write("docs/perf-apply-sweep.csv", csv).is_ok() {
        println!("wrote docs/perf-apply-sweep.csv");
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--sweep") {
        sweep();
        return;
    }
    let inputs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);

    // 1. The reducer alone.
    let events: Vec<Envelope> = (0..200).flat_map(|c| conversation(c, 98)).collect();
    let mut states: HashMap<ConversationId, State> = HashMap::new();
    let started = Instant::now();
    let mut applied = 0u64;
    for _ in 0..5 {
        states.clear();
        for e in &events {
            let s =
                states.entry(e.conversation_id().clone()).or_insert_with(|| State::new(e.conversation_id().as_str()));
            apply(s, e);
            applied += 1;
        }
    }
    let reducer_rate = applied as f64 / started.elapsed().as_secs_f64();

    // 3. Memory per idle conversation: 10,000 finished conversations in memory.
    let before = rss_kib();
    let mut idle: HashMap<ConversationId, State> = HashMap::new();
    for c in 0..10_000 {
        let mut s = State::new(&format!("idle-{c}"));
        for e in conversation(c, 5) {
            apply(&mut s, &e);
        }
        idle.insert(ConversationId::parse(&format!("idle-{c}")).expect("id"), s);
    }
    let per_conv_kib = (rss_kib().saturating_sub(before)) as f64 / 10_000.0;
    let snapshot_bytes = idle.values().map(|s| s.to_bytes().len()).sum::<usize>() / idle.len();
    drop(idle);

    // 2. End to end against raw consume+ack.
    let nats = TestNats::start_process().await.expect("nats-server (scripts/ensure-nats.sh)");
    nats.setup().await.expect("topology");
    let js = nats.jetstream().await;
    let convs = inputs / 100;
    let e2e: Vec<Envelope> = (0..convs).flat_map(|c| conversation(c, 98)).collect();
    conv_nats::test_util::publish_all(&js, &e2e).await;

    // Raw baseline: the same count of messages, one consumer, consume + ack
    // each: with confirmed acks (like each partition worker) and without.
    let body = Bytes::from(vec![b'x'; 120]);
    conv_nats::baseline::publish(&js, "RAW", "raw", e2e.len(), body, 1000).await.expect("raw publish");
    let raw_rate = conv_nats::baseline::consume(&js, "RAW", "raw", e2e.len(), conv_nats::baseline::Ack::Confirmed)
        .await
        .expect("raw");
    let raw_fast_rate = conv_nats::baseline::consume(&js, "RAW", "raw-fast", e2e.len(), conv_nats::baseline::Ack::Sent)
        .await
        .expect("raw");

    let mut config: conv_runtime::Config = conv_nats::service::Settings::for_test(nats.config(), free_addr());
    config.options.instance = "bench".into();
    let started = Instant::now();
    let rt = spawn_service("conv-runtime", |t| conv_runtime::run(config, t));
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied_count(&js).await < e2e.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e2e_elapsed = started.elapsed();
    let e2e_rate = e2e.len() as f64 / e2e_elapsed.as_secs_f64();
    let _ = rt.shutdown().await;

    println!("conv-runtime benchmark ({} inputs end to end, {} conversations)", e2e.len(), convs);
    println!("reducer (pure, one core)            {reducer_rate:>12.0} applies/s");
    println!(
        "raw JetStream consume + confirmed ack {raw_rate:>10.0} msgs/s  (one consumer, like each partition worker)"
    );
    println!("raw JetStream consume + ack (no wait) {raw_fast_rate:>10.0} msgs/s");
    println!(
        "runtime end to end (1 instance)     {e2e_rate:>12.0} inputs/s  ({:.1} s, includes start-up)",
        e2e_elapsed.as_secs_f64()
    );
    println!("runtime / raw consume+confirmed ack {:>12.2}", e2e_rate / raw_rate);
    println!("runtime / raw consume+ack (no wait) {:>12.2}", e2e_rate / raw_fast_rate);
    println!("memory per idle conversation        {per_conv_kib:>12.1} KiB resident  ({snapshot_bytes} B snapshot)");
}

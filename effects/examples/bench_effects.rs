//! Benchmark (not a test) of effects with the runtime, in-process over a
//! real nats-server:
//! 1. journal events per 500-token reply after delta coalescing (scripted
//!    provider at 0 ms and 15 ms per token);
//! 2. abort latency p50/p99 with N conversations streaming at once: abort
//!    event time → the `llm.canceled` event's time.
//!
//! cargo run --release -p conv-effects --example bench_effects -- [conversations=1000]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use conv_contracts::payload::*;
use conv_contracts::{ConversationId, Envelope, EventType, Limits, Payload};
use conv_effects::EffectsOptions;
use conv_nats::test_util::TestNats;
use support::Stack;

async fn inputs(js: &async_nats::jetstream::Context, filter: &str) -> Vec<Envelope> {
    conv_nats::read::all(js, "CONV_IN", filter, false)
        .await
        .expect("read")
        .iter()
        .filter_map(|m| conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default()).ok())
        .collect()
}

async fn publish(js: &async_nats::jetstream::Context, events: &[Envelope]) {
    for chunk in events.chunks(500) {
        let mut acks = Vec::new();
        for e in chunk {
            acks.push(conv_nats::headers::publish(js, e).await.expect("publish"));
        }
        for a in acks {
            a.await.expect("ack");
        }
    }
}

fn message(conv: &str, id: &str) -> Envelope {
    let mut e = Envelope::new(
        id,
        "/bench",
        ConversationId::parse(conv).expect("id"),
        MessageReceived { text: "go".into(), role: None, channel: None, sender: None },
    )
    .expect("valid event");
    e = e.with_time(Some(chrono::Utc::now()));
    e
}

async fn stack(options: EffectsOptions) -> Stack {
    let nats = TestNats::start_process().await.expect("nats-server (scripts/ensure-nats.sh)");
    Stack::start_on(nats, options).await
}

async fn events_per_reply(delay_ms: u64) -> (usize, usize) {
    let s =
        stack(EffectsOptions { scripted_tokens: 500, scripted_token_delay_ms: delay_ms, ..Default::default() }).await;
    let js = s.nats.jetstream().await;
    publish(&js, &[message("reply", "m1")]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let journal = loop {
        let i = inputs(&js, "conv.in.*.*.reply").await;
        if i.iter().any(|e| e.event_type() == EventType::LlmCompleted) || Instant::now() > deadline {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deltas = journal.iter().filter(|e| e.event_type() == EventType::LlmDelta).count();
    let lifecycle = journal.len() - 1; // all but the message
    s.stop().await;
    (deltas, lifecycle)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);

    let (d0, l0) = events_per_reply(0).await;
    let (d15, l15) = events_per_reply(15).await;

    // Abort latency under load: n conversations streaming long replies.
    let s = stack(EffectsOptions {
        scripted_tokens: 10_000,
        scripted_token_delay_ms: 200,
        concurrency: n.max(1),
        ..Default::default()
    })
    .await;
    let js = s.nats.jetstream().await;
    // The raw floor of the storm, measured on the same server: idle now,
    // and again below with the n streams running.
    let raw_client = s.nats.client().await;
    let raw_observer = s.nats.client().await;
    let raw_storm = |name: &'static str| {
        let (c, o) = (raw_client.clone(), raw_observer.clone());
        async move {
            conv_nats::baseline::storm(&c, &o, name, "raw.storm", n, conv_contracts::subject::DEFAULT_PARTITIONS, 50)
                .await
                .expect("raw storm")
        }
    };
    let raw_idle = raw_storm("RAW_STORM_IDLE").await;
    // Observed as published (core subscriptions), not by re-reading the
    // journal: a poll of the whole stream would load the machine it measures.
    let client = s.nats.client().await;
    let mut live = client.subscribe(format!("{}.*", conv_contracts::subject::LIVE_PREFIX)).await.expect("subscribe");
    let mut llm_inputs = client.subscribe("conv.in.llm.*").await.expect("subscribe");
    // Hints on a connection of their own: `client` also carries every LLM
    // input, and a hint queued behind those would be seen late.
    let hint_client = s.nats.client().await;
    let mut hint_sub = hint_client.subscribe(conv_contracts::subject::live_cancel_filter()).await.expect("subscribe");
    let messages: Vec<Envelope> = (0..n).map(|i| message(&format!("ab-{i}"), &format!("m{i}"))).collect();
    publish(&js, &messages).await;
    // Wait until every conversation streams.
    let mut streaming = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while streaming.len() < n {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut live)).await {
            Ok(Some(m)) => {
                streaming.insert(m.subject.to_string());
            }
            _ => break,
        }
    }
    println!("{} of {n} conversations streaming", streaming.len());
    drop(live);
    let raw_loaded = raw_storm("RAW_STORM_LOADED").await;
    let aborts: Vec<Envelope> = (0..n)
        .map(|i| {
            Envelope::new(
                format!("abort-{i}"),
                "/bench",
                ConversationId::parse(&format!("ab-{i}")).expect("id"),
                AbortRequested { reason: None },
            )
            .expect("valid event")
        })
        .collect();
    // When each conversation's cancel hint left the runtime (seen here).
    let hints_seen = tokio::spawn(async move {
        let mut seen: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut hint_sub)).await
        {
            if let Some(conv) = m.subject.as_str().rsplit('.').next() {
                seen.entry(conv.to_owned()).or_insert_with(chrono::Utc::now);
            }
        }
        seen
    });
    // Each abort is stamped as it is published (as ingress stamps what it accepts).
    let publishing = Instant::now();
    let mut sent: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let mut acks = Vec::new();
    for mut e in aborts {
        let now = chrono::Utc::now();
        e = e.with_time(Some(now));
        sent.insert(e.conversation_id().to_string(), now);
        acks.push((e.conversation_id().to_string(), conv_nats::headers::publish(&js, &e).await.expect("publish")));
    }
    let mut stored_seq = Vec::new();
    for (conv, a) in acks {
        stored_seq.push((conv, a.await.expect("ack").sequence));
    }
    println!("  (publishing the {n} aborts took {:.0} ms)", publishing.elapsed().as_secs_f64() * 1000.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut canceled: Vec<Envelope> = Vec::new();
    while canceled.len() < n {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut llm_inputs)).await else {
            break;
        };
        if let Ok(e) = conv_nats::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, Limits::default())
            && e.event_type() == EventType::LlmCanceled
        {
            canceled.push(e);
        }
    }
    let mut latencies: Vec<f64> = canceled
        .iter()
        .filter_map(|e| {
            let at = e.time()?;
            let abort = sent.get(e.conversation_id().as_str())?;
            Some((at - *abort).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let seen = hints_seen.await.unwrap_or_default();
    // When JetStream stored each abort (the server's clock: same machine).
    let journal = js.get_stream_no_info("CONV_IN").await.expect("CONV_IN");
    let mut stored: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for (conv, seq) in &stored_seq {
        if let Ok(m) = journal.get_raw_message(*seq).await {
            let nanos = m.time.unix_timestamp_nanos() as i64;
            stored.insert(conv.clone(), chrono::DateTime::from_timestamp_nanos(nanos));
        }
    }
    let gap = |from: &HashMap<String, chrono::DateTime<chrono::Utc>>,
               to: &HashMap<String, chrono::DateTime<chrono::Utc>>| {
        let mut v: Vec<f64> =
            to.iter().filter_map(|(c, at)| Some((*at - *from.get(c)?).num_microseconds()? as f64 / 1000.0)).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let to_store = gap(&sent, &stored);
    let store_to_hint = gap(&stored, &seen);
    let mut to_hint: Vec<f64> =
        seen.iter().filter_map(|(c, at)| Some((*at - *sent.get(c)?).num_microseconds()? as f64 / 1000.0)).collect();
    to_hint.sort_by(|a, b| a.total_cmp(b));
    s.stop().await;
    let _ = Payload::from(StopRequested {});

    println!("conv-effects benchmark");
    println!("500-token reply, 0 ms/token:   {d0} deltas, {l0} lifecycle events in the journal");
    println!("500-token reply, 15 ms/token:  {d15} deltas, {l15} lifecycle events in the journal");
    println!(
        "abort latency, {n} conversations streaming: {} canceled, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  of which abort sent → the runtime's cancel hint seen: {} hints, p50 {:.0} ms, p99 {:.0} ms",
        to_hint.len(),
        pct(&to_hint, 0.5),
        pct(&to_hint, 0.99)
    );
    println!(
        "  abort sent → stored by JetStream: p50 {:.0} ms, p99 {:.0} ms; stored → hint seen: p50 {:.0} ms, p99 {:.0} ms",
        pct(&to_store, 0.5),
        pct(&to_store, 0.99),
        pct(&store_to_hint, 0.5),
        pct(&store_to_hint, 0.99)
    );
    println!(
        "raw JetStream storm on the same server ({n} messages published together, {} pull consumers, each answered \
         on core NATS): idle p50 {:.0} ms, p99 {:.0} ms; with the {n} streams running p50 {:.0} ms, p99 {:.0} ms",
        conv_contracts::subject::DEFAULT_PARTITIONS,
        pct(&raw_idle, 0.5),
        pct(&raw_idle, 0.99),
        pct(&raw_loaded, 0.5),
        pct(&raw_loaded, 0.99)
    );
    println!(
        "ratios to the raw storm with the streams running (p50 / p99): abort sent → hint seen {:.2} / {:.2}; \
         abort → canceled {:.2} / {:.2}",
        pct(&to_hint, 0.5) / pct(&raw_loaded, 0.5),
        pct(&to_hint, 0.99) / pct(&raw_loaded, 0.99),
        pct(&latencies, 0.5) / pct(&raw_loaded, 0.5),
        pct(&latencies, 0.99) / pct(&raw_loaded, 0.99)
    );
}

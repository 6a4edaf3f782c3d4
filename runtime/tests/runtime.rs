//! The runtime against a real JetStream server: order, preemption, ownership,
//! failover, snapshots.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use conv_contracts::payload::*;
use conv_contracts::subject::STREAM_APPLIED;
use conv_contracts::{ConversationId, Envelope, Limits, Payload};
use conv_nats::TopologyConfig;
use conv_nats::test_util::{ServiceHandle, TestNats, free_addr, publish_all, spawn_service};
use conv_runtime::{Config, RuntimeOptions};
use futures::StreamExt;
use serde_json::json;

/// Short TTLs so takeover happens within seconds in tests.
fn fast_topology() -> TopologyConfig {
    TopologyConfig { owner_ttl_secs: 3, runtime_ack_wait_secs: 4, pinned_ttl_secs: 3, ..Default::default() }
}

async fn nats() -> TestNats {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup_with(&fast_topology()).await.expect("topology");
    nats
}

fn runtime(nats: &TestNats, instance: &str) -> ServiceHandle<conv_runtime::Error> {
    runtime_at(nats, instance, free_addr())
}

/// A runtime `instance` whose HTTP endpoints (`/metrics`) are at `addr`.
fn runtime_at(nats: &TestNats, instance: &str, addr: std::net::SocketAddr) -> ServiceHandle<conv_runtime::Error> {
    let mut config: Config = conv_nats::service::Settings::for_test(nats.config(), addr);
    config.topology = fast_topology();
    config.options =
        RuntimeOptions { instance: instance.into(), heartbeat_ms: 250, snapshot_every: 4, ..Default::default() };
    spawn_service(instance, |token| conv_runtime::run(config, token))
}

/// A runtime `instance` that has applied one message (`id` to conversation
/// `c`), and the server.
async fn one_applied(
    instance: &str,
    id: &str,
    c: &str,
) -> (TestNats, async_nats::jetstream::Context, ServiceHandle<conv_runtime::Error>) {
    let nats = nats().await;
    let js = nats.jetstream().await;
    let rt = runtime(&nats, instance);
    publish_all(&js, &[message(id, c, "tell me a long story")]).await;
    assert_eq!(wait_markers(&js, 1, Duration::from_secs(20)).await.len(), 1);
    (nats, js, rt)
}

fn conv(id: &str) -> ConversationId {
    ConversationId::parse(id).expect("id")
}

fn message(id: &str, c: &str, text: &str) -> Envelope {
    Envelope::new(id, "/test", conv(c), MessageReceived { text: text.into(), role: None, channel: None, sender: None })
        .expect("valid event")
}

fn delta(id: &str, c: &str, seq: u64) -> Envelope {
    Envelope::new(id, "/test", conv(c), LlmDelta { step_id: "r1.s1".into(), attempt: 1, seq, text: format!("t{seq} ") })
        .expect("valid event")
}

/// Every applied marker in the journal, in applied order.
async fn all_markers(js: &async_nats::jetstream::Context) -> Vec<Applied> {
    let mut stream = js.get_stream(STREAM_APPLIED).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    if last == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.ok().flatten() {
        let seq = m.info().expect("info").stream_sequence;
        let e =
            conv_nats::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, Limits::default()).expect("valid");
        if let Payload::Applied(a) = e.into_data() {
            out.push(a);
        }
        if seq >= last {
            break;
        }
    }
    out
}

async fn wait_markers(js: &async_nats::jetstream::Context, at_least: usize, within: Duration) -> Vec<Applied> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let markers = all_markers(js).await;
        if markers.len() >= at_least || tokio::time::Instant::now() > deadline {
            return markers;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn per_input(markers: &[Applied]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in markers {
        *counts.entry(m.input_id.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn inputs_are_applied_once_in_order_with_their_effects() {
    let nats = nats().await;
    let js = nats.jetstream().await;
    let rt = runtime(&nats, "a");
    let mut events = Vec::new();
    for c in ["ord-1", "ord-2", "ord-3"] {
        events.push(message(&format!("{c}-m"), c, "hello"));
        for i in 0..20 {
            events.push(delta(&format!("{c}-d{i}"), c, i));
        }
    }
    publish_all(&js, &events).await;
    // Redelivered or republished inputs are not applied twice.
    publish_all(&js, &events[..5]).await;
    let markers = wait_markers(&js, events.len(), Duration::from_secs(30)).await;
    let counts = per_input(&markers);
    assert_eq!(counts.len(), events.len(), "every input has a marker");
    assert!(counts.values().all(|n| *n == 1), "exactly one marker per input");
    for c in ["ord-1", "ord-2", "ord-3"] {
        let order: Vec<&str> =
            markers.iter().filter(|m| m.input_id.starts_with(c)).map(|m| m.input_id.as_str()).collect();
        let expected: Vec<String> =
            std::iter::once(format!("{c}-m")).chain((0..20).map(|i| format!("{c}-d{i}"))).collect();
        assert_eq!(order, expected, "per-conversation order of {c}");
        let indexes: Vec<u64> = markers.iter().filter(|m| m.input_id.starts_with(c)).map(|m| m.applied_index).collect();
        assert_eq!(indexes, (1..=21).collect::<Vec<u64>>());
    }
    // The run of each conversation asked for an LLM step.
    let mut effect = js.get_stream("CONV_EFFECT").await.expect("stream");
    assert_eq!(effect.info().await.expect("info").state.messages, 3);
    rt.shutdown().await.expect("clean shutdown");

    // The state survives the restart: snapshot + journal tail give the same hash.
    let snapshots = conv_store::Snapshots::open(&js).await.expect("bucket");
    let snap = snapshots.load("ord-1").await.expect("load").snapshot.expect("a snapshot was written");
    let rebuilt = conv_store::journal::rebuild(&js, &conv("ord-1"), None).await.expect("rebuild");
    assert!(rebuilt.mismatches.is_empty());
    assert_eq!(rebuilt.snapshot.state.hash(), snap.state.hash());
    let streamed: String = (0..20).map(|i| format!("t{i} ")).collect();
    assert_eq!(snap.state.entries.last().map(|e| e.text.as_str()), Some(streamed.as_str()));
}

#[tokio::test]
async fn an_abort_behind_ten_thousand_deltas_is_applied_first() {
    let (nats, js, rt) = one_applied("a", "m", "busy").await;
    rt.shutdown().await.expect("stop");

    // While no runtime runs: 10,000 token deltas, then an abort.
    let mut backlog: Vec<Envelope> = (0..10_000).map(|i| delta(&format!("d{i}"), "busy", i)).collect();
    backlog.push(
        Envelope::new("abort", "/test", conv("busy"), AbortRequested { reason: Some("enough".into()) })
            .expect("valid event"),
    );
    publish_all(&js, &backlog).await;

    let addr = free_addr();
    let rt = runtime_at(&nats, "a", addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let markers = loop {
        let markers = all_markers(&js).await;
        if markers.iter().any(|m| m.input_id == "abort") || tokio::time::Instant::now() > deadline {
            break markers;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let abort = markers.iter().find(|m| m.input_id == "abort").expect("the abort was applied");
    assert_eq!(abort.applied_index, 2, "right after the message, before any of the 10,000 deltas");
    assert!(markers.iter().filter(|m| m.input_id.starts_with('d')).all(|m| m.applied_index > 2));
    // The waits in the scheduler are measured by priority (the P0 SLO):
    // the abort's before its marker, the deltas' as they are taken.
    let count = |metrics: &str, priority: &str| {
        let prefix = format!("conv_runtime_queue_wait_seconds_count{{priority=\"{priority}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse::<u64>().ok())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let metrics =
            reqwest::get(format!("http://{addr}/metrics")).await.expect("metrics").text().await.expect("text");
        if count(&metrics, "P3").is_some_and(|n| n >= 1) || tokio::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(count(&metrics, "P0").is_some_and(|n| n >= 1), "the abort's wait: {metrics}");
    assert!(count(&metrics, "P3").is_some_and(|n| n >= 1), "the deltas' waits: {metrics}");
    rt.shutdown().await.expect("stop");
}

#[tokio::test]
async fn two_instances_split_the_partitions_and_a_third_joins() {
    let nats = nats().await;
    let js = nats.jetstream().await;
    let leases = || conv_nats::test_util::lease_counts(&js, "", 16);
    let wait_split = |want: Vec<(&'static str, usize)>| {
        let leases = &leases;
        async move {
            for _ in 0..120 {
                let got = leases().await;
                if want.iter().all(|(k, n)| got.get(*k) == Some(n)) {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            leases().await
        }
    };
    let a = runtime(&nats, "a");
    let b = runtime(&nats, "b");
    let got = wait_split(vec![("a", 8), ("b", 8)]).await;
    assert_eq!((got.get("a"), got.get("b")), (Some(&8), Some(&8)), "{got:?}");

    // Inputs flow while a third instance joins and partitions move.
    let events: Vec<Envelope> =
        (0..400).map(|i| message(&format!("j{i}"), &format!("join-{}", i % 40), "hi")).collect();
    let publisher = {
        let js = js.clone();
        let events = events.clone();
        tokio::spawn(async move {
            for chunk in events.chunks(20) {
                publish_all(&js, chunk).await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let c = runtime(&nats, "c");
    let got = wait_split(vec![("a", 6), ("b", 5), ("c", 5)]).await;
    assert_eq!(got.values().sum::<usize>(), 16, "{got:?}");
    assert_eq!((got.get("a"), got.get("b"), got.get("c")), (Some(&6), Some(&5), Some(&5)), "{got:?}");
    publisher.await.expect("published");
    let markers = wait_markers(&js, events.len(), Duration::from_secs(60)).await;
    let counts = per_input(&markers);
    assert_eq!(counts.len(), events.len(), "nothing skipped");
    assert!(counts.values().all(|n| *n == 1), "nothing applied twice");
    for h in [a, b, c] {
        h.shutdown().await.expect("stop");
    }
}

#[tokio::test]
async fn an_input_waits_for_its_cause_and_a_missing_cause_is_dead_lettered() {
    let nats = nats().await;
    let js = nats.jetstream().await;
    let mut config: Config = conv_nats::service::Settings::for_test(nats.config(), free_addr());
    config.topology = fast_topology();
    config.options = RuntimeOptions {
        instance: "a".into(),
        heartbeat_ms: 250,
        causality_wait_ms: 1500,
        evict_after_secs: 1,
        idle_snapshot_ms: 100,
        ..Default::default()
    };
    let rt = spawn_service("a", |token| conv_runtime::run(config, token));

    // The reply's completion arrives before the message that caused its step.
    let early = Envelope::new(
        "early",
        "/test",
        conv("cause-1"),
        LlmCompleted {
            step_id: "r1.s1".into(),
            attempt: 1,
            text: "answer".into(),
            tool_calls: vec![],
            finish_reason: None,
        },
    )
    .expect("valid event")
    .with_causation(Some("late-msg~2".into()), None)
    .expect("valid ids");
    let ghost = Envelope::new(
        "ghost-effect",
        "/test",
        conv("cause-1"),
        ToolCompleted { tool_call_id: "x".into(), result: json!(1) },
    )
    .expect("valid event")
    .with_causation(Some("never-sent~1".into()), None)
    .expect("valid ids");
    publish_all(&js, &[early, ghost]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_all(&js, &[message("late-msg", "cause-1", "question")]).await;

    let markers = wait_markers(&js, 2, Duration::from_secs(20)).await;
    let order: Vec<&str> = markers.iter().map(|m| m.input_id.as_str()).collect();
    assert_eq!(order, ["late-msg", "early"], "the cause first, then what it caused");
    let letters = conv_nats::test_util::wait_dead_letters(&js, 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].reason.as_deref().is_some_and(|r| r.starts_with("causality_timeout")), "{:?}", letters[0]);
    assert_eq!(letters[0].original.as_ref().and_then(|o| o.event_id.as_deref()), Some("ghost-effect"));

    // Evicted after a quiet second, the conversation is restored for the next input.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish_all(&js, &[message("again", "cause-1", "more")]).await;
    let markers = wait_markers(&js, 3, Duration::from_secs(20)).await;
    let again = markers.iter().find(|m| m.input_id == "again").expect("applied");
    assert_eq!(again.applied_index, 3, "state restored from snapshot + journal");
    rt.shutdown().await.expect("stop");
}

/// Output of the conversation in `CONV_OUT`: (position, id), in stream order.
async fn outputs(js: &async_nats::jetstream::Context, c: &str) -> Vec<(u64, String)> {
    let filter = conv_contracts::subject::out_conversation_filter(&conv(c));
    let stored = conv_nats::read::all(js, conv_contracts::subject::STREAM_OUT, &filter, false).await.expect("read");
    stored
        .iter()
        .map(|m| {
            let e =
                conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Limits::default()).expect("valid");
            (e.position().expect("positioned"), e.id().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn output_stored_without_its_marker_is_adopted_in_its_order() {
    let (nats, js, r1) = one_applied("old-owner", "or-m1", "orphan").await;
    r1.shutdown().await.expect("stopped");

    // What an owner that lost the stream of its markers leaves behind: the
    // output of a second message, stored without its marker.
    let ack = conv_nats::headers::publish(&js, &message("or-m2", "orphan", "second")).await.expect("publish");
    let m2_seq = ack.await.expect("ack").sequence;
    let m2 = conv_store::journal::input(&js, m2_seq).await.expect("stored input");
    let mut state = conv_store::journal::rebuild(&js, &conv("orphan"), None).await.expect("rebuild").snapshot.state;
    let applied = conv_core::reducer::apply(&mut state, &m2);
    let orphaned: Vec<Envelope> = applied.emitted.into_iter().map(|e| e.with_input_seq(m2_seq)).collect();
    assert!(orphaned.iter().any(|e| e.position().is_some()), "the message emits output");
    publish_all(&js, &orphaned).await;
    // An abort arrives next: it outranks the message, so a new owner that
    // did not know the orphaned output would apply the abort first and emit
    // different output at the same positions.
    publish_all(
        &js,
        &[Envelope::new("or-abort", "/test", conv("orphan"), AbortRequested { reason: None }).expect("valid event")],
    )
    .await;

    let _r2 = runtime(&nats, "new-owner");
    let markers = wait_markers(&js, 3, Duration::from_secs(30)).await;
    let order: Vec<&str> = markers.iter().map(|m| m.input_id.as_str()).collect();
    assert_eq!(order, ["or-m1", "or-m2", "or-abort"], "the orphaned input is applied first, in its place");

    let out = outputs(&js, "orphan").await;
    let mut positions: Vec<u64> = out.iter().map(|(p, _)| *p).collect();
    positions.sort_unstable();
    let expected: Vec<u64> = (1..=u64::try_from(out.len()).expect("len")).collect();
    assert_eq!(positions, expected, "one output per position, none missing: {out:?}");
    let ids: std::collections::HashSet<&String> = out.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), out.len(), "no output stored twice");
    let rebuilt = conv_store::journal::rebuild(&js, &conv("orphan"), None).await.expect("rebuild");
    assert!(rebuilt.mismatches.is_empty(), "replay matches every recorded hash");
}

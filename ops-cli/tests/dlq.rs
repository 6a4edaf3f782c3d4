//! Dead letters end to end: a consumer keeps failing a message → CONV_DLQ;
//! a third-party message that fails validation is terminated into CONV_DLQ
//! while other messages flow; a stray subject lands there directly; `convctl
//! dlq` lists, shows and re-drives them, every re-drive audited.

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use conv_contracts::payload::{MessageReceived, Payload};
use conv_contracts::subject::{self, STREAM_AUDIT, STREAM_DLQ, STREAM_IN};
use conv_contracts::{ConversationId, Envelope, Limits};
use conv_nats::consume::{self, HandlerError, Options};
use conv_nats::test_util::TestNats;
use conv_nats::topology::{RUNTIME_GROUP, runtime_consumer};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// (event id, `Conv-Redrive-Of` header) of every event the worker processed.
type Processed = Arc<Mutex<Vec<(String, Option<String>)>>>;

async fn convctl(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(args)
        .env("NATS_URL", url)
        .env_remove("CONV_PARTITIONS")
        .env_remove("CONV_REPLICAS")
        .output()
        .await
        .expect("run convctl")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

async fn count(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream).await.expect("stream").info().await.expect("info").state.messages
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn message(id: &str, conv: &ConversationId, text: &str) -> Envelope {
    Envelope::new(
        id,
        "/test",
        conv.clone(),
        MessageReceived { text: text.into(), role: None, channel: None, sender: None },
    )
    .expect("valid event")
}

#[tokio::test]
async fn dead_letters_are_listed_shown_and_redriven() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let url = nats.url();
    let js = nats.jetstream().await;
    let conv = ConversationId::parse("dlq-1").expect("id");

    // The partition worker of this conversation, failing until told otherwise.
    let partition = subject::partition_of(&conv, subject::DEFAULT_PARTITIONS);
    let consumer: PullConsumer = js
        .get_stream(STREAM_IN)
        .await
        .expect("stream")
        .get_consumer(&runtime_consumer(partition))
        .await
        .expect("consumer");
    let messages =
        consumer.stream().group(RUNTIME_GROUP).expires(Duration::from_secs(1)).messages().await.expect("messages");
    let healthy = Arc::new(AtomicBool::new(false));
    let processed: Processed = Arc::default();
    let shutdown = CancellationToken::new();
    let (h, p) = (healthy.clone(), processed.clone());
    let worker = tokio::spawn(consume::run_validated(
        messages,
        move |event: Envelope, message: async_nats::jetstream::Message| {
            let (h, p) = (h.clone(), p.clone());
            async move {
                if !h.load(Ordering::SeqCst) {
                    return Err(HandlerError::Transient("dependency down".into()));
                }
                let redrive = message.headers.as_ref().and_then(|m| m.get("Conv-Redrive-Of")).map(|v| v.to_string());
                p.lock().expect("lock").push((event.id().to_owned(), redrive));
                Ok(())
            }
        },
        Options { nak_min: Duration::from_millis(20), nak_max: Duration::from_millis(50), ..Default::default() },
        Limits::default(),
        shutdown.clone(),
    ));

    // 1. A good event the worker keeps failing.
    let failing = message("evt-failing", &conv, "hello");
    conv_nats::headers::publish(&js, &failing).await.expect("publish").await.expect("ack");
    // 2. A third-party event without `source`: invalid, terminated at consumption.
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-bad"),
        ("ce-type", "conv.in.message.received"),
        ("ce-subject", "dlq-1"),
        ("content-type", "application/json"),
    ] {
        headers.insert(k, v);
    }
    js.publish_with_headers("conv.in.message.dlq-1", headers, r#"{"text":"no source"}"#.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    // 3. A valid event published on a subject that is not conv.in.<family>.<id>.
    let stray = message("evt-stray", &conv, "wrong door");
    let (h, body) = conv_nats::headers::encode(&stray);
    let ack = js
        .publish_with_headers(format!("conv.in.{partition}.message.dlq-1"), h, body)
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert_eq!(ack.stream, STREAM_DLQ);

    wait_for("three dead letters", async || count(&js, STREAM_DLQ).await == 3).await;
    let in_before = count(&js, STREAM_IN).await;

    let list = convctl(&url, &["dlq", "list", "--json"]).await;
    assert!(list.status.success(), "{}", text(&list));
    let letters: Vec<Value> = serde_json::from_slice(&list.stdout).expect("json");
    let by_cause = |cause: &str| {
        letters.iter().find(|l| l["cause"] == cause).cloned().unwrap_or_else(|| panic!("{cause} in {letters:?}"))
    };
    let maxed = by_cause("max_deliveries");
    let termed = by_cause("terminated");
    let strayed = by_cause("stray_subject");
    assert_eq!(maxed["stream"], STREAM_IN);
    assert_eq!(maxed["consumer"], runtime_consumer(partition));
    assert_eq!(maxed["deliveries"], 20, "runtime consumers allow 4 × max_deliver");
    assert_eq!(maxed["original"]["event_id"], "evt-failing");
    assert_eq!(maxed["original"]["conversation_id"], "dlq-1");
    assert!(termed["reason"].as_str().is_some_and(|r| r.starts_with("missing_field")), "{termed}");
    assert_eq!(strayed["original"]["event_id"], "evt-stray");
    let (max_id, term_id) = (maxed["id"].as_u64().expect("id"), termed["id"].as_u64().expect("id"));

    let human = convctl(&url, &["dlq", "list"]).await;
    assert!(text(&human).contains("3 dead letters"), "{}", text(&human));
    let show = convctl(&url, &["dlq", "show", &term_id.to_string()]).await;
    assert!(show.status.success());
    assert!(text(&show).contains("not possible") && text(&show).contains("source"), "{}", text(&show));

    // A dry run changes nothing.
    let dry = convctl(&url, &["dlq", "redrive", &max_id.to_string(), "--dry-run"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("would re-drive"), "{}", text(&dry));
    assert_eq!(count(&js, STREAM_DLQ).await, 3);
    assert_eq!(count(&js, STREAM_IN).await, in_before);
    assert_eq!(count(&js, STREAM_AUDIT).await, 0);

    // The dependency is back: re-drive gets the event processed, once, and audited.
    healthy.store(true, Ordering::SeqCst);
    let redrive = convctl(&url, &["dlq", "redrive", &max_id.to_string()]).await;
    assert!(redrive.status.success(), "{}", text(&redrive));
    wait_for("the re-driven event to be processed", async || !processed.lock().expect("lock").is_empty()).await;
    assert_eq!(processed.lock().expect("lock")[0], ("evt-failing".to_owned(), Some(format!("CONV_DLQ:{max_id}"))));
    assert_eq!(count(&js, STREAM_DLQ).await, 2, "the re-driven entry left the DLQ");
    let audit = js.get_stream(STREAM_AUDIT).await.expect("audit").get_raw_message(1).await.expect("audit record");
    let record = conv_nats::headers::decode(&audit.subject, Some(&audit.headers), &audit.payload, Limits::default())
        .expect("valid");
    match record.data() {
        Payload::DlqRedriven(r) => {
            assert_eq!((r.dlq_seq, r.original_stream.as_str()), (max_id, STREAM_IN));
            assert_eq!(r.original_event_id.as_deref(), Some("evt-failing"));
        }
        other => panic!("unexpected audit record {other:?}"),
    }

    // The invalid one cannot be re-driven; it stays.
    let refused = convctl(&url, &["dlq", "redrive", &term_id.to_string()]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("not re-drivable"), "{}", text(&refused));

    // --all re-drives what it can (the stray, to its proper subject) and reports the rest.
    let all = convctl(&url, &["dlq", "redrive", "--all", "--json"]).await;
    assert_eq!(all.status.code(), Some(1), "one is skipped: {}", text(&all));
    let summary: Value = serde_json::from_slice(&all.stdout).expect("json");
    assert_eq!(summary["redriven"].as_array().map(Vec::len), Some(1));
    assert_eq!(summary["redriven"][0]["subject"], "conv.in.message.dlq-1");
    assert_eq!(summary["failed"][0]["id"], term_id);
    wait_for("the stray to be processed", async || processed.lock().expect("lock").len() == 2).await;
    // The conversation's events show the audit record and the dead letter still there.
    let rows: Vec<Value> =
        serde_json::from_slice(&convctl(&url, &["events", "dlq-1", "--json"]).await.stdout).expect("events json");
    assert!(rows.iter().any(|r| r["type"] == "conv.audit.dlq.redriven"), "{rows:?}");
    let letter = rows
        .iter()
        .find(|r| r["type"].as_str().is_some_and(|t| t.starts_with("dead letter (terminated")))
        .unwrap_or_else(|| panic!("the terminated dead letter in {rows:?}"));
    assert_eq!(letter["id"], format!("dlq:{term_id}"));
    let trace = text(&convctl(&url, &["trace", "dlq-1"]).await);
    assert!(trace.contains("conv.audit.dlq.redriven") && trace.contains("dead letter"), "{trace}");
    assert_eq!(processed.lock().expect("lock")[1].0, "evt-stray");
    assert_eq!(count(&js, STREAM_DLQ).await, 1);
    assert_eq!(count(&js, STREAM_AUDIT).await, 2);

    // A message stored under this conversation's subject that names another
    // (ce-subject): dead-lettered, and re-driven only with --force, because
    // a re-drive would put it into the conversation it names.
    let claims = message("evt-claims-other", &ConversationId::parse("victim-1").expect("id"), "not yours");
    let (h, body) = conv_nats::headers::encode(&claims);
    js.publish_with_headers("conv.in.message.dlq-1", h, body).await.expect("publish").await.expect("ack");
    wait_for("the mismatched letter", async || count(&js, STREAM_DLQ).await == 2).await;
    let letters: Vec<Value> =
        serde_json::from_slice(&convctl(&url, &["dlq", "list", "--json"]).await.stdout).expect("json");
    let mismatched = letters
        .iter()
        .find(|l| l["original"]["event_id"] == "evt-claims-other")
        .and_then(|l| l["id"].as_u64())
        .expect("the mismatched letter");
    let refused = convctl(&url, &["dlq", "redrive", &mismatched.to_string()]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("--force") && text(&refused).contains("victim-1"), "{}", text(&refused));
    assert_eq!(count(&js, STREAM_DLQ).await, 2, "nothing was re-driven");
    let forced = convctl(&url, &["dlq", "redrive", &mismatched.to_string(), "--force"]).await;
    assert!(forced.status.success(), "{}", text(&forced));
    assert!(text(&forced).contains("conv.in.message.victim-1"), "{}", text(&forced));

    shutdown.cancel();
    let stats = worker.await.expect("worker");
    assert_eq!(stats.termed, 2);
    assert_eq!(stats.acked, 2);
}

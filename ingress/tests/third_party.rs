//! A CloudEvent from a producer that is not ours — the Python `cloudevents`
//! SDK in binary mode, published with `nats-py` straight to `conv.in.>` — is
//! accepted by the consumer side exactly like the same event sent through
//! conv-ingress; an invalid one is terminated into the DLQ and the rest flows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use conv_contracts::subject::{self, STREAM_IN};
use conv_contracts::{ConversationId, Envelope, Limits};
use conv_ingress::Config;
use conv_nats::consume::{self, Options};
use conv_nats::service::Settings;
use conv_nats::test_util::{TestNats, free_addr, spawn_service, wait_http_ok};
use conv_nats::topology::{RUNTIME_GROUP, runtime_consumer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn python_cloudevents_binary_mode_is_consumed_like_ingress_events() {
    let (nats, js) = TestNats::set_up().await;
    let addr = free_addr();
    let config: Config = Settings::for_test(nats.config(), addr);
    let _ingress = spawn_service("conv-ingress", |token| conv_ingress::run(config, token));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(15)).await, Some(200));

    // The same event through ingress (structured mode), under another id.
    let via_ingress = json!({
        "specversion": "1.0", "id": "via-ingress", "source": "/py client", "type": "conv.in.message.received",
        "subject": "py-1", "time": "2026-01-01T00:00:00Z", "causationid": "cause-1",
        "datacontenttype": "application/json", "data": {"text": "héllo \"world\" 100%", "channel": "python"}
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .body(via_ingress.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 202);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/publish_cloudevents.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &nats.url(), "py-1"])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Python producer failed (scripts/test.sh installs cloudevents and nats-py): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(published.len(), 3);
    assert!(published.iter().all(|p| p["stream"] == STREAM_IN), "{published:?}");

    // The consumer side: the partition worker's validated consume loop.
    let conv = ConversationId::parse("py-1").expect("id");
    let consumer: PullConsumer = js
        .get_stream(STREAM_IN)
        .await
        .expect("stream")
        .get_consumer(&runtime_consumer(subject::partition_of(&conv, subject::DEFAULT_PARTITIONS)))
        .await
        .expect("consumer");
    let messages = consumer.stream().group(RUNTIME_GROUP).messages().await.expect("messages");
    let seen: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let shutdown = CancellationToken::new();
    let (s, stop) = (seen.clone(), shutdown.clone());
    let worker = tokio::spawn(consume::run_validated(
        messages,
        move |event: Envelope, _m| {
            let (s, stop) = (s.clone(), stop.clone());
            async move {
                let mut seen = s.lock().expect("lock");
                seen.push(event);
                if seen.len() == 3 {
                    stop.cancel();
                }
                Ok(())
            }
        },
        Options::default(),
        Limits::default(),
        shutdown.clone(),
    ));
    let stats = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("in time").expect("no panic");
    assert_eq!((stats.acked, stats.termed), (3, 1), "{stats:?}");

    let seen = seen.lock().expect("lock").clone();
    let ids: Vec<&str> = seen.iter().map(|e| e.id()).collect();
    assert_eq!(ids, ["via-ingress", "py-valid", "py-valid-2"], "per-conversation order, the invalid one skipped");
    // Decoded exactly like the event that came through ingress, but for its id.
    let but_id = |e: &conv_contracts::Envelope| {
        let mut json = conv_contracts::binding::to_structured_json(e);
        json.as_object_mut().map(|o| o.remove("id"));
        json
    };
    assert_eq!(but_id(&seen[1]), but_id(&seen[0]));

    // The invalid one is in the DLQ with its reason.
    let letters = conv_nats::test_util::wait_dead_letters(&js, 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].cause, conv_nats::dlq::Cause::Terminated);
    assert!(letters[0].reason.as_deref().is_some_and(|r| r.starts_with("bad_conversation_id")), "{:?}", letters[0]);
    assert_eq!(letters[0].original.as_ref().and_then(|o| o.event_id.as_deref()), Some("py-invalid"));
}

//! The outbound webhook channel: finished assistant messages are delivered
//! to the configured URL, retried when the receiver fails.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use conv_contracts::payload::MessageReceived;
use conv_contracts::{ConversationId, Envelope};
use serde_json::Value;

#[derive(Default)]
struct Receiver {
    calls: Mutex<usize>,
    delivered: Mutex<Vec<(String, Value)>>,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> StatusCode {
    let n = {
        let mut c = r.calls.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        *c
    };
    if n == 1 {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    r.delivered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, serde_json::from_str(&body).unwrap_or(Value::Null)));
    StatusCode::OK
}

#[tokio::test]
async fn finished_assistant_messages_are_delivered_with_retries() {
    let receiver = Arc::new(Receiver::default());
    let app = Router::new().route("/out", post(receive)).with_state(receiver.clone());
    let addr = conv_nats::test_util::serve_local(app).await;
    let pipeline = support::Pipeline::start(|c| {
        c.projections.options.webhook_url = format!("http://{addr}/out");
    })
    .await;
    let js = pipeline.nats.jetstream().await;

    for c in ["o1", "o2"] {
        let e = Envelope::new(
            format!("{c}-m"),
            "/test",
            ConversationId::parse(c).expect("id"),
            MessageReceived { text: format!("hi from {c}"), role: None, channel: None, sender: None },
        )
        .expect("valid event");
        conv_nats::headers::publish(&js, &e).await.expect("publish").await.expect("ack");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.delivered.lock().map(|d| d.len()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "deliveries did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = receiver.delivered.lock().expect("lock").clone();
    assert_eq!(delivered.len(), 2, "one delivery per reply: {delivered:?}");
    for (key, body) in &delivered {
        let conv = body["conversation_id"].as_str().expect("conversation");
        assert!(body["text"].as_str().is_some_and(|t| t.starts_with(&format!("You said: hi from {conv}."))), "{body}");
        assert_eq!(body["status"], "completed");
        assert_eq!(key, body["event_id"].as_str().expect("event id"));
    }
    assert_eq!(*receiver.calls.lock().expect("lock"), 3, "the failed first delivery was retried");
}

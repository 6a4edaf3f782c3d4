//! The outbound webhook channel: finished assistant messages are delivered
//! to the configured URL, retried when the receiver fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use conv_contracts::payload::MessageReceived;
use conv_contracts::{ConversationId, Envelope};
use conv_nats::service::Settings;
use conv_nats::test_util::{TestNats, free_addr, spawn_service};
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = Router::new().route("/out", post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let js = nats.jetstream().await;
    let mut rc: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    rc.options.heartbeat_ms = 200;
    let _rt = spawn_service("conv-runtime", |t| conv_runtime::run(rc, t));
    let ec: conv_effects::Config = Settings::for_test(nats.config(), free_addr());
    let _fx = spawn_service("conv-effects", |t| conv_effects::run(ec, t));
    let mut pc: conv_projections::Config = Settings::for_test(nats.config(), free_addr());
    pc.options.webhook_url = format!("http://127.0.0.1:{port}/out");
    let _pj = spawn_service("conv-projections", |t| conv_projections::run(pc, t));

    for c in ["o1", "o2"] {
        let e = Envelope::new(
            format!("{c}-m"),
            "/test",
            ConversationId::parse(c).expect("id"),
            MessageReceived { text: format!("hi from {c}"), role: None, channel: None, sender: None },
        );
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

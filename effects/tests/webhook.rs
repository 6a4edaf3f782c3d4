//! Webhook tools against a local HTTP server: inline and later answers,
//! HMAC signatures, retries, permanent failures and timeouts.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use conv_contracts::payload::*;
use conv_contracts::{Envelope, EventType, Payload};
use conv_effects::EffectsOptions;
use conv_effects::webhook::{WebhookTool, signature};
use serde_json::{Value, json};
use support::{count, message};

const CALLBACK_SECRET: &str = "webhook-test-callback-secret";

#[derive(Default)]
struct Hooks {
    calls: Mutex<HashMap<String, usize>>,
    bad_signatures: Mutex<usize>,
}

async fn hook(State(h): State<Arc<Hooks>>, Path(kind): Path<String>, headers: HeaderMap, body: String) -> Response {
    let n = {
        let mut c = h.calls.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(kind.clone()).or_default();
        *n += 1;
        *n
    };
    let sig = headers.get("x-conv-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    if sig != signature("s3cret", body.as_bytes()) {
        *h.bad_signatures.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    match kind.as_str() {
        "inline" => axum::Json(json!({"result": {
            "got": req["args"],
            "key": headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
            "token_header": headers.get("conv-callback-token").and_then(|v| v.to_str().ok()),
            "token_body": req["callback_token"],
        }}))
        .into_response(),
        "later" => StatusCode::ACCEPTED.into_response(),
        "flaky" if n <= 2 => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "flaky" => axum::Json(json!({"result": "third time lucky"})).into_response(),
        "broken" => (StatusCode::BAD_REQUEST, "no").into_response(),
        // A result larger than one journaled event (the test server takes 1 MiB).
        "huge" => axum::Json(json!({"result": "x".repeat(2 << 20)})).into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            axum::Json(json!({"result": "too late"})).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The runtime and effects with webhook tools pointed at a local server.
struct Stack {
    inner: support::Stack,
    hooks: Arc<Hooks>,
}

async fn start() -> Stack {
    let hooks = Arc::new(Hooks::default());
    let app = Router::new().route("/hooks/{kind}", post(hook)).with_state(hooks.clone());
    let addr = conv_nats::test_util::serve_local(app).await;
    let tool = |name: &str, timeout_ms: u64, retries: usize| WebhookTool {
        name: name.into(),
        url: format!("http://{addr}/hooks/{name}"),
        timeout_ms,
        retries,
        hmac_secret: Some("s3cret".into()),
        description: None,
        parameters: None,
    };
    let inner = support::Stack::start(EffectsOptions {
        tools: vec![
            tool("inline", 2000, 2),
            tool("later", 2000, 2),
            tool("flaky", 2000, 3),
            tool("broken", 2000, 3),
            tool("slow", 300, 1),
            tool("huge", 5000, 1),
        ],
        llm_retry_min_ms: 20,
        llm_retry_max_ms: 50,
        callback_secret: CALLBACK_SECRET.into(),
        ..Default::default()
    })
    .await;
    Stack { inner, hooks }
}

impl Stack {
    async fn send(&self, conv: &str, id: &str, data: impl Into<Payload>) {
        self.inner.send(conv, id, data).await;
    }

    async fn wait(&self, conv: &str, what: &str, pred: impl Fn(&[Envelope]) -> bool) -> Vec<Envelope> {
        self.inner.wait_for(conv, what, pred, Duration::from_secs(20)).await
    }

    fn calls(&self, kind: &str) -> usize {
        self.hooks.calls.lock().map(|c| c.get(kind).copied().unwrap_or(0)).unwrap_or(0)
    }
}

fn tool_result(i: &[Envelope]) -> Option<Payload> {
    i.iter()
        .find(|e| matches!(e.event_type(), EventType::ToolCompleted | EventType::ToolFailed))
        .map(|e| e.data().clone())
}

#[tokio::test]
async fn webhook_tools() {
    let s = start().await;
    // Inline answer, signed request, idempotency key.
    s.send("w1", "w1-m1", message(r#"/tool inline {"q": 1}"#)).await;
    let i = s.wait("w1", "the answer after the tool", |i| count(i, EventType::LlmCompleted) == 2).await;
    match tool_result(&i) {
        Some(Payload::ToolCompleted(t)) => {
            assert_eq!(t.result["got"], json!({"q": 1}));
            assert_eq!(t.result["key"], format!("w1.{}", t.tool_call_id));
            // The call carries the token that lets the webhook post this result later.
            let expected = conv_contracts::trust::callback_token(
                CALLBACK_SECRET.as_bytes(),
                &support::conv("w1"),
                conv_contracts::trust::CallbackTarget::Tool { tool_call_id: &t.tool_call_id },
            );
            assert_eq!(t.result["token_header"], expected);
            assert_eq!(t.result["token_body"], expected);
        }
        other => panic!("{other:?}"),
    }
    // Answered later through the callback (as ingress would journal it).
    s.send("w2", "w2-m1", message("/tool later {}")).await;
    let i = s.wait("w2", "the tool to start", |i| count(i, EventType::ToolStarted) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&i, EventType::ToolCompleted), 0, "no inline result");
    s.send("w2", "w2-cb", ToolCompleted { tool_call_id: "r1.s1.call1".into(), result: json!("done later") }).await;
    s.wait("w2", "the answer after the callback", |i| count(i, EventType::LlmCompleted) == 2).await;
    // 503 twice, then success.
    s.send("w3", "w3-m1", message("/tool flaky {}")).await;
    let i = s.wait("w3", "the tool result", |i| tool_result(i).is_some()).await;
    assert!(matches!(tool_result(&i), Some(Payload::ToolCompleted(t)) if t.result == json!("third time lucky")));
    assert_eq!(s.calls("flaky"), 3);
    // 400: fails at once.
    s.send("w4", "w4-m1", message("/tool broken {}")).await;
    let i = s.wait("w4", "the tool result", |i| tool_result(i).is_some()).await;
    assert!(matches!(tool_result(&i), Some(Payload::ToolFailed(f)) if !f.retryable && f.error.contains("400")));
    assert_eq!(s.calls("broken"), 1);
    // Slower than its timeout: retried, then failed.
    s.send("w5", "w5-m1", message("/tool slow {}")).await;
    let i = s.wait("w5", "the tool result", |i| tool_result(i).is_some()).await;
    assert!(
        matches!(tool_result(&i), Some(Payload::ToolFailed(f)) if f.retryable && f.error.contains("timed out")),
        "{:?}",
        tool_result(&i)
    );
    assert_eq!(s.calls("slow"), 2);
    // A result the journal cannot take: the call fails with that reason
    // (the run goes on), instead of being retried forever.
    s.send("w6", "w6-m1", message("/tool huge {}")).await;
    let i = s.wait("w6", "the tool result", |i| tool_result(i).is_some()).await;
    assert!(
        matches!(tool_result(&i), Some(Payload::ToolFailed(f)) if !f.retryable && f.error.contains("larger than the journal takes")),
        "{:?}",
        tool_result(&i)
    );
    assert_eq!(*s.hooks.bad_signatures.lock().expect("lock"), 0, "every request was signed correctly");
}

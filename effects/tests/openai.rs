//! The `openai` provider against a local HTTP server that speaks the OpenAI
//! Chat Completions streaming protocol (SSE `data:` events, `[DONE]`, tool
//! call deltas). The server is a test helper; the code under test is real.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use conv_contracts::payload::*;
use conv_contracts::{Envelope, EventType, Payload};
use conv_effects::EffectsOptions;
use serde_json::{Value, json};
use support::{count, first, message};

#[derive(Default)]
struct Provider {
    requests: Mutex<HashMap<String, usize>>,
    disconnected: AtomicBool,
}

/// Sets `disconnected` when a stream is dropped before it finished.
struct Guard {
    /// `None` once the stream finished normally.
    provider: Option<Arc<Provider>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = &self.provider {
            p.disconnected.store(true, Ordering::SeqCst);
        }
    }
}

fn sse(v: Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn text(t: &str) -> Bytes {
    sse(json!({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]}))
}

fn finish(reason: &str) -> Bytes {
    sse(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
}

/// A streamed body of `parts`, `gap` apart, then `[DONE]`.
fn stream(provider: Arc<Provider>, parts: Vec<Bytes>, gap: Duration, stall_after: Option<usize>) -> Response {
    let guard = Guard { provider: Some(provider) };
    let body = futures::stream::unfold(
        (parts.into_iter().enumerate(), guard, false),
        move |(mut parts, mut guard, done)| async move {
            if done {
                guard.provider.take();
                return None;
            }
            tokio::time::sleep(gap).await;
            match parts.next() {
                Some((i, p)) => {
                    if stall_after.is_some_and(|n| i >= n) {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Some((Ok::<_, Infallible>(p), (parts, guard, false)))
                }
                None => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), (parts, guard, true))),
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn completions(State(p): State<Arc<Provider>>, body: String) -> Response {
    let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert_eq!(req["stream"], true, "the client asks for a stream");
    let model = req["model"].as_str().unwrap_or("").to_owned();
    let n = {
        let mut r = p.requests.lock().unwrap_or_else(|e| e.into_inner());
        let n = r.entry(model.clone()).or_default();
        *n += 1;
        *n
    };
    let ms = Duration::from_millis(10);
    match model.as_str() {
        "stream" => {
            stream(p, vec![text("Hello"), text(" from"), text(" the"), text(" model"), finish("stop")], ms, None)
        }
        "tool" => {
            let tool_result = req["messages"].as_array().and_then(|m| m.iter().find(|m| m["role"] == "tool")).cloned();
            match tool_result {
                Some(t) => stream(
                    p,
                    vec![text("echo said "), text(t["content"].as_str().unwrap_or("")), finish("stop")],
                    ms,
                    None,
                ),
                None => stream(
                    p,
                    vec![
                        sse(
                            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "echo", "arguments": "{\"x\""}}]}}]}),
                        ),
                        sse(
                            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]}),
                        ),
                        finish("tool_calls"),
                    ],
                    ms,
                    None,
                ),
            }
        }
        "flaky" if n <= 2 => (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response(),
        "flaky" => stream(p, vec![text("finally"), finish("stop")], ms, None),
        "down" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "refused" => (StatusCode::BAD_REQUEST, "bad model").into_response(),
        "stall" => stream(p, vec![text("Hel"), text("lo")], ms, Some(1)),
        // Quiet for 300 ms between chunks: longer than the coalescing delay,
        // shorter than the stall timeout.
        "pause" => stream(p, vec![text("Hel"), text("lo")], Duration::from_millis(300), None),
        "slow" => stream(p, (0..100).map(|i| text(&format!("w{i} "))).collect(), Duration::from_millis(100), None),
        _ => (StatusCode::NOT_FOUND, "unknown model").into_response(),
    }
}

/// The runtime and effects with the `openai` provider pointed at a local
/// server that answers as `model` says.
struct Stack {
    inner: support::Stack,
    provider: Arc<Provider>,
}

async fn start(model: &str) -> Stack {
    let provider = Arc::new(Provider::default());
    let app = Router::new().route("/v1/chat/completions", post(completions)).with_state(provider.clone());
    let addr = conv_nats::test_util::serve_local(app).await;
    let inner = support::Stack::start(EffectsOptions {
        llm_provider: "openai".into(),
        llm_base_url: format!("http://{addr}/v1"),
        llm_model: model.into(),
        llm_max_retries: 2,
        llm_retry_min_ms: 20,
        llm_retry_max_ms: 100,
        llm_stall_timeout_ms: 500,
        coalesce_ms: 100,
        ..Default::default()
    })
    .await;
    Stack { inner, provider }
}

/// Starts a stack answering as `model`, sends `text` and waits until `n`
/// inputs of type `ty` are journaled.
async fn ask(model: &str, text: &str, ty: EventType, n: usize) -> (Stack, Vec<Envelope>) {
    let s = start(model).await;
    s.send("m1", message(text)).await;
    let i = s.wait(ty.as_str(), |i| count(i, ty) == n).await;
    (s, i)
}

impl Stack {
    async fn send(&self, id: &str, data: impl Into<Payload>) {
        self.inner.send("oa", id, data).await;
    }

    async fn wait(&self, what: &str, pred: impl Fn(&[Envelope]) -> bool) -> Vec<Envelope> {
        self.inner.wait_for("oa", what, pred, Duration::from_secs(20)).await
    }

    fn requests(&self, model: &str) -> usize {
        self.provider.requests.lock().map(|r| r.get(model).copied().unwrap_or(0)).unwrap_or(0)
    }
}

fn completed_text(i: &[Envelope]) -> Vec<String> {
    i.iter()
        .filter_map(|e| match e.data() {
            Payload::LlmCompleted(c) => Some(c.text.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_streamed_answer() {
    let (_s, i) = ask("stream", "hi", EventType::LlmCompleted, 1).await;
    assert_eq!(completed_text(&i), ["Hello from the model"]);
}

#[tokio::test]
async fn a_tool_call_round_trip() {
    let (_s, i) = ask("tool", "use a tool", EventType::LlmCompleted, 2).await;
    let tool = first!(i, ToolCompleted);
    assert_eq!(tool.map(|t| (t.tool_call_id, t.result)), Some(("call_1".to_owned(), json!({"x": 1}))));
    assert_eq!(completed_text(&i)[1], r#"echo said {"x":1}"#);
}

#[tokio::test]
async fn rate_limits_are_retried_until_success() {
    let (s, i) = ask("flaky", "hi", EventType::LlmCompleted, 1).await;
    assert_eq!(completed_text(&i), ["finally"]);
    assert_eq!(s.requests("flaky"), 3, "two 429s, then success");
    assert_eq!(count(&i, EventType::LlmFailed), 0);
}

#[tokio::test]
async fn server_errors_exhaust_the_retries_and_fail_the_step() {
    let (s, i) = ask("down", "hi", EventType::LlmFailed, 1).await;
    let failed = first!(i, LlmFailed);
    let failed = failed.expect("failed");
    assert!(failed.retryable && failed.error.contains("500"), "{failed:?}");
    assert_eq!(s.requests("down"), 3, "the first attempt and two retries");
}

#[tokio::test]
async fn client_errors_fail_at_once() {
    let (s, i) = ask("refused", "hi", EventType::LlmFailed, 1).await;
    assert!(i.iter().any(|e| matches!(e.data(), Payload::LlmFailed(f) if !f.retryable)));
    assert_eq!(s.requests("refused"), 1);
}

#[tokio::test]
async fn a_stalled_stream_times_out() {
    let (_s, i) = ask("stall", "hi", EventType::LlmFailed, 1).await;
    assert!(i.iter().any(|e| matches!(e.data(), Payload::LlmFailed(f) if f.error.contains("stalled"))));
}

#[tokio::test]
async fn text_is_journaled_when_due_while_the_provider_is_quiet() {
    let (_s, i) = ask("pause", "hi", EventType::LlmCompleted, 1).await;
    let deltas: Vec<&str> = i
        .iter()
        .filter_map(|e| match e.data() {
            Payload::LlmDelta(d) => Some(d.text.as_str()),
            _ => None,
        })
        .collect();
    // "Hel" is 100 ms old long before "lo" comes: it does not wait for it.
    assert_eq!(deltas.first(), Some(&"Hel"), "deltas: {deltas:?}");
    assert_eq!(completed_text(&i), ["Hello"]);
}

#[tokio::test]
async fn abort_mid_stream_closes_the_provider_connection() {
    let s = start("slow").await;
    s.send("m1", message("hi")).await;
    s.wait("first delta", |i| count(i, EventType::LlmDelta) >= 1).await;
    assert!(!s.provider.disconnected.load(Ordering::SeqCst));
    s.send("abort-1", AbortRequested { reason: None }).await;
    s.wait("canceled", |i| count(i, EventType::LlmCanceled) == 1).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.provider.disconnected.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.provider.disconnected.load(Ordering::SeqCst), "the server saw the client go away");
}

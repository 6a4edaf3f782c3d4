//! A slow, failing model provider for `convctl chaos --provider http`: a
//! local HTTP server that speaks the OpenAI Chat Completions streaming
//! protocol (`POST /v1/chat/completions`, SSE `data:` chunks, `[DONE]`), as
//! the effects service's `openai` provider calls it. On a seeded draw per
//! request it answers normally, slowly (late first byte, long gaps), with
//! 503 or 429 (which effects retries with backoff), drops the connection
//! mid-stream, or stalls past the effects stall timeout — the last two end
//! the step with a failure the user sees, and the chaos clients retry it as
//! a user would (`POST /retry`).
//!
//! The answer to the same context is the same text, so an answer resumed by
//! another effects instance after a crash continues where the journal left
//! off.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use serde_json::{Value, json};

use super::Rng;
use crate::Error;

/// The stall timeout the chaos run gives effects (`CONV_LLM_STALL_TIMEOUT_MS`)
/// with this provider; a stalled answer stays silent longer than this.
pub const STALL_TIMEOUT_MS: u64 = 3_000;

/// What the provider did, by kind of answer.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub requests: u64,
    /// Streamed in full at normal speed.
    pub normal: u64,
    /// Streamed in full, first byte after a second and three times the gaps.
    pub slow: u64,
    /// 503 before any byte of the answer.
    pub unavailable: u64,
    /// 429 with `Retry-After: 1`.
    pub throttled: u64,
    /// Connection dropped after half the answer.
    pub dropped: u64,
    /// Silent after half the answer for longer than the stall timeout.
    pub stalled: u64,
}

/// The provider's state: its draw and its counts.
pub struct Provider {
    rng: Mutex<Rng>,
    counts: Mutex<Counts>,
    tokens: usize,
    gap: Duration,
}

impl Provider {
    pub fn counts(&self) -> Counts {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Starts the provider on a free port (of every interface when `public`,
/// for containers; else of loopback): its base URL
/// (`http://127.0.0.1:port/v1`) and state. It runs until the process ends.
pub async fn start(seed: u64, tokens: usize, gap: Duration, public: bool) -> Result<(String, Arc<Provider>), Error> {
    let provider = Arc::new(Provider {
        rng: Mutex::new(Rng(seed ^ 0x5EED_0FC4_A0A0)),
        counts: Mutex::new(Counts::default()),
        tokens: tokens.max(2),
        gap,
    });
    let app = Router::new().route("/v1/chat/completions", post(complete)).with_state(provider.clone());
    let listener = tokio::net::TcpListener::bind(if public { "0.0.0.0:0" } else { "127.0.0.1:0" })
        .await
        .map_err(Error::io("cannot start the chaos provider"))?;
    let addr: SocketAddr = listener.local_addr().map_err(Error::io("cannot start the chaos provider"))?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(message = "The chaos provider stopped.", %error);
        }
    });
    Ok((format!("http://127.0.0.1:{}/v1", addr.port()), provider))
}

/// How one request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Slow,
    Unavailable,
    Throttled,
    Dropped,
    Stalled,
}

/// The seeded draw: mostly normal, a tenth refused, some slow, a few broken.
fn mode(draw: usize) -> Mode {
    match draw {
        0..=9 => Mode::Unavailable,
        10..=14 => Mode::Throttled,
        15..=29 => Mode::Slow,
        30..=32 => Mode::Dropped,
        33..=35 => Mode::Stalled,
        _ => Mode::Normal,
    }
}

/// The answer's words, the same for the same conversation so far.
fn words(body: &Value, n: usize) -> Vec<String> {
    let messages = body["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let seed = messages.iter().fold(0xCBF2_9CE4_8422_2325_u64, |h, m| {
        m["content"]
            .as_str()
            .unwrap_or_default()
            .bytes()
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3))
    });
    let mut rng = Rng(seed);
    (0..n).map(|_| format!("w{} ", rng.next() % 1000)).collect()
}

fn chunk(v: Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

async fn complete(State(p): State<Arc<Provider>>, body: axum::Json<Value>) -> Response {
    let draw = p.rng.lock().map(|mut r| r.below(100)).unwrap_or(99);
    let mode = mode(draw);
    if let Ok(mut c) = p.counts.lock() {
        c.requests += 1;
        match mode {
            Mode::Normal => c.normal += 1,
            Mode::Slow => c.slow += 1,
            Mode::Unavailable => c.unavailable += 1,
            Mode::Throttled => c.throttled += 1,
            Mode::Dropped => c.dropped += 1,
            Mode::Stalled => c.stalled += 1,
        }
    }
    let error = |status: StatusCode, message: &str| {
        (status, [("retry-after", "1")], axum::Json(json!({"error": {"message": message, "type": "chaos"}})))
            .into_response()
    };
    match mode {
        Mode::Unavailable => return error(StatusCode::SERVICE_UNAVAILABLE, "overloaded (chaos)"),
        Mode::Throttled => return error(StatusCode::TOO_MANY_REQUESTS, "rate limited (chaos)"),
        _ => {}
    }
    let words = words(&body, p.tokens);
    let half = words.len() / 2;
    let (first_byte, gap) = match mode {
        Mode::Slow => (Duration::from_secs(1), p.gap * 3),
        _ => (Duration::ZERO, p.gap),
    };
    let parts = words.into_iter().enumerate();
    let body = futures::stream::unfold((parts, false, first_byte), move |(mut parts, done, wait)| async move {
        if done {
            return None;
        }
        tokio::time::sleep(wait).await;
        let Some((i, word)) = parts.next() else {
            let end = format!(
                "{}data: [DONE]\n\n",
                String::from_utf8_lossy(&chunk(
                    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                ))
            );
            return Some((Ok::<_, std::io::Error>(Bytes::from(end)), (parts, true, Duration::ZERO)));
        };
        if i == half {
            match mode {
                Mode::Dropped => {
                    return Some((Err(std::io::Error::other("dropped (chaos)")), (parts, true, Duration::ZERO)));
                }
                Mode::Stalled => tokio::time::sleep(Duration::from_millis(STALL_TIMEOUT_MS * 2)).await,
                _ => {}
            }
        }
        let delta = chunk(json!({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]}));
        Some((Ok(delta), (parts, false, gap)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::payload::ContextMessage;
    use conv_effects::llm::LlmError;
    use conv_effects::scripted::Chunk;
    use futures::StreamExt;

    #[test]
    fn the_draw_covers_every_mode_in_its_share() {
        let count = |m: Mode| (0..100).filter(|d| mode(*d) == m).count();
        assert_eq!(
            [Mode::Unavailable, Mode::Throttled, Mode::Slow, Mode::Dropped, Mode::Stalled, Mode::Normal].map(count),
            [10, 5, 15, 3, 3, 64]
        );
    }

    /// Through the `openai` client effects uses: refusals are transient,
    /// full answers are the same text for the same context, a dropped one
    /// breaks with a transient error, a stalled one goes silent.
    #[tokio::test]
    async fn the_real_openai_client_sees_every_kind_of_answer() {
        let (url, provider) = start(3, 6, Duration::ZERO, false).await.expect("provider");
        let client =
            conv_effects::openai::OpenAi::new(&url, "chaos", "", Duration::from_secs(2), Vec::new()).expect("client");
        let context = vec![ContextMessage {
            role: "user".into(),
            content: "hello".into(),
            tool_call_id: None,
            tool_calls: Vec::new(),
        }];
        let (mut refused, mut full, mut broke, mut silent) = (0, Vec::new(), 0, 0);
        for _ in 0..200 {
            let mut chunks = match client.start(&context).await {
                Ok(c) => c,
                Err(e) => {
                    assert!(e.is_transient(), "{e}");
                    refused += 1;
                    continue;
                }
            };
            let mut text = String::new();
            loop {
                match tokio::time::timeout(Duration::from_millis(1_500), chunks.next()).await {
                    Err(_) => {
                        silent += 1;
                        break;
                    }
                    Ok(None) => {
                        full.push(text);
                        break;
                    }
                    Ok(Some(Ok(Chunk::Text(t)))) => text.push_str(&t),
                    Ok(Some(Ok(other))) => panic!("unexpected chunk {other:?}"),
                    Ok(Some(Err(e))) => {
                        assert!(matches!(e, LlmError::Transient(_)), "{e}");
                        assert_eq!(text.split_whitespace().count(), 3, "half the answer came first");
                        broke += 1;
                        break;
                    }
                }
            }
            if refused > 0 && full.len() > 1 && broke > 0 && silent > 0 {
                break;
            }
        }
        assert!(refused > 0 && broke > 0 && silent > 0, "refused {refused}, dropped {broke}, stalled {silent}");
        assert!(full.len() > 1, "answered in full {} times", full.len());
        assert!(full.windows(2).all(|w| w[0] == w[1]), "the same context, the same answer: {full:?}");
        assert_eq!(full[0].split_whitespace().count(), 6);
        let c = provider.counts();
        assert_eq!(c.requests, c.normal + c.slow + c.unavailable + c.throttled + c.dropped + c.stalled);
        assert_eq!(c.unavailable + c.throttled, refused);
    }
}

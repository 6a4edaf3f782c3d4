//! HTTP webhook tools, declared in config:
//!
//! ```toml
//! [[options.tools]]
//! name = "weather"
//! url = "https://tools.example/weather"
//! timeout_ms = 10000
//! retries = 2
//! hmac_secret = "s3cret"   # optional
//! description = "The weather at a place."                    # optional, for the model
//! parameters = { type = "object", properties = { place = { type = "string" } } }  # optional JSON schema
//! ```
//!
//! (or the same as JSON in `CONV_WEBHOOK_TOOLS`). A call is a `POST` of
//! `{"conversation_id", "tool_call_id", "name", "args", "callback_token"?}` with
//! `Idempotency-Key: <conversation>.<tool_call_id>`, with a secret
//! `X-Conv-Signature: sha256=<hex HMAC-SHA256 of the body>`, and with
//! `CONV_CALLBACK_SECRET` set the call's callback token (also as the
//! `Conv-Callback-Token` header). The webhook answers inline (`200` with
//! `{"result": ...}`, or any JSON taken as the result) or later (`202`, then
//! it posts the result to conv-ingress's
//! `/v1/conversations/{id}/tools/{tool_call_id}/completed|failed` with that
//! token as `Conv-Callback-Token`; ingress refuses it otherwise).
//! Connect errors, timeouts, 429 and 5xx are retried with backoff; other 4xx
//! fail the call at once.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

/// A declared webhook tool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTool {
    pub name: String,
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub retries: usize,
    #[serde(default)]
    pub hmac_secret: Option<conv_nats::secret::Secret>,
    /// What the tool does, as the model is told.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of the tool's arguments, as the model is told
    /// (default: any object).
    #[serde(default)]
    pub parameters: Option<Value>,
}

fn default_timeout() -> u64 {
    10_000
}

fn default_retries() -> usize {
    2
}

/// What a webhook answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The result, inline.
    Done(Value),
    /// Accepted; the result comes later through ingress.
    Later,
}

/// Why a webhook call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

/// `sha256=<hex>` of the body under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(), // HMAC takes keys of any length
    };
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!("sha256={}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// One attempt of the call `directive` asks for. The body names the
/// directive (`causation_id`, `correlation_id`): a tool that answers later
/// sends them back as `Causation-Id` / `Correlation-Id` headers, and its
/// outcome stays in the message's trace.
pub async fn call(
    client: &reqwest::Client,
    tool: &WebhookTool,
    directive: &conv_contracts::Envelope,
    tool_call_id: &str,
    args: &Value,
    callback_token: Option<&str>,
) -> Result<Answer, CallError> {
    let conversation = directive.conversation_id().as_str();
    let mut body = json!({
        "conversation_id": conversation,
        "tool_call_id": tool_call_id,
        "name": tool.name,
        "args": args,
        "causation_id": directive.id(),
        "correlation_id": directive.correlation_id().unwrap_or(directive.id()),
    });
    if let Some(token) = callback_token {
        body["callback_token"] = Value::String(token.to_owned());
    }
    let body = serde_json::to_vec(&body).map_err(|e| CallError::Permanent(format!("encoding the call: {e}")))?;
    let mut request = client
        .post(&tool.url)
        .timeout(Duration::from_millis(tool.timeout_ms))
        .header("content-type", "application/json")
        .header("idempotency-key", format!("{conversation}.{tool_call_id}"));
    if let Some(token) = callback_token {
        request = request.header(conv_contracts::trust::CALLBACK_TOKEN_HEADER, token);
    }
    if let Some(secret) = &tool.hmac_secret {
        request = request.header("x-conv-signature", signature(secret.expose(), &body));
    }
    let response = request.body(body).send().await.map_err(|e| {
        if e.is_timeout() {
            CallError::Transient(format!("webhook {} timed out after {} ms", tool.name, tool.timeout_ms))
        } else {
            // Without the URL: it may carry a token, and this text is
            // journaled, shown in the timeline and told to the model.
            CallError::Transient(format!("webhook {} unreachable: {}", tool.name, e.without_url()))
        }
    })?;
    let status = response.status();
    if status.as_u16() == 202 {
        return Ok(Answer::Later);
    }
    let text = response.text().await.map_err(|e| CallError::Transient(format!("reading the answer: {e}")))?;
    if status.is_success() {
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        return Ok(Answer::Done(value.get("result").cloned().unwrap_or(value)));
    }
    let detail = format!("webhook {} answered {status}: {}", tool.name, text.chars().take(300).collect::<String>());
    if status.as_u16() == 429 || status.is_server_error() {
        Err(CallError::Transient(detail))
    } else {
        Err(CallError::Permanent(detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! The `openai` provider: Chat Completions with `stream: true` over SSE,
//! tool calling included, against any OpenAI-compatible endpoint
//! (`CONV_LLM_BASE_URL`, `CONV_LLM_MODEL`, `CONV_LLM_API_KEY`). Dropping the
//! stream drops the HTTP connection: that is how a cancel stops the call.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use conv_contracts::payload::{ContextMessage, ToolCall};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::llm::{ChunkStream, LlmError};
use crate::scripted::Chunk;

#[derive(Debug, Clone)]
pub struct OpenAi {
    pub client: reqwest::Client,
    /// e.g. `https://api.openai.com/v1` (the `/chat/completions` path is appended).
    pub base_url: String,
    pub model: String,
    pub api_key: String,
    /// The tools offered to the model (Chat Completions `tools`).
    pub tools: Vec<Value>,
}

/// Every tool this instance can run, in the Chat Completions `tools` form:
/// the built-ins `echo` and `sleep`, the runtime's `timer`, and each
/// configured webhook tool with its description and argument schema.
pub fn tool_specs(webhooks: &[crate::webhook::WebhookTool]) -> Vec<Value> {
    let max = conv_contracts::payload::MAX_DELAY_MS;
    let function = |name: &str, description: &str, parameters: Value| json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}});
    let ms = json!({"type": "object", "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": max}}, "required": ["ms"]});
    let mut tools = vec![
        function("echo", "Returns its arguments.", json!({"type": "object"})),
        function("sleep", "Waits `ms` milliseconds (at most 24 hours), then returns.", ms.clone()),
        function(
            crate::TIMER_TOOL,
            "Schedules a timer: after `ms` milliseconds (at most 24 hours) the conversation is told it fired and you may act on it.",
            ms,
        ),
    ];
    for hook in webhooks {
        let description = hook.description.clone().unwrap_or_else(|| format!("The {} tool.", hook.name));
        let parameters = hook.parameters.clone().unwrap_or_else(|| json!({"type": "object"}));
        tools.push(function(&hook.name, &description, parameters));
    }
    tools
}

impl OpenAi {
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: &str,
        connect_timeout: Duration,
        tools: Vec<Value>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().connect_timeout(connect_timeout).build()?;
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            model: model.to_owned(),
            api_key: api_key.to_owned(),
            tools,
        })
    }

    /// The request body for a context.
    pub fn body(&self, context: &[ContextMessage]) -> Value {
        let messages: Vec<Value> = context
            .iter()
            .map(|m| {
                let mut v = json!({"role": m.role, "content": m.content});
                if let Some(id) = &m.tool_call_id {
                    v["tool_call_id"] = json!(id);
                }
                if !m.tool_calls.is_empty() {
                    v["tool_calls"] = m
                        .tool_calls
                        .iter()
                        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.args.to_string()}}))
                        .collect();
                }
                v
            })
            .collect();
        json!({
            "model": self.model,
            "stream": true,
            "messages": messages,
            "tools": self.tools,
        })
    }

    pub async fn start(&self, context: &[ContextMessage]) -> Result<ChunkStream, LlmError> {
        let mut request = self.client.post(format!("{}/chat/completions", self.base_url)).json(&self.body(context));
        if !self.api_key.is_empty() {
            request = request.bearer_auth(&self.api_key);
        }
        let response = request.send().await.map_err(|e| LlmError::Transient(format!("request failed: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let detail = format!("provider answered {status}: {}", body.chars().take(300).collect::<String>());
            return Err(if status.as_u16() == 429 || status.is_server_error() {
                LlmError::Transient(detail)
            } else {
                LlmError::Permanent(detail)
            });
        }
        Ok(Box::pin(parse_sse(response.bytes_stream())))
    }
}

struct Sse<S> {
    bytes: S,
    buffer: Vec<u8>,
    /// Tool calls being assembled, by index: (id, name, arguments so far).
    calls: BTreeMap<u64, (String, String, String)>,
    done: bool,
    pending: std::collections::VecDeque<Result<Chunk, LlmError>>,
}

/// Turns the SSE body into chunks: text deltas as they come, tool calls once
/// complete (at `finish_reason` or `[DONE]`).
pub fn parse_sse<S>(bytes: S) -> impl Stream<Item = Result<Chunk, LlmError>> + Send
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    let state = Sse { bytes, buffer: Vec::new(), calls: BTreeMap::new(), done: false, pending: Default::default() };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            // A complete line?
            if let Some(pos) = st.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = st.buffer.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line).trim().to_owned();
                let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    st.flush_calls();
                    st.done = true;
                    continue;
                }
                match serde_json::from_str::<Value>(data) {
                    Ok(v) => st.event(&v),
                    Err(e) => st.pending.push_back(Err(LlmError::Permanent(format!("malformed stream event: {e}")))),
                }
                continue;
            }
            match st.bytes.next().await {
                Some(Ok(b)) => st.buffer.extend_from_slice(&b),
                Some(Err(e)) => {
                    st.done = true;
                    st.pending.push_back(Err(LlmError::Transient(format!("stream broke: {e}"))));
                }
                None => {
                    st.flush_calls();
                    st.done = true;
                }
            }
        }
    })
}

impl<S> Sse<S> {
    fn event(&mut self, v: &Value) {
        let Some(choice) = v["choices"].get(0) else { return };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str()
            && !text.is_empty()
        {
            self.pending.push_back(Ok(Chunk::Text(text.to_owned())));
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for c in calls {
                let index = c["index"].as_u64().unwrap_or(0);
                let entry = self.calls.entry(index).or_default();
                if let Some(id) = c["id"].as_str() {
                    entry.0 = id.to_owned();
                }
                if let Some(name) = c["function"]["name"].as_str() {
                    entry.1.push_str(name);
                }
                if let Some(args) = c["function"]["arguments"].as_str() {
                    entry.2.push_str(args);
                }
            }
        }
        if choice["finish_reason"].as_str().is_some() {
            self.flush_calls();
        }
    }

    fn flush_calls(&mut self) {
        for (_, (id, name, args)) in std::mem::take(&mut self.calls) {
            let args = if args.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&args).unwrap_or(Value::String(args))
            };
            self.pending.push_back(Ok(Chunk::ToolCall(ToolCall { id, name, args })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::WebhookTool;

    #[test]
    fn the_model_is_offered_every_tool_with_its_schema() {
        let weather = WebhookTool {
            name: "weather".into(),
            url: "http://127.0.0.1:1/weather".into(),
            timeout_ms: 1000,
            retries: 0,
            hmac_secret: None,
            description: Some("The weather at a place.".into()),
            parameters: Some(json!({"type": "object", "properties": {"place": {"type": "string"}}})),
        };
        let o = OpenAi::new("http://x/v1", "m", "", Duration::from_secs(1), tool_specs(&[weather])).expect("client");
        let body = o.body(&[]);
        let tools = body["tools"].as_array().expect("tools");
        let names: Vec<&str> = tools.iter().filter_map(|t| t["function"]["name"].as_str()).collect();
        assert_eq!(names, ["echo", "sleep", "timer", "weather"]);
        assert_eq!(tools[3]["function"]["parameters"]["properties"]["place"]["type"], "string");
        assert_eq!(tools[3]["function"]["description"], "The weather at a place.");
        assert_eq!(
            tools[2]["function"]["parameters"]["properties"]["ms"]["maximum"],
            conv_contracts::payload::MAX_DELAY_MS
        );
    }
}

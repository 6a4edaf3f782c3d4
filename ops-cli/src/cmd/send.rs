//! `convctl send <conversation> <text>`: post a message through ingress and
//! print the reply as it streams in (from the projections' SSE stream);
//! exits when the run ends. With `--json` it prints, at the end, what
//! ingress answered and every event it saw on the stream (CloudEvents as
//! JSON, text deltas included).

use std::io::Write;
use std::time::{Duration, Instant};

use conv_contracts::EventType;
use serde_json::{Value, json};

use crate::cli::Global;
use crate::{Error, Outcome};

fn addr(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

pub async fn run(g: &Global, conversation: &str, text: &str, timeout: Duration) -> Result<Outcome, Error> {
    conv_contracts::ConversationId::parse(conversation)
        .map_err(|e| Error::Invalid(format!("conversation id {conversation:?}: {e}")))?;
    let ingress = addr("CONV_INGRESS_ADDR", "127.0.0.1:8080");
    let projections = addr("CONV_PROJECTIONS_ADDR", "127.0.0.1:8081");
    let http = reqwest::Client::new();
    // With client keys (CONV_INGRESS_API_KEYS on the services), ingress and
    // projections both want one.
    let key = std::env::var("CONV_API_KEY").ok().filter(|k| !k.is_empty());
    let authorized = |r: reqwest::RequestBuilder| match &key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let unreachable = |what: &str, a: &str, e: reqwest::Error| {
        Error::Invalid(format!("{what} does not answer at {a} ({e}); is the stack up (`convctl up`)?"))
    };

    // Where the conversation's output stands now: the reply starts after it.
    let timeline = authorized(http.get(format!("http://{projections}/v1/conversations/{conversation}/timeline")))
        .send()
        .await
        .map_err(|e| unreachable("conv-projections", &projections, e))?;
    let position = if timeline.status().is_success() {
        timeline.json::<Value>().await.ok().and_then(|t| t["position"].as_u64()).unwrap_or(0)
    } else {
        0
    };

    let post = authorized(http.post(format!("http://{ingress}/v1/conversations/{conversation}/messages")));
    let posted =
        post.json(&json!({"text": text})).send().await.map_err(|e| unreachable("conv-ingress", &ingress, e))?;
    if posted.status().as_u16() != 202 {
        let status = posted.status();
        let body: Value = posted.json().await.unwrap_or(Value::Null);
        return Err(Error::Invalid(format!("ingress answered {status}: {}", body["error"]["message"])));
    }
    let accepted: Value = posted.json().await.unwrap_or(Value::Null);
    let mut seen: Vec<Value> = Vec::new();
    let mut ours = false;

    let mut events = conv_client::EventStream::open(
        &http,
        &format!("http://{projections}"),
        conversation,
        Some(&position.to_string()),
        key.as_deref(),
    )
    .await
    .map_err(|e| Error::Invalid(format!("{e}; is the stack up (`convctl up`)?")))?;
    let mut out = std::io::stdout();
    let deadline = Instant::now() + timeout;
    let mut running = false;
    loop {
        let next = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .map_err(|_| Error::Invalid(format!("no end of the run within {}s", timeout.as_secs())))?;
        let Some(event) = next else {
            return Err(Error::Invalid("the stream closed before the run ended".into()));
        };
        let event = event.map_err(|e| Error::Invalid(e.to_string()))?;
        // The stored view may lag the stream: what comes before the first
        // output of our own message belongs to an earlier one.
        if !ours {
            if event.causation_id() != accepted["event_id"].as_str() {
                continue;
            }
            ours = true;
        }
        let d = event.data().clone();
        // The run ended: its status went to running and then to anything else.
        let ended = match (event.ty, d["status"].as_str()) {
            (EventType::OutRunStatus, Some("running")) => {
                running = true;
                None
            }
            (EventType::OutRunStatus, Some(status)) if running => Some(status.to_owned()),
            _ => None,
        };
        if g.json {
            seen.push(event.raw);
            if let Some(status) = ended {
                let code = u8::from(status == "failed");
                let report = json!({"accepted": accepted, "run_status": status, "events": seen});
                return Ok(Outcome { output: crate::to_json(&report), code });
            }
            continue;
        }
        match event.ty {
            EventType::OutMessageDelta => {
                let _ = write!(out, "{}", d["text"].as_str().unwrap_or(""));
                let _ = out.flush();
            }
            EventType::OutToolCalled => {
                let _ = writeln!(out, "\n[tool {} {}]", d["name"].as_str().unwrap_or("?"), d["args"]);
            }
            EventType::OutToolResult => {
                let _ = writeln!(out, "[{} → {}]", d["outcome"].as_str().unwrap_or("?"), d["result"]);
            }
            EventType::OutMessageAppended if d["role"] == "system" && d["status"] == "failed" => {
                let _ = writeln!(out, "\n{}", d["text"].as_str().unwrap_or(""));
            }
            _ => {}
        }
        if let Some(status) = ended {
            let _ = writeln!(out);
            let code = u8::from(status == "failed");
            let output = if status == "idle" { String::new() } else { format!("(run {status})") };
            return Ok(Outcome { output, code });
        }
    }
}

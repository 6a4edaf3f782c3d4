//! `convctl send <conversation> <text>`: post a message through ingress and
//! print the reply as it streams in (from the projections' SSE stream);
//! exits when the run ends. With `--json` it prints, at the end, what
//! ingress answered and every event it saw on the stream (CloudEvents as
//! JSON, text deltas included).

use std::io::Write;
use std::time::{Duration, Instant};

use futures::StreamExt;
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

    let stream = authorized(http.get(format!("http://{projections}/v1/conversations/{conversation}/stream")))
        .header("Last-Event-ID", position.to_string())
        .send()
        .await
        .map_err(|e| unreachable("conv-projections", &projections, e))?;
    let mut body = stream.bytes_stream();
    let mut buf = String::new();
    let mut out = std::io::stdout();
    let deadline = Instant::now() + timeout;
    let mut running = false;
    loop {
        let chunk = tokio::time::timeout_at(deadline.into(), body.next())
            .await
            .map_err(|_| Error::Invalid(format!("no end of the run within {}s", timeout.as_secs())))?;
        let Some(chunk) = chunk else {
            return Err(Error::Invalid("the stream closed before the run ended".into()));
        };
        let chunk = chunk.map_err(|e| Error::Invalid(format!("stream broke: {e}")))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let block: String = buf.drain(..pos + 2).collect();
            let data: String = block.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            let Ok(event) = serde_json::from_str::<Value>(&data) else { continue };
            // The stored view may lag the stream: what comes before the first
            // output of our own message belongs to an earlier one.
            if !ours {
                if event["causationid"] != accepted["event_id"] {
                    continue;
                }
                ours = true;
            }
            if g.json {
                let status = (event["type"] == "conv.out.run.status_changed").then(|| event["data"]["status"].clone());
                seen.push(event);
                match status.as_ref().and_then(Value::as_str) {
                    Some("running") => running = true,
                    Some(status) if running => {
                        let code = u8::from(status == "failed");
                        let report = json!({"accepted": accepted, "run_status": status, "events": seen});
                        return Ok(Outcome { output: crate::to_json(&report), code });
                    }
                    _ => {}
                }
                continue;
            }
            let d = &event["data"];
            match event["type"].as_str().unwrap_or("") {
                "conv.out.message.delta" => {
                    let _ = write!(out, "{}", d["text"].as_str().unwrap_or(""));
                    let _ = out.flush();
                }
                "conv.out.tool.called" => {
                    let _ = writeln!(out, "\n[tool {} {}]", d["name"].as_str().unwrap_or("?"), d["args"]);
                }
                "conv.out.tool.result" => {
                    let _ = writeln!(out, "[{} → {}]", d["outcome"].as_str().unwrap_or("?"), d["result"]);
                }
                "conv.out.run.status_changed" => {
                    let status = d["status"].as_str().unwrap_or("");
                    if status == "running" {
                        running = true;
                    } else if running {
                        let _ = writeln!(out);
                        let code = u8::from(status == "failed");
                        let output = if status == "idle" { String::new() } else { format!("(run {status})") };
                        return Ok(Outcome { output, code });
                    }
                }
                "conv.out.message.appended" if d["role"] == "system" && d["status"] == "failed" => {
                    let _ = writeln!(out, "\n{}", d["text"].as_str().unwrap_or(""));
                }
                _ => {}
            }
        }
    }
}

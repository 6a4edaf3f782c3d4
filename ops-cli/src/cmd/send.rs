//! `convctl send <conversation> <text>`: post a message through ingress and
//! print the reply as it streams in (from the projections' SSE stream);
//! exits when the run ends. With `--json` it prints, at the end, what
//! ingress answered and every event it saw on the stream (CloudEvents as
//! JSON, text deltas included).

use std::io::Write;
use std::time::{Duration, Instant};

use conv_contracts::EventType;
use conv_contracts::api::{Accepted, ErrorBody, Timeline};
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
    let unreachable = |what: &'static str, a: &str| {
        let a = a.to_owned();
        move |e: reqwest::Error| {
            Error::Failed(format!("{what} does not answer at {a} ({e}); is the stack up (`convctl up`)?"))
        }
    };

    // Where the conversation's output stands now: the reply starts after it.
    let timeline = authorized(http.get(format!("http://{projections}/v1/conversations/{conversation}/timeline")))
        .send()
        .await
        .map_err(unreachable("conv-projections", &projections))?;
    let position = match timeline.status().as_u16() {
        200 => timeline.json::<Timeline>().await.map_err(Error::http("the timeline"))?.position,
        404 => 0,
        _ => return Err(refused("conv-projections", timeline).await),
    };

    let post = authorized(http.post(format!("http://{ingress}/v1/conversations/{conversation}/messages")));
    let posted = post.json(&json!({"text": text})).send().await.map_err(unreachable("conv-ingress", &ingress))?;
    if posted.status().as_u16() != 202 {
        return Err(refused("conv-ingress", posted).await);
    }
    let accepted: Accepted = posted.json().await.map_err(Error::http("ingress's answer"))?;
    let mut seen: Vec<Value> = Vec::new();
    let mut ours = false;

    let base = format!("http://{projections}");
    let mut events =
        conv_client::EventStream::open(&http, &base, conversation, Some(&position.to_string()), key.as_deref())
            .await
            .map_err(stream_failed)?;
    let mut out = std::io::stdout();
    let mut text = conv_client::Text::default();
    let deadline = Instant::now() + timeout;
    let mut running = false;
    loop {
        let next = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .map_err(|_| Error::Failed(format!("no end of the run within {}s", timeout.as_secs())))?;
        let event = match next {
            None => return Err(Error::Failed("the stream closed before the run ended".into())),
            Some(Err(conv_client::Error::Closed(why))) => {
                // The server let this reader go (it fell behind): resume
                // after the last event read.
                eprintln!("[convctl] {}; resuming", why.message);
                events.reconnect().await.map_err(stream_failed)?;
                continue;
            }
            Some(Err(e)) => return Err(stream_failed(e)),
            Some(Ok(event)) => event,
        };
        // The stored view may lag the stream: what comes before the first
        // output of our own message belongs to an earlier one.
        if !ours {
            if event.causation_id() != Some(accepted.event_id.as_str()) {
                continue;
            }
            ours = true;
        }
        let d = event.data().clone();
        // The run ended: its status went to running and then to anything else.
        let ended = match (event.ty, d["status"].as_str()) {
            (Some(EventType::OutRunStatus), Some("running")) => {
                running = true;
                None
            }
            (Some(EventType::OutRunStatus), Some(status)) if running => Some(status.to_owned()),
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
        // What the terminal shows; a failed write to stdout (a closed pipe)
        // does not stop the run from being followed to its end.
        let shown = match event.ty {
            Some(EventType::OutMessageDelta) => {
                text.apply(&event);
                write!(out, "{}", d["text"].as_str().unwrap_or(""))
            }
            Some(EventType::OutMessageReset) => {
                // The model's answer differs from what was streamed (an
                // effects worker took over): show the entry again from the cut.
                let entry = text.apply(&event).unwrap_or_default().to_owned();
                write!(out, "\n[the reply restarts]\n{}", text.of_entry(&entry))
            }
            Some(EventType::OutToolCalled) => {
                writeln!(out, "\n[tool {} {}]", d["name"].as_str().unwrap_or("?"), d["args"])
            }
            Some(EventType::OutToolResult) => {
                writeln!(out, "[{} → {}]", d["outcome"].as_str().unwrap_or("?"), d["result"])
            }
            Some(EventType::OutMessageAppended) if d["role"] == "system" && d["status"] == "failed" => {
                writeln!(out, "\n{}", d["text"].as_str().unwrap_or(""))
            }
            _ => Ok(()),
        };
        if shown.and_then(|()| out.flush()).is_err() {
            tracing::debug!("stdout is closed");
        }
        if let Some(status) = ended {
            let _ = writeln!(out);
            let code = u8::from(status == "failed");
            let output = if status == "idle" { String::new() } else { format!("(run {status})") };
            return Ok(Outcome { output, code });
        }
    }
}

/// A service's refusal: its status and the message of its error body.
async fn refused(service: &str, response: reqwest::Response) -> Error {
    let status = response.status();
    let message = match response.json::<ErrorBody>().await {
        Ok(body) => body.error.message,
        Err(_) => "no error body".to_owned(),
    };
    Error::Failed(format!("{service} answered {status}: {message}"))
}

/// A stream that could not be opened or read; only a service that does not
/// answer gets the hint to start the stack.
fn stream_failed(e: conv_client::Error) -> Error {
    match e {
        conv_client::Error::Unreachable { .. } => Error::Failed(format!("{e}; is the stack up (`convctl up`)?")),
        other => Error::http("the stream")(other),
    }
}

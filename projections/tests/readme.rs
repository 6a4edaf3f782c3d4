//! The README's `curl` examples work as written: the blocks under "Sending
//! events" and "Reading a conversation" run, command by command, against a
//! stack (the README's `localhost:8080` / `localhost:8081` pointed at its
//! ingress and projections), and every request must succeed (2xx; the
//! stream is cut off after a moment, having sent events) with the body the
//! README's comments describe.

mod support;

use std::time::Duration;

use conv_contracts::ConversationId;
use conv_contracts::api::{Accepted, Timeline};
use conv_contracts::trust::{CallbackTarget, callback_token};
use serde_json::Value;

const README: &str = include_str!("../../README.md");
const SECRET: &str = "readme-callback-secret-0123456789";

/// The shell commands of the first ```sh block after `heading`, with their
/// continuation lines joined and comments dropped.
fn commands(heading: &str) -> Vec<String> {
    let section = README.split(heading).nth(1).unwrap_or_else(|| panic!("README has no {heading:?}"));
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        // A trailing comment is not part of the command.
        let code = match line.find("   #") {
            Some(at) => line[..at].trim_end(),
            None => line,
        };
        match code.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(code);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_readme_curl_examples_work_as_written() {
    let sending = commands("### Sending events");
    let reading = commands("### Reading a conversation");
    assert!(sending.len() >= 7 && reading.len() == 3, "{sending:#?} {reading:#?}");

    let pipeline = support::Pipeline::start(|c| {
        c.ingress.options.callback_secret = conv_nats::secret::Secret::new(SECRET);
        c.effects.options.callback_secret = conv_nats::secret::Secret::new(SECRET);
    })
    .await;
    let demo = ConversationId::parse("demo").expect("id");
    let token = |target| callback_token(SECRET.as_bytes(), &demo, target);
    let env = [
        ("TOKEN", token(CallbackTarget::Tool { tool_call_id: "call_1" })),
        ("TIMER_TOKEN", token(CallbackTarget::Timer { timer_id: "t1" })),
    ];
    let views = format!("http://{}/v1/conversations/demo/timeline", pipeline.projections);
    let mut commands: Vec<(&String, bool)> = sending.iter().map(|c| (c, false)).collect();
    commands.extend(reading.iter().map(|c| (c, true)));
    let mut first_message: Option<Accepted> = None;
    for (command, reads) in commands {
        // What was sent is read once its view is stored.
        if reads {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while pipeline.http.get(&views).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
                assert!(std::time::Instant::now() < deadline, "no view of demo");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(command.starts_with("curl "), "{command}");
        let stream = command.starts_with("curl -N");
        // Exactly the README's request, pointed at this stack (no ~/.curlrc);
        // curl says the status; a stream is cut off after 3 s.
        let max_time = if stream { 3 } else { 30 };
        let run = command
            .replace("localhost:8080", &pipeline.ingress.to_string())
            .replace("localhost:8081", &pipeline.projections.to_string())
            .replacen("curl ", &format!("curl -q -sS --max-time {max_time} -w '\\n%{{http_code}}' "), 1);
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("sh").arg("-c").arg(&run).envs(env.clone()).kill_on_drop(true).output(),
        )
        .await
        .expect("curl returns")
        .expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        assert!(status.starts_with('2'), "{command}\n→ {status}: {text}{}", String::from_utf8_lossy(&output.stderr));
        if stream {
            // Cut off by --max-time (exit 28), having streamed the output.
            assert_eq!(output.status.code(), Some(28), "{command}: {text}");
            assert!(text.contains("data: "), "{command}: {text}");
            continue;
        }
        assert!(output.status.success(), "{command}: {text}");
        // The bodies the README's comments describe.
        if command.contains("Idempotency-Key: m-1") {
            let accepted: Accepted = serde_json::from_str(body).unwrap_or_else(|e| panic!("{command}: {e}: {body}"));
            match &first_message {
                None => {
                    assert!(!accepted.duplicate, "{body}");
                    first_message = Some(accepted);
                }
                Some(first) => {
                    assert!(accepted.duplicate, "the same key again is a duplicate: {body}");
                    assert_eq!((accepted.stream_seq, &accepted.event_id), (first.stream_seq, &first.event_id));
                }
            }
        } else if command.contains("/timeline") {
            let t: Timeline = serde_json::from_str(body).unwrap_or_else(|e| panic!("{command}: {e}: {body}"));
            assert!(t.conversation_id == "demo" && !t.entries.is_empty() && t.position > 0, "{body}");
        } else if command.contains("/context") {
            let c: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{command}: {e}: {body}"));
            assert!(c["conversation_id"] == "demo" && c["version"].as_u64() > Some(0), "{body}");
            assert!(c["messages"][0]["role"].is_string() && c["messages"][0]["content"].is_string(), "{body}");
        } else if command.contains("-XPOST") {
            let accepted: Result<Accepted, _> = serde_json::from_str(body);
            assert!(accepted.is_ok(), "{command}: a 202 body: {body}");
        }
    }
    assert!(first_message.is_some(), "the README sends a message with an Idempotency-Key");
    pipeline.shutdown().await;
}

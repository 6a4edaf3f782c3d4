//! The README's `curl` examples work as written: the blocks under "Sending
//! events" and "Reading a conversation" run, command by command, against a
//! stack (the README's `localhost:8080` / `localhost:8081` pointed at its
//! ingress and projections), and every request must succeed (2xx; the
//! stream is cut off after a moment, having sent events).

mod support;

use std::time::Duration;

use conv_contracts::ConversationId;
use conv_contracts::trust::{CallbackTarget, callback_token};

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
        // Exactly the README's request, pointed at this stack; curl says
        // the status and fails on an error.
        let run = command
            .replace("localhost:8080", &pipeline.ingress.to_string())
            .replace("localhost:8081", &pipeline.projections.to_string())
            .replacen("curl ", "curl -sS --max-time 3 -w '\\n%{http_code}' ", 1);
        let output = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new("sh").arg("-c").arg(&run).envs(env.clone()).output(),
        )
        .await
        .expect("curl returns")
        .expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let status = text.lines().last().unwrap_or_default();
        assert!(status.starts_with('2'), "{command}\n→ {status}: {text}{}", String::from_utf8_lossy(&output.stderr));
        if stream {
            // Cut off by --max-time (exit 28), having streamed the output.
            assert_eq!(output.status.code(), Some(28), "{command}: {text}");
            assert!(text.contains("data: "), "{command}: {text}");
        } else {
            assert!(output.status.success(), "{command}: {text}");
        }
    }
    pipeline.shutdown().await;
}

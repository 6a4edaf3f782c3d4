//! End to end through HTTP: ingress → runtime → effects → projections.
//! A prompt gets a streamed reply and a completed timeline entry; abort and
//! stop end runs with the partial text kept; a tool round trip; the SSE
//! stream resumes exactly after `Last-Event-ID`; replay matches live state.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use conv_client::{Event, EventStream, Text};
use conv_contracts::{ConversationId, EventType};
use conv_nats::service::Settings;
use conv_nats::test_util::{TestNats, free_addr, spawn_service, wait_http_ok};
use serde_json::{Value, json};

struct Stack {
    ingress: SocketAddr,
    projections: SocketAddr,
    http: reqwest::Client,
    pipeline: support::Pipeline,
}

async fn start() -> Stack {
    let pipeline = support::Pipeline::start(|c| {
        c.effects.options.scripted_tokens = 60;
        c.effects.options.scripted_token_delay_ms = 25;
        // Journal a chunk every 200 ms, so the timeline shows streamed text.
        c.effects.options.coalesce_ms = 200;
    })
    .await;
    Stack { ingress: pipeline.ingress, projections: pipeline.projections, http: reqwest::Client::new(), pipeline }
}

impl Stack {
    async fn post(&self, conv: &str, what: &str, body: Value) -> Value {
        let (status, answer) = self.pipeline.post(conv, what, &body).await;
        assert_eq!(status, 202, "{answer}");
        answer
    }

    async fn get(&self, conv: &str, what: &str) -> (u16, Value) {
        self.pipeline.get(conv, what).await
    }

    async fn timeline_until(&self, conv: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, t) = self.get(conv, "timeline").await;
            if status == 200 && done(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads a conversation's SSE stream (after `last_event_id`) until
    /// `done` holds for what arrived, with a deadline.
    async fn sse_until(&self, conv: &str, last_event_id: Option<&str>, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let base = format!("http://{}", self.projections);
        let mut stream = EventStream::open(&self.http, &base, conv, last_event_id, None).await.expect("stream");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(&out) {
            let event = tokio::time::timeout_at(deadline.into(), stream.next())
                .await
                .unwrap_or_else(|_| panic!("stream of {conv}: condition not met in time; got {out:?}"))
                .expect("open")
                .expect("an event");
            out.push(event);
        }
        out
    }
}

fn run_ended(events: &[Event]) -> bool {
    events.iter().any(|e| e.is(EventType::OutRunStatus) && e.data()["status"] != "running")
}

fn last_assistant(t: &Value) -> Value {
    t["entries"]
        .as_array()
        .and_then(|e| e.iter().rev().find(|e| e["role"] == "assistant").cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_whole_pipeline_over_http() {
    let s = start().await;
    assert_eq!(s.get("nobody", "timeline").await.0, 404);

    // A prompt: streamed reply, completed entry.
    s.post("p1", "messages", json!({"text": "hello"})).await;
    let t = s
        .timeline_until("p1", "the completed reply", |t| {
            t["run_status"] == "idle" && last_assistant(t)["status"] == "completed"
        })
        .await;
    assert_eq!(t["entries"][0]["role"], "user");
    assert!(last_assistant(&t)["text"].as_str().is_some_and(|x| x.starts_with("You said: hello.")), "{t}");
    let (status, ctx) = s.get("p1", "context").await;
    assert_eq!(status, 200);
    assert_eq!(ctx["messages"][0], json!({"role": "user", "content": "hello"}));
    assert_eq!(ctx["messages"][1]["role"], "assistant");

    // The SSE stream from the start, then resumed after the 3rd event.
    let stream =
        s.http.get(format!("http://{}/v1/conversations/p1/stream", s.projections)).send().await.expect("stream");
    assert_eq!(stream.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    drop(stream);
    let all = s.sse_until("p1", None, run_ended).await;
    assert!(all[0].is(EventType::OutMessageAppended), "{all:?}");
    let positions: Vec<u64> = all.iter().filter_map(|e| e.id.as_deref()?.parse::<u64>().ok()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in order: {all:?}");
    let final_text = last_assistant(&t)["text"].as_str().unwrap_or("").to_owned();
    assert_eq!(Text::of(&all), final_text, "the deltas joined are the final text");
    let resumed = s.sse_until("p1", all[2].id.as_deref(), run_ended).await;
    assert_eq!(resumed, all[3..].to_vec(), "exactly the events after Last-Event-ID");

    // Abort mid-reply: run aborted, partial text kept, nothing after.
    s.post("p2", "messages", json!({"text": "a long one"})).await;
    s.timeline_until("p2", "some streamed text", |t| last_assistant(t)["text"].as_str().is_some_and(|x| x.len() > 10))
        .await;
    s.post("p2", "abort", json!({})).await;
    let t = s.timeline_until("p2", "the abort", |t| t["run_status"] == "aborted").await;
    let partial = last_assistant(&t);
    assert_eq!(partial["status"], "aborted");
    assert!(partial["text"].as_str().is_some_and(|x| !x.is_empty() && x.split_whitespace().count() < 60));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, later) = s.get("p2", "timeline").await;
    assert_eq!(last_assistant(&later)["text"], partial["text"], "no delta after the abort");

    // Stop: run stopped.
    s.post("p3", "messages", json!({"text": "another"})).await;
    s.timeline_until("p3", "streaming", |t| last_assistant(t)["status"] == "streaming").await;
    s.post("p3", "stop", json!({})).await;
    let t = s.timeline_until("p3", "the stop", |t| t["run_status"] == "stopped").await;
    assert_eq!(last_assistant(&t)["status"], "stopped");

    // A tool round trip.
    s.post("p4", "messages", json!({"text": "/tool echo {\"ping\": true}"})).await;
    let t = s
        .timeline_until("p4", "the answer after the tool", |t| {
            t["run_status"] == "idle"
                && last_assistant(t)["text"].as_str().is_some_and(|x| x.starts_with("echo returned"))
        })
        .await;
    assert!(
        t["entries"].as_array().is_some_and(|e| e.iter().any(|e| e["role"] == "tool" && e["status"] == "completed")),
        "{t}"
    );

    // A lost view is rebuilt from CONV_OUT alone, identical.
    let (_, before) = s.get("p4", "timeline").await;
    let js0 = s.pipeline.nats.jetstream().await;
    let bucket = js0.get_key_value(conv_nats::topology::KV_PROJECTIONS).await.expect("bucket");
    bucket.purge("p4").await.expect("purge");
    assert_eq!(s.get("p4", "timeline").await.0, 404);
    let (view, events) =
        conv_store::views::rebuild(&js0, &ConversationId::parse("p4").expect("id")).await.expect("rebuild");
    assert!(events > 0);
    assert_eq!(serde_json::to_value(&view).expect("json"), before);
    assert_eq!(s.get("p4", "timeline").await.1, before);

    // Replay of every conversation matches the live state.
    let js = s.pipeline.nats.jetstream().await;
    for c in ["p1", "p2", "p3", "p4"] {
        let conv = ConversationId::parse(c).expect("id");
        let replay = conv_store::journal::rebuild(&js, &conv, None).await.expect("replay");
        assert!(replay.mismatches.is_empty(), "{c}");
        assert_eq!(replay.recorded_hash.as_deref(), Some(replay.snapshot.state.hash().as_str()), "{c}");
    }
}

#[tokio::test]
async fn an_id_squatted_in_another_conversation_does_not_stop_the_victims_reply() {
    let s = start().await;
    // The ids the victim's first step will journal, taken first by events
    // of another conversation (ids a client may choose there).
    let squatted = ["victim.llm.r1.s1.1.started", "victim.llm.r1.s1.1.completed", "victim.tool.r1.s1.call1.completed"];
    for id in squatted {
        let ce = json!({"specversion": "1.0", "id": id, "source": "/attacker", "type": "conv.in.message.received",
                        "subject": "attacker", "data": {"text": "squat"}});
        let r = s
            .http
            .post(format!("http://{}/v1/events", s.ingress))
            .header("content-type", "application/cloudevents+json")
            .body(ce.to_string())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 202, "{id}");
    }
    s.post("victim", "messages", json!({"text": "hello"})).await;
    let t = s
        .timeline_until("victim", "the victim's completed reply", |t| {
            t["run_status"] == "idle" && last_assistant(t)["status"] == "completed"
        })
        .await;
    assert!(last_assistant(&t)["text"].as_str().is_some_and(|x| x.starts_with("You said: hello.")), "{t}");
    // The squatted id really is the victim's completion.
    let js = s.pipeline.nats.jetstream().await;
    let victim = ConversationId::parse("victim").expect("id");
    let journal = conv_nats::read::all(&js, "CONV_IN", &conv_contracts::subject::in_conversation_filter(&victim), true)
        .await
        .expect("read");
    assert!(
        journal.iter().any(|m| m.header("ce-id") == Some("victim.llm.r1.s1.1.completed")),
        "the victim's completion is journaled under the squatted id"
    );
}

#[tokio::test]
async fn reading_a_conversation_takes_a_client_key_that_covers_it() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let addr = free_addr();
    let (key, team) = ("reader-key-0123456789", "team-key-0123456789ab");
    let mut pc: conv_projections::Config = Settings::for_test(nats.config(), addr);
    pc.options.api_keys = format!("{key},{team}:team-a-").as_str().into();
    let _projections = spawn_service("conv-projections", |t| conv_projections::run(pc, t));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    let http = reqwest::Client::new();
    let get = |conv: &str, what: &str| http.get(format!("http://{addr}/v1/conversations/{conv}/{what}"));
    for what in ["timeline", "context", "stream"] {
        let r = get("c1", what).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 401, "{what} without a key");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized");
        let r = get("team-b-1", what).bearer_auth(team).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 403, "{what} with a key for other conversations");
    }
    // A covering key gets through (to a 404: nothing was said there yet).
    assert_eq!(get("c1", "timeline").bearer_auth(key).send().await.expect("get").status().as_u16(), 404);
    assert_eq!(get("team-a-1", "timeline").bearer_auth(team).send().await.expect("get").status().as_u16(), 404);
    // Health stays open.
    assert_eq!(http.get(format!("http://{addr}/healthz")).send().await.expect("get").status().as_u16(), 200);

    // Without keys it does not serve conversations on a public address.
    let mut open: conv_projections::Config = Settings::for_test(nats.config(), "0.0.0.0:0".parse().expect("addr"));
    open.options.api_keys = "".into();
    let err = conv_projections::run(open, tokio_util::sync::CancellationToken::new()).await.expect_err("refused");
    assert!(err.to_string().contains("CONV_INGRESS_API_KEYS"), "{err}");
}

//! Effects with the runtime, end to end over a real JetStream: a streamed
//! scripted reply, a tool round trip, and aborts that stop a sleeping tool
//! and a long stream promptly with nothing emitted after.

use std::time::{Duration, Instant};

mod support;

use conv_contracts::payload::*;
use conv_contracts::{Envelope, EventType};
use conv_effects::EffectsOptions;
use futures::StreamExt;
use support::{Stack, conv, count, first, message};

fn types(inputs: &[Envelope]) -> Vec<&'static str> {
    inputs.iter().map(|e| e.event_type().as_str()).collect()
}

#[tokio::test]
async fn a_message_gets_a_streamed_coalesced_reply() {
    let s = Stack::start(EffectsOptions { coalesce_ms: 100, ..EffectsOptions::default() }).await;
    // The live lane: every piece of text at once, on core NATS.
    let mut live =
        s.nats.client().await.subscribe(conv_contracts::subject::live_subject(&conv("e1"))).await.expect("sub");
    s.send("e1", "m1", message("hi there")).await;
    let inputs =
        s.wait_for("e1", "the completion", |i| count(i, EventType::LlmCompleted) == 1, Duration::from_secs(20)).await;
    // The durable lane: a few coalesced chunks, then the completion.
    let deltas = count(&inputs, EventType::LlmDelta);
    assert!((1..24).contains(&deltas), "24 tokens coalesced into a handful of deltas, got {deltas}");
    let completed = first!(inputs, LlmCompleted).map(|p| p.text).expect("completed");
    let chunks: String = inputs
        .iter()
        .filter_map(|e| match e.data() {
            conv_contracts::Payload::LlmDelta(d) => Some(d.text.clone()),
            _ => None,
        })
        .collect();
    assert!(completed.starts_with(&chunks), "the chunks are the start of the answer");
    let mut pieces = Vec::new();
    while pieces.len() < 24 {
        let m = tokio::time::timeout(Duration::from_secs(5), live.next()).await.expect("live").expect("open");
        pieces.push(conv_contracts::live::LiveDelta::from_bytes(&m.payload).expect("a live delta"));
    }
    let mut offset = 0;
    for p in &pieces {
        assert_eq!(p.offset, offset, "live pieces are contiguous");
        offset += p.text.len() as u64;
    }
    let live_text: String = pieces.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(live_text, completed, "the live pieces joined are the final text, byte for byte");
    // Applied: the assistant entry is complete and the run idle.
    let state = s.state_when("e1", "an idle run", |st| st.run_status == RunStatus::Idle, Duration::from_secs(10)).await;
    let answer = state.entries.last().expect("entry");
    assert_eq!(answer.status, EntryStatus::Completed);
    assert!(answer.text.starts_with("You said: hi there."), "{}", answer.text);
    assert_eq!(answer.text.split_whitespace().count(), 24);
    // Every lifecycle event points back to the directive that caused it.
    assert!(
        inputs
            .iter()
            .filter(|e| e.event_type() != EventType::MessageReceived)
            .all(|e| e.causation_id() == Some("m1~2"))
    );
    drop(s.nats);
}

#[tokio::test]
async fn a_tool_round_trip() {
    let s = Stack::start(EffectsOptions::default()).await;
    s.send("e2", "m1", message(r#"/tool echo {"x": 1}"#)).await;
    s.wait_for("e2", "the answer after the tool", |i| count(i, EventType::LlmCompleted) == 2, Duration::from_secs(20))
        .await;
    let inputs = s.inputs("e2").await;
    assert_eq!(count(&inputs, EventType::ToolCompleted), 1);
    let state = s.state_when("e2", "an idle run", |st| st.run_status == RunStatus::Idle, Duration::from_secs(10)).await;
    let tool = state.entries.iter().find(|e| e.role == EntryRole::Tool).expect("tool entry");
    assert_eq!(tool.text, r#"{"x":1}"#);
    assert!(state.entries.last().is_some_and(|e| e.text.starts_with("echo returned")), "{:?}", state.entries.last());
}

#[tokio::test]
async fn abort_stops_a_thirty_second_sleep_promptly() {
    let s = Stack::start(EffectsOptions::default()).await;
    s.send("e3", "m1", message(r#"/tool sleep {"ms": 30000}"#)).await;
    s.wait_for("e3", "the tool to start", |i| count(i, EventType::ToolStarted) == 1, Duration::from_secs(20)).await;
    let asked = Instant::now();
    s.send("e3", "abort-1", AbortRequested { reason: Some("user".into()) }).await;
    s.wait_for("e3", "the tool to be canceled", |i| count(i, EventType::ToolCanceled) == 1, Duration::from_secs(5))
        .await;
    assert!(asked.elapsed() < Duration::from_secs(3), "canceled in {:?}", asked.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let inputs = s.inputs("e3").await;
    assert_eq!(count(&inputs, EventType::ToolCompleted), 0, "nothing after the cancel: {:?}", types(&inputs));
    let state =
        s.state_when("e3", "an aborted run", |st| st.run_status == RunStatus::Aborted, Duration::from_secs(10)).await;
    assert!(state.tools.is_empty());
}

#[tokio::test]
async fn abort_stops_a_ten_second_stream_promptly() {
    let s =
        Stack::start(EffectsOptions { scripted_tokens: 500, scripted_token_delay_ms: 20, ..Default::default() }).await;
    s.streaming("e4", "tell me a long story").await;
    let asked = Instant::now();
    s.send("e4", "abort-1", AbortRequested { reason: None }).await;
    let inputs = s
        .wait_for("e4", "the stream to be canceled", |i| count(i, EventType::LlmCanceled) == 1, Duration::from_secs(5))
        .await;
    assert!(asked.elapsed() < Duration::from_secs(3), "canceled in {:?}", asked.elapsed());
    let deltas = count(&inputs, EventType::LlmDelta);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = s.inputs("e4").await;
    assert_eq!(count(&later, EventType::LlmDelta), deltas, "no delta after canceled");
    assert_eq!(count(&later, EventType::LlmCompleted), 0);
    let state =
        s.state_when("e4", "an aborted run", |st| st.run_status == RunStatus::Aborted, Duration::from_secs(10)).await;
    let entry = state.entries.last().expect("entry");
    assert_eq!(entry.status, EntryStatus::Aborted);
    assert!(!entry.text.is_empty(), "the partial answer is kept");
}

#[tokio::test]
async fn aborts_never_wait_for_a_slot_and_queued_calls_never_run() {
    // 16 slots for tool calls; model steps have their own.
    let s = Stack::start(EffectsOptions { tool_concurrency: 16, ..EffectsOptions::default() }).await;
    let convs: Vec<String> = (0..24).map(|i| format!("slot{i}")).collect();
    for (i, c) in convs.iter().enumerate() {
        s.send(c, &format!("m{i}"), message("/tool sleep {\"ms\": 8000}")).await;
    }
    // Every model step asked for its sleep; 16 sleeps run, 8 wait for a slot.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (running, queued) = loop {
        let mut running = Vec::new();
        let mut queued = Vec::new();
        let mut asked = 0;
        for c in &convs {
            let i = s.inputs(c).await;
            asked += count(&i, EventType::LlmCompleted);
            if count(&i, EventType::ToolStarted) > 0 {
                running.push(c.clone());
            } else {
                queued.push(c.clone());
            }
        }
        if running.len() == 16 && asked == convs.len() {
            break (running, queued);
        }
        assert!(Instant::now() < deadline, "{} sleeps started", running.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Abort 4 queued calls, then 4 running ones (a running one's slot, once
    // free, may go to any queued call).
    let wait_canceled = |c: String| {
        let s = &s;
        async move {
            let i = s
                .wait_for(
                    &c,
                    "the canceled tool call",
                    |i| count(i, EventType::ToolCanceled) == 1,
                    Duration::from_secs(10),
                )
                .await;
            let at = |ty: EventType| i.iter().find(|e| e.event_type() == ty).and_then(|e| e.time()).expect("a time");
            let latency = at(EventType::ToolCanceled) - at(EventType::AbortRequested);
            assert!(
                latency.num_milliseconds() < 1000,
                "{c}: canceled {} ms after the abort",
                latency.num_milliseconds()
            );
        }
    };
    for (i, c) in queued.iter().take(4).enumerate() {
        s.send(c, &format!("abort-q{i}"), conv_contracts::payload::AbortRequested { reason: None }).await;
    }
    for c in queued.iter().take(4) {
        wait_canceled(c.clone()).await;
    }
    for (i, c) in running.iter().take(4).enumerate() {
        s.send(c, &format!("abort-r{i}"), conv_contracts::payload::AbortRequested { reason: None }).await;
    }
    for c in running.iter().take(4) {
        wait_canceled(c.clone()).await;
    }
    // A queued call that was canceled never ran.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for c in queued.iter().take(4) {
        assert_eq!(count(&s.inputs(c).await, EventType::ToolStarted), 0, "{c} never started");
    }
}

#[tokio::test]
async fn a_sleep_longer_than_a_day_fails_with_a_clear_error() {
    let s = Stack::start(EffectsOptions::default()).await;
    let (i, error) = s.fails("long", "/tool sleep {\"ms\": 100000000000}", Duration::from_secs(20)).await;
    assert_eq!(count(&i, EventType::ToolFailed), 1);
    assert!(error.contains("24 h"), "{error}");
}

#[tokio::test]
async fn an_answer_too_long_for_the_journal_ends_the_step_with_a_clear_failure() {
    // The scripted model repeats the message's words as tokens: two words of
    // 100 000 bytes make an answer of 200 KB, over the 150 KB configured
    // (the default bound is what one journaled event holds).
    let s = Stack::start(EffectsOptions {
        scripted_tokens: 12,
        scripted_token_delay_ms: 1,
        llm_max_answer_bytes: 150_000,
        ..EffectsOptions::default()
    })
    .await;
    let words: Vec<String> = (0..2).map(|i| format!("{i}{}", "w".repeat(99_999))).collect();
    let (i, _) = s.fails("huge", &words.join(" "), Duration::from_secs(60)).await;
    assert_eq!(count(&i, EventType::LlmCompleted), 0);
    let failed = first!(i, LlmFailed).expect("failed");
    assert!(!failed.retryable && failed.error.contains("passed 150000 bytes"), "{failed:?}");
    // The user sees it: the run ends failed, the answer entry too.
    s.state_when(
        "huge",
        "a failed run and answer",
        |st| st.run_status == RunStatus::Failed && st.entries.last().map(|e| e.status) == Some(EntryStatus::Failed),
        Duration::from_secs(20),
    )
    .await;
}

#[tokio::test]
async fn a_message_larger_than_the_context_window_fails_the_step_visibly() {
    let s = Stack::start(EffectsOptions { llm_max_context_bytes: 1000, ..EffectsOptions::default() }).await;
    let (i, error) = s.fails("wide", &"y".repeat(5000), Duration::from_secs(20)).await;
    assert_eq!(count(&i, EventType::LlmFailed), 1);
    assert!(error.contains("window holds 1000"), "{error}");
}

#[tokio::test]
async fn a_stopped_step_can_be_retried_and_the_retry_runs() {
    let s =
        Stack::start(EffectsOptions { scripted_tokens: 200, scripted_token_delay_ms: 20, ..Default::default() }).await;
    s.streaming("sr", "a long one please").await;
    s.send("sr", "stop-1", StopRequested {}).await;
    s.wait_for("sr", "the stream to stop", |i| count(i, EventType::LlmCanceled) == 1, Duration::from_secs(10)).await;
    // The retry is the same step, a new attempt: the earlier cancel must not stop it.
    s.send("sr", "retry-1", RetryRequested {}).await;
    let i = s
        .wait_for("sr", "the retried answer", |i| count(i, EventType::LlmCompleted) == 1, Duration::from_secs(30))
        .await;
    assert_eq!(count(&i, EventType::LlmCanceled), 1, "only the first attempt was canceled");
    let state = s.state_when("sr", "an idle run", |st| st.run_status == RunStatus::Idle, Duration::from_secs(10)).await;
    assert_eq!(state.entries.last().map(|e| e.status), Some(EntryStatus::Completed));
}

#[tokio::test]
async fn an_abort_is_hinted_to_effects_before_its_group_commit_and_the_hint_alone_stops_a_stream() {
    let s =
        Stack::start(EffectsOptions { scripted_tokens: 500, scripted_token_delay_ms: 20, ..Default::default() }).await;
    let client = s.nats.client().await;
    let mut hints = client.subscribe(conv_contracts::subject::live_cancel_filter()).await.expect("subscribe");

    // The runtime hints an abort of a streaming conversation, naming what
    // its cancel directive names.
    s.streaming("h1", "tell me a long story").await;
    s.send("h1", "abort-1", AbortRequested { reason: None }).await;
    let m = tokio::time::timeout(Duration::from_secs(10), hints.next()).await.expect("a hint").expect("message");
    let hint = conv_contracts::live::LiveCancel::from_bytes(&m.payload).expect("a cancel hint");
    assert_eq!(m.subject.as_str(), conv_contracts::subject::live_cancel_subject(&conv("h1")));
    assert_eq!(
        (hint.input_id.as_str(), hint.mode, hint.effect_ids.clone()),
        ("abort-1", CancelMode::Abort, vec!["r1.s1.a1".to_owned()])
    );
    s.wait_for("h1", "the stream to be canceled", |i| count(i, EventType::LlmCanceled) == 1, Duration::from_secs(5))
        .await;

    // Effects stop on the hint alone (here with no abort journaled at all).
    s.send("h2", "h2-m1", message("tell me a long story")).await;
    s.wait_for("h2", "the first delta", |i| count(i, EventType::LlmDelta) >= 1, Duration::from_secs(20)).await;
    let alone = conv_contracts::live::LiveCancel {
        input_id: "hint-only".into(),
        mode: CancelMode::Abort,
        effect_ids: vec!["r1.s1.a1".into()],
        time: Some(chrono::Utc::now()),
    };
    client
        .publish(conv_contracts::subject::live_cancel_subject(&conv("h2")), alone.to_bytes().into())
        .await
        .expect("publish");
    let i =
        s.wait_for("h2", "the stream to stop", |i| count(i, EventType::LlmCanceled) == 1, Duration::from_secs(5)).await;
    assert_eq!(count(&i, EventType::AbortRequested), 0);
}

#[tokio::test]
async fn a_journal_outage_of_seconds_is_retried_in_place_not_dead_lettered() {
    let s = Stack::start(EffectsOptions::default()).await;
    s.send("jo", "m1", message(r#"/tool sleep {"ms": 3000}"#)).await;
    s.wait_for(
        "jo",
        "the step asking for the tool",
        |i| count(i, EventType::LlmCompleted) == 1,
        Duration::from_secs(20),
    )
    .await;
    // For 9 s `CONV_IN` takes nothing: the tool's outcome finds no stream,
    // as during a cluster's leader election (5 hand-backs 1 s apart used to
    // dead-letter the directive).
    let mut moved = s.js.get_stream("CONV_IN").await.expect("stream").get_info().await.expect("info").config;
    moved.subjects = vec!["conv-moved.>".into()];
    moved.subject_transform = None;
    s.js.update_stream(moved).await.expect("CONV_IN takes nothing");
    tokio::time::sleep(Duration::from_secs(9)).await;
    s.nats.setup().await.expect("CONV_IN restored");
    s.wait_for("jo", "the answer after the tool", |i| count(i, EventType::LlmCompleted) == 2, Duration::from_secs(30))
        .await;
    let inputs = s.inputs("jo").await;
    assert_eq!(count(&inputs, EventType::ToolCompleted), 1, "{:?}", types(&inputs));
    let dlq = s.js.get_stream("CONV_DLQ").await.expect("dlq").get_info().await.expect("info").state.messages;
    assert_eq!(dlq, 0, "nothing dead-lettered");
}

#[tokio::test]
async fn a_directive_delivered_again_while_it_runs_here_is_not_run_twice() {
    // Progress far slower than the 3 s ack wait: the directive is delivered
    // again (at 3 s, 6 s) while its 8 s stream runs here. A second run would
    // stream the answer again on the live lane and hold a second slot.
    let slow_progress = EffectsOptions { progress_ms: 20_000, ..EffectsOptions::default() };
    let s = Stack::start(EffectsOptions { scripted_tokens: 400, scripted_token_delay_ms: 20, ..slow_progress }).await;
    let mut live =
        s.nats.client().await.subscribe(conv_contracts::subject::live_subject(&conv("rd"))).await.expect("sub");
    s.send("rd", "m1", message("a long one")).await;
    let inputs =
        s.wait_for("rd", "the completion", |i| count(i, EventType::LlmCompleted) == 1, Duration::from_secs(40)).await;
    let completed = first!(inputs, LlmCompleted).map(|p| p.text).expect("completed");
    // Everything the live lane carried, until it is quiet for 2 s.
    let mut offset = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), live.next()).await {
        let p = conv_contracts::live::LiveDelta::from_bytes(&m.payload).expect("a live delta");
        assert_eq!(p.offset, offset, "one run: the live pieces follow each other, none is sent twice");
        offset += p.text.len() as u64;
    }
    assert_eq!(offset, completed.len() as u64, "the live lane carried the answer once");
}

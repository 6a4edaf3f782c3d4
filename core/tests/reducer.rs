//! The reducer: scenario tests and properties over random event sequences.

use std::collections::HashSet;

use conv_contracts::payload::*;
use conv_contracts::{ConversationId, Envelope, Limits, Payload, binding};
use conv_core::reducer::{Applied, apply};
use conv_core::state::State;
use proptest::prelude::*;
use serde_json::json;

fn ev(id: &str, data: impl Into<Payload>) -> Envelope {
    Envelope::new(id, "/test", ConversationId::parse("c1").expect("id"), data).expect("valid event")
}

fn msg(id: &str, text: &str) -> Envelope {
    ev(id, MessageReceived { text: text.into(), role: None, channel: None, sender: None })
}

fn delta(id: &str, step: &str, attempt: u32, seq: u64, text: &str) -> Envelope {
    ev(id, LlmDelta { step_id: step.into(), attempt, seq, text: text.into() })
}

fn run(events: &[Envelope]) -> (State, Vec<Envelope>) {
    let mut state = State::new("c1");
    let mut out = Vec::new();
    for e in events {
        let Applied { emitted, .. } = apply(&mut state, e);
        out.extend(emitted);
    }
    (state, out)
}

fn types(out: &[Envelope]) -> Vec<&'static str> {
    out.iter().map(|e| e.event_type().as_str()).collect()
}

#[test]
fn a_message_starts_a_run_and_the_reply_streams_in() {
    let (s, out) = run(&[msg("m1", "hi")]);
    assert_eq!(s.run_status, RunStatus::Running);
    assert_eq!(
        types(&out),
        [
            "conv.out.message.appended",
            "conv.out.run.status_changed",
            "conv.effect.llm.requested",
            "conv.out.message.appended"
        ]
    );
    assert!(out.iter().all(|e| e.causation_id() == Some("m1")));
    let (s, _) = run(&[
        msg("m1", "hi"),
        delta("d0", "r1.s1", 1, 0, "Hel"),
        delta("d1", "r1.s1", 1, 1, "lo"),
        delta("d1b", "r1.s1", 1, 1, "lo"), // a repeat position
        ev(
            "c",
            LlmCompleted {
                step_id: "r1.s1".into(),
                attempt: 1,
                text: "Hello".into(),
                tool_calls: vec![],
                finish_reason: None,
            },
        ),
    ]);
    assert_eq!(s.run_status, RunStatus::Idle);
    let last = s.entries.last().expect("entry");
    assert_eq!((last.text.as_str(), last.status), ("Hello", EntryStatus::Completed));
}

#[test]
fn abort_cancels_everything_and_leaves_no_dangling_tool_call() {
    let call = ToolCall { id: "t1".into(), name: "sleep".into(), args: json!({"ms": 30000}) };
    let (s, out) = run(&[
        msg("m1", "hi"),
        delta("d0", "r1.s1", 1, 0, "Let me wait"),
        ev(
            "c",
            LlmCompleted {
                step_id: "r1.s1".into(),
                attempt: 1,
                text: "Let me wait".into(),
                tool_calls: vec![call],
                finish_reason: None,
            },
        ),
        ev("a", AbortRequested { reason: Some("user".into()) }),
        delta("late", "r1.s2", 1, 0, "too late"),
    ]);
    assert_eq!(s.run_status, RunStatus::Aborted);
    assert!(s.llm.is_empty() && s.tools.is_empty());
    let tool = s.entries.iter().find(|e| e.tool_call_id.as_deref() == Some("t1")).expect("a tool result");
    assert_eq!(tool.status, EntryStatus::Aborted);
    let cancel = out.iter().find(|e| e.event_type() == conv_contracts::EventType::CancelRequested).expect("cancel");
    match cancel.data() {
        Payload::CancelRequested(c) => {
            assert_eq!((c.mode, c.effect_ids.clone()), (CancelMode::Abort, vec!["t1".to_owned()]))
        }
        other => panic!("{other:?}"),
    }
    assert!(!out.iter().any(|e| e.causation_id() == Some("late")), "nothing after the abort");
}

#[test]
fn abort_mid_stream_keeps_the_partial_text_with_its_status() {
    let (s, _) = run(&[msg("m1", "hi"), delta("d0", "r1.s1", 1, 0, "Par"), ev("a", AbortRequested { reason: None })]);
    let e = s.entries.last().expect("entry");
    assert_eq!((e.text.as_str(), e.status), ("Par", EntryStatus::Aborted));
}

#[test]
fn stop_then_retry_runs_the_step_again() {
    let (s, out) = run(&[
        msg("m1", "hi"),
        delta("d0", "r1.s1", 1, 0, "Par"),
        ev("s", StopRequested {}),
        ev("r", RetryRequested {}),
        delta("d1", "r1.s1", 1, 1, "old attempt"),
        delta("d2", "r1.s1", 2, 0, "New"),
    ]);
    assert_eq!(s.run_status, RunStatus::Running);
    let stopped = s.entries.iter().find(|e| e.id == "r1.s1.a1").expect("first attempt");
    assert_eq!((stopped.text.as_str(), stopped.status), ("Par", EntryStatus::Stopped));
    let second = s.entries.iter().find(|e| e.id == "r1.s1.a2").expect("second attempt");
    assert_eq!(second.text, "New");
    assert!(out.iter().any(|e| matches!(e.data(), Payload::LlmRequested(r) if r.attempt == 2)));
}

#[test]
fn a_tool_round_trip_starts_the_next_step() {
    let call = ToolCall { id: "t1".into(), name: "echo".into(), args: json!({"x": 1}) };
    let (s, out) = run(&[
        msg("m1", "/tool echo {\"x\":1}"),
        ev(
            "c",
            LlmCompleted {
                step_id: "r1.s1".into(),
                attempt: 1,
                text: String::new(),
                tool_calls: vec![call],
                finish_reason: None,
            },
        ),
        ev("t", ToolCompleted { tool_call_id: "t1".into(), result: json!({"x": 1}) }),
    ]);
    assert!(out.iter().any(|e| matches!(e.data(), Payload::ToolRequested(r) if r.name == "echo")));
    assert!(out.iter().any(|e| matches!(e.data(), Payload::LlmRequested(r) if r.step_id == "r1.s2")));
    assert_eq!(s.run_status, RunStatus::Running);
}

#[test]
fn busy_policies() {
    let (s, _) = run(&[msg("m1", "a"), msg("m2", "b")]);
    assert_eq!(s.queued.len(), 1, "enqueue by default");
    let (s, _) = run(&[
        msg("m1", "a"),
        msg("m2", "b"),
        ev(
            "c",
            LlmCompleted {
                step_id: "r1.s1".into(),
                attempt: 1,
                text: "A".into(),
                tool_calls: vec![],
                finish_reason: None,
            },
        ),
    ]);
    assert_eq!((s.runs, s.run_status), (2, RunStatus::Running), "the queued message starts the next run");
    let policy = |p| ev("p", PolicySet { on_message_while_running: p });
    let (s, _) = run(&[policy(BusyPolicy::Reject), msg("m1", "a"), msg("m2", "b")]);
    assert_eq!(s.entries.iter().filter(|e| e.status == EntryStatus::Failed).count(), 1);
    let (s, _) = run(&[policy(BusyPolicy::Interrupt), msg("m1", "a"), msg("m2", "b")]);
    assert_eq!((s.runs, s.run_status), (2, RunStatus::Running));
    assert!(s.entries.iter().any(|e| e.status == EntryStatus::Stopped));
}

#[test]
fn duplicates_change_nothing() {
    let (a, _) = run(&[msg("m1", "a")]);
    let mut b = a.clone();
    let again = apply(&mut b, &msg("m1", "a"));
    assert!(again.duplicate);
    assert_eq!(b, a);
    assert!(again.emitted.is_empty());
}

// ---------------------------------------------------------------- properties

fn input() -> impl Strategy<Value = (u8, u8, u8, u8)> {
    (0u8..14, 0u8..3, 0u8..3, 0u8..4)
}

/// Builds a plausible input from small numbers: steps `r<run>.s<step>`, attempts 1–2, tools t0–t2.
fn build(i: usize, (kind, a, b, c): (u8, u8, u8, u8)) -> Envelope {
    let id = format!("e{i}");
    let step = format!("r{}.s{}", a + 1, b + 1);
    let attempt = u32::from(c % 2) + 1;
    let tool = format!("t{b}");
    match kind {
        0 | 1 => msg(&id, "hello"),
        2..=4 => delta(&id, &step, attempt, u64::from(c), "tok "),
        5 => ev(
            &id,
            LlmCompleted {
                step_id: step,
                attempt,
                text: if c == 0 { String::new() } else { "done".into() },
                tool_calls: (0..c % 3)
                    .map(|k| ToolCall { id: format!("t{k}"), name: "echo".into(), args: json!({"k": k}) })
                    .collect(),
                finish_reason: None,
            },
        ),
        6 => ev(&id, ToolCompleted { tool_call_id: tool, result: json!(c) }),
        7 => ev(&id, ToolFailed { tool_call_id: tool, error: "boom".into(), retryable: false }),
        8 => ev(&id, AbortRequested { reason: None }),
        9 => ev(&id, StopRequested {}),
        10 => ev(&id, RetryRequested {}),
        11 => ev(&id, LlmFailed { step_id: step, attempt, error: "429".into(), retryable: true }),
        12 => ev(
            &id,
            PolicySet {
                on_message_while_running: [BusyPolicy::Enqueue, BusyPolicy::Interrupt, BusyPolicy::Reject]
                    [usize::from(c % 3)],
            },
        ),
        _ => msg(&format!("e{}", i.saturating_sub(1)), "maybe a repeat"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Live application and a replay from the journal give identical states,
    /// hashes and emitted events, also when the replay resumes from a snapshot.
    #[test]
    fn replay_is_exact(raw in prop::collection::vec(input(), 0..60), cut in 0usize..60) {
        let events: Vec<Envelope> = raw.into_iter().enumerate().map(|(i, r)| build(i, r)).collect();
        let (live, live_out) = run(&events);
        let (again, again_out) = run(&events);
        prop_assert_eq!(live.hash(), again.hash());
        prop_assert_eq!(&live, &again);
        prop_assert_eq!(&live_out, &again_out);

        // Snapshot at `cut`, restore from bytes, apply the tail.
        let cut = cut.min(events.len());
        let (head, _) = run(&events[..cut]);
        let mut restored = State::from_bytes(&head.to_bytes()).expect("snapshot round trip");
        for e in &events[cut..] {
            apply(&mut restored, e);
        }
        prop_assert_eq!(restored.hash(), live.hash());
        prop_assert_eq!(restored.digest(), live.digest());
    }

    /// Writing only the entries the state reports as touched keeps a store
    /// equal to the entries (what snapshots and LLM contexts rely on), and
    /// every step's context reference covers the entries before its own.
    #[test]
    fn touched_entries_keep_a_store_exact(raw in prop::collection::vec(input(), 0..60), every in 1usize..8) {
        let events: Vec<Envelope> = raw.into_iter().enumerate().map(|(i, r)| build(i, r)).collect();
        let mut s = State::new("p");
        let mut store: Vec<Option<conv_core::state::Entry>> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let applied = apply(&mut s, e);
            for out in &applied.emitted {
                if let Payload::LlmRequested(r) = out.data() {
                    let reference = r.context_ref.expect("by reference");
                    prop_assert_eq!(reference.entries as usize + 1, s.entries.len());
                    prop_assert!(r.context.is_empty(), "nothing inline");
                }
            }
            if (i + 1) % every == 0 || i + 1 == events.len() {
                let mut places = s.take_touched();
                places.extend(store.len()..s.entries.len());
                store.resize(s.entries.len(), None);
                for p in places {
                    store[p] = Some(s.entries[p].clone());
                }
                let stored: Vec<_> = store.iter().map(|e| e.clone().expect("written")).collect();
                prop_assert_eq!(&stored, &s.entries);
            }
        }
    }

    /// A cancel hint computed before an abort or stop is applied names
    /// exactly what its journaled `cancel.requested` names.
    #[test]
    fn cancel_targets_anticipate_the_cancel_directive(raw in prop::collection::vec(input(), 0..60)) {
        let events: Vec<Envelope> = raw.into_iter().enumerate().map(|(i, r)| build(i, r)).collect();
        let mut s = State::new("p");
        for e in &events {
            let hint = conv_core::reducer::cancel_targets(&s, e);
            let applied = apply(&mut s, e);
            let directive = applied.emitted.iter().find_map(|o| match o.data() {
                Payload::CancelRequested(c) => Some((c.mode, c.effect_ids.clone())),
                _ => None,
            });
            if matches!(e.data(), Payload::AbortRequested(_) | Payload::StopRequested(_)) {
                prop_assert_eq!(hint, directive);
            } else {
                prop_assert!(hint.is_none());
            }
        }
    }

    /// Invariants after any sequence: nothing in flight unless running, no
    /// dangling tool call, unique and valid emitted events.
    #[test]
    fn invariants(raw in prop::collection::vec(input(), 0..60)) {
        let events: Vec<Envelope> = raw.into_iter().enumerate().map(|(i, r)| build(i, r)).collect();
        let (s, out) = run(&events);
        if s.run_status != RunStatus::Running {
            prop_assert!(s.llm.is_empty(), "no LLM step in flight when {:?}", s.run_status);
            prop_assert!(s.tools.is_empty(), "no tool call in flight when {:?}", s.run_status);
        }
        for e in s.entries.iter().filter(|e| e.role == EntryRole::Assistant && e.status != EntryStatus::Streaming) {
            for call in &e.tool_calls {
                let answered = s.entries.iter().any(|r| r.tool_call_id.as_deref() == Some(call.id.as_str()));
                prop_assert!(answered || s.tools.contains_key(&call.id), "tool call {} is dangling", call.id);
            }
        }
        let mut ids = HashSet::new();
        for e in &out {
            prop_assert!(ids.insert(e.id().to_owned()), "emitted id {} twice", e.id());
            prop_assert!(binding::check(e, Limits::default()).is_ok(), "emitted event is valid: {e:?}");
        }
    }
}

#[test]
fn a_timer_longer_than_a_day_is_refused_with_a_tool_error() {
    let call = ToolCall { id: "t1".into(), name: "timer".into(), args: serde_json::json!({"ms": 100_000_000_000u64}) };
    let completed = LlmCompleted {
        step_id: "r1.s1".into(),
        attempt: 1,
        text: String::new(),
        tool_calls: vec![call],
        finish_reason: None,
    };
    let (s, out) = run(&[msg("m1", "hi"), ev("c1", completed)]);
    assert!(!types(&out).contains(&"conv.effect.timer.scheduled"), "{:?}", types(&out));
    let entry = s.entries.iter().find(|e| e.id == "tool.t1").expect("the tool result");
    assert_eq!(entry.status, EntryStatus::Failed);
    assert!(entry.text.contains("24 h"), "{}", entry.text);
    assert!(s.timers.is_empty());
}

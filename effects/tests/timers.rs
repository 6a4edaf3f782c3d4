//! Durable timers: scheduled through the `timer` tool, fired into
//! `conv.in.timer.fired`, canceled by an abort, kept across restarts.

mod support;

use std::time::Duration;

use conv_contracts::payload::*;
use conv_contracts::{EventType, Payload};
use conv_effects::EffectsOptions;
use support::{Stack, count, message};

#[tokio::test]
async fn timers_fire_are_canceled_by_abort_and_survive_restarts() {
    let mut s = Stack::start(EffectsOptions::default()).await;
    let within = Duration::from_secs(20);

    // Fires, and the model is told.
    s.send("t1", "t1-m", message(r#"/tool timer {"ms": 400}"#)).await;
    let i = s.wait_for("t1", "the reaction to the timer", |i| count(i, EventType::LlmCompleted) == 3, within).await;
    assert_eq!(count(&i, EventType::TimerFired), 1);
    let mut noted = i.iter().filter_map(|e| match e.data() {
        Payload::LlmCompleted(c) => Some(c.text.clone()),
        _ => None,
    });
    assert!(noted.next_back().is_some_and(|t| t.starts_with("Noted: timer")), "the model saw the timer fire");

    // An abort cancels a pending timer.
    s.send("t2", "t2-m", message(r#"/tool timer {"ms": 2000}"#)).await;
    s.wait_for("t2", "the answer", |i| count(i, EventType::LlmCompleted) == 2, within).await;
    s.send("t2", "t2-abort", AbortRequested { reason: None }).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(count(&s.inputs("t2").await, EventType::TimerFired), 0, "canceled timers do not fire");

    // A timer outlives the effects instance that stored it.
    s.send("t3", "t3-m", message(r#"/tool timer {"ms": 1500}"#)).await;
    s.wait_for("t3", "the answer", |i| count(i, EventType::LlmCompleted) == 2, within).await;
    s.stop_effects().await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(count(&s.inputs("t3").await, EventType::TimerFired), 0, "nobody to fire it yet");
    s.start_effects(EffectsOptions::default());
    s.wait_for("t3", "the late timer", |i| count(i, EventType::TimerFired) == 1, within).await;
}

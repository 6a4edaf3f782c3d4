//! Durable timers: scheduled through the `timer` tool, fired into
//! `conv.in.timer.fired`, canceled by an abort, kept across restarts.

use std::time::Duration;

use conv_contracts::payload::*;
use conv_contracts::{ConversationId, Envelope, EventType, Payload};
use conv_nats::service::Settings;
use conv_nats::test_util::{ServiceHandle, TestNats, free_addr, spawn_service};

async fn journal(js: &async_nats::jetstream::Context, conv: &str) -> Vec<Envelope> {
    conv_nats::test_util::inputs(js, conv).await
}

async fn wait(
    js: &async_nats::jetstream::Context,
    conv: &str,
    what: &str,
    pred: impl Fn(&[Envelope]) -> bool,
) -> Vec<Envelope> {
    conv_nats::test_util::wait_inputs(js, conv, what, Duration::from_secs(20), pred).await
}

fn has(i: &[Envelope], ty: EventType) -> usize {
    i.iter().filter(|e| e.event_type() == ty).count()
}

async fn send(js: &async_nats::jetstream::Context, conv: &str, id: &str, data: impl Into<Payload>) {
    let mut e = Envelope::new(id, "/test", ConversationId::parse(conv).expect("id"), data);
    e.time = Some(chrono::Utc::now());
    conv_nats::headers::publish(js, &e).await.expect("publish").await.expect("ack");
}

fn message(t: &str) -> MessageReceived {
    MessageReceived { text: t.into(), role: None, channel: None, sender: None }
}

fn effects(nats: &TestNats) -> ServiceHandle<conv_effects::Error> {
    let ec: conv_effects::Config = Settings::for_test(nats.config(), free_addr());
    spawn_service("conv-effects", |t| conv_effects::run(ec, t))
}

#[tokio::test]
async fn timers_fire_are_canceled_by_abort_and_survive_restarts() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let js = nats.jetstream().await;
    let mut rc: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    rc.options.heartbeat_ms = 200;
    let _rt = spawn_service("conv-runtime", |t| conv_runtime::run(rc, t));
    let fx = effects(&nats);

    // Fires, and the model is told.
    send(&js, "t1", "t1-m", message(r#"/tool timer {"ms": 400}"#)).await;
    let i = wait(&js, "t1", "the reaction to the timer", |i| has(i, EventType::LlmCompleted) == 3).await;
    assert_eq!(has(&i, EventType::TimerFired), 1);
    let mut noted = i.iter().filter_map(|e| match &e.data {
        Payload::LlmCompleted(c) => Some(c.text.clone()),
        _ => None,
    });
    assert!(noted.next_back().is_some_and(|t| t.starts_with("Noted: timer")), "the model saw the timer fire");

    // An abort cancels a pending timer.
    send(&js, "t2", "t2-m", message(r#"/tool timer {"ms": 2000}"#)).await;
    wait(&js, "t2", "the answer", |i| has(i, EventType::LlmCompleted) == 2).await;
    send(&js, "t2", "t2-abort", AbortRequested { reason: None }).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(has(&journal(&js, "t2").await, EventType::TimerFired), 0, "canceled timers do not fire");

    // A timer outlives the effects instance that stored it.
    send(&js, "t3", "t3-m", message(r#"/tool timer {"ms": 1500}"#)).await;
    wait(&js, "t3", "the answer", |i| has(i, EventType::LlmCompleted) == 2).await;
    fx.shutdown().await.expect("stop effects");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(has(&journal(&js, "t3").await, EventType::TimerFired), 0, "nobody to fire it yet");
    let _fx = effects(&nats);
    wait(&js, "t3", "the late timer", |i| has(i, EventType::TimerFired) == 1).await;
}

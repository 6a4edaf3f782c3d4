//! Killing an effects instance mid-stream: the directive is redelivered to
//! another instance, which resumes after what was already journaled; the
//! step completes once and no lifecycle event is duplicated.

mod support;

use std::time::{Duration, Instant};

use conv_contracts::payload::*;
use conv_contracts::{ConversationId, Envelope, EventType, Payload};
use conv_nats::test_util::{TestNats, free_addr};
use support::{count, first};

fn effects(nats: &TestNats) -> tokio::process::Child {
    conv_nats::test_util::spawn_binary(
        env!("CARGO_BIN_EXE_conv-effects"),
        &[
            ("NATS_URL", nats.url()),
            ("CONV_EFFECTS_ADDR", free_addr().to_string()),
            ("CONV_SCRIPTED_TOKENS", "100".into()),
            ("CONV_SCRIPTED_TOKEN_DELAY_MS", "30".into()),
            ("CONV_EFFECTS_PROGRESS_MS", "500".into()),
            ("CONV_EFFECTS_COALESCE_MS", "150".into()),
        ],
    )
}

async fn inputs(js: &async_nats::jetstream::Context) -> Vec<Envelope> {
    conv_nats::test_util::inputs(js, "fx").await
}

#[tokio::test]
async fn a_killed_instance_is_replaced_and_the_reply_completes_once() {
    let (nats, js) = TestNats::set_up().await;
    let _runtime = support::runtime(&nats);
    let mut first = effects(&nats);

    let mut m = Envelope::new(
        "m1",
        "/test",
        ConversationId::parse("fx").expect("id"),
        MessageReceived { text: "a long answer please".into(), role: None, channel: None, sender: None },
    )
    .expect("valid event");
    m = m.with_time(chrono::Utc::now());
    conv_nats::headers::publish(&js, &m).await.expect("publish").await.expect("ack");

    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&inputs(&js).await, EventType::LlmDelta) < 3 {
        assert!(Instant::now() < deadline, "no deltas");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");
    let _second = effects(&nats);

    let deadline = Instant::now() + Duration::from_secs(30);
    let journal = loop {
        let i = inputs(&js).await;
        if count(&i, EventType::LlmCompleted) >= 1 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            break inputs(&js).await;
        }
        assert!(Instant::now() < deadline, "the reply never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(count(&journal, EventType::LlmStarted), 1, "started once (the re-run's repeat was deduped)");
    assert_eq!(count(&journal, EventType::LlmCompleted), 1);
    let mut ids: Vec<&str> = journal.iter().map(|e| e.id()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "no duplicate lifecycle event");
    let deltas: Vec<&LlmDelta> = journal
        .iter()
        .filter_map(|e| match e.data() {
            Payload::LlmDelta(d) => Some(d),
            _ => None,
        })
        .collect();
    let seqs: Vec<u64> = deltas.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (0..deltas.len() as u64).collect::<Vec<_>>(), "delta positions run on without gap or repeat");
    let streamed: String = deltas.iter().map(|d| d.text.as_str()).collect();
    let completed = first!(journal, LlmCompleted).map(|p| p.text).expect("completed");
    // The durable chunks are the start of the answer byte for byte; the
    // completion carries the rest that was still being coalesced.
    assert!(completed.starts_with(&streamed), "the resumed stream continues exactly where the dead one stopped");
    assert!(streamed.len() > completed.len() / 3, "most of the answer went out as chunks");
    assert_eq!(completed.split_whitespace().count(), 100);
}

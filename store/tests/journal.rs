//! Replay from the journal keeps each conversation's reducer rules: a
//! conversation journaled under rules 1 (markers without `rules`, as before
//! rules existed) replays under rules 1 and matches every recorded hash; a
//! new one runs and replays under the current rules.

use conv_contracts::payload::{Applied, LlmStarted, MessageReceived};
use conv_contracts::{ConversationId, Envelope};
use conv_core::reducer;
use conv_core::state::{RULES, State};
use conv_nats::test_util::TestNats;

/// Three messages, each followed by an informative input (which counts as
/// an input applied, and changes nothing else).
fn inputs(conv: &ConversationId) -> Vec<Envelope> {
    let mut all = Vec::new();
    for n in 1..=3 {
        let text = MessageReceived { text: format!("message {n}"), role: None, channel: None, sender: None };
        all.push(Envelope::new(format!("m{n}"), "/test", conv.clone(), text).expect("valid event"));
        let started = LlmStarted { step_id: format!("r{n}.s1"), attempt: 1 };
        all.push(Envelope::new(format!("s{n}"), "/test", conv.clone(), started).expect("valid event"));
    }
    all
}

/// Applies the inputs under `rules` and journals each with its marker
/// (naming the rules, or not); returns the live state.
async fn journal(js: &async_nats::jetstream::Context, conv: &ConversationId, rules: u32, named: bool) -> State {
    let mut state = State::with_rules(conv.as_str(), rules);
    for input in inputs(conv) {
        let seq = conv_nats::headers::publish(js, &input).await.expect("publish").await.expect("ack").sequence;
        reducer::apply(&mut state, &input);
        let marker = Applied { rules: named.then_some(rules), ..state.marker(&input, seq) };
        let marker = Envelope::new(format!("{}~marker", input.id()), "/test", conv.clone(), marker)
            .expect("valid event")
            .caused_by(&input);
        conv_nats::headers::publish(js, &marker).await.expect("publish").await.expect("ack");
    }
    state
}

fn user_ids(state: &State) -> Vec<&str> {
    state.entries.iter().filter(|e| e.id.starts_with('u')).map(|e| e.id.as_str()).collect()
}

#[tokio::test]
async fn replay_keeps_the_rules_a_conversation_started_with() {
    let (_nats, js) = TestNats::set_up().await;
    for (conv, rules, named) in [("old", 1, false), ("new", RULES, true)] {
        let conv = ConversationId::parse(conv).expect("id");
        let live = journal(&js, &conv, rules, named).await;
        let replayed = conv_store::journal::rebuild(&js, &conv, None).await.expect("rebuild");
        assert_eq!(replayed.applied, 6);
        assert!(replayed.mismatches.is_empty(), "{conv}: every recorded hash matches: {:?}", replayed.mismatches);
        assert_eq!(replayed.snapshot.state.rules, rules, "{conv}");
        assert_eq!(replayed.snapshot.state.digest(), live.digest(), "{conv}: the same state");
    }
    // What the rules change: how user entries are numbered.
    let old = conv_store::journal::rebuild(&js, &ConversationId::parse("old").expect("id"), None).await.expect("old");
    let new = conv_store::journal::rebuild(&js, &ConversationId::parse("new").expect("id"), None).await.expect("new");
    assert_eq!(user_ids(&old.snapshot.state), ["u1", "u3", "u5"], "rules 1 number by inputs applied");
    assert_eq!(user_ids(&new.snapshot.state), ["u1", "u2", "u3"], "rules 2 number user entries");
}

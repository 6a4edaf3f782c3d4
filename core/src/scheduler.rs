//! The scheduler of a partition: which pending input is applied next.
//!
//! Deterministic given its queue (no clock, no randomness):
//! * **priority** — the most urgent class with pending work goes first, so a
//!   P0 abort is applied at the next event boundary and never waits behind a
//!   P2/P3 backlog;
//! * **fairness** — within a class, conversations take turns (round robin), so
//!   a chatty conversation cannot starve the others in its partition;
//! * **order** — within a conversation and class, inputs keep journal order;
//! * **causality** — an input whose `causationid` names another input still
//!   pending here is not applied before it: the cause is applied first,
//!   whatever its priority.
//!
//! Inputs are held with a token (`T`, the message to ack) that the caller
//! gets back with the input.

use std::collections::{BTreeMap, HashMap, VecDeque};

use conv_contracts::{ConversationId, Envelope};

/// An input waiting to be applied.
#[derive(Debug)]
pub struct Pending<T> {
    /// Its `CONV_IN` stream sequence.
    pub seq: u64,
    pub event: Envelope,
    pub token: T,
}

#[derive(Debug)]
pub struct Scheduler<T> {
    /// Per priority class: per conversation FIFO.
    queues: [BTreeMap<ConversationId, VecDeque<Pending<T>>>; 4],
    /// Per priority class: conversations with work, in turn order.
    turns: [VecDeque<ConversationId>; 4],
    /// Pending event ids → (class, conversation), for causality.
    index: HashMap<String, (usize, ConversationId)>,
    len: usize,
}

impl<T> Default for Scheduler<T> {
    fn default() -> Self {
        Self { queues: Default::default(), turns: Default::default(), index: HashMap::new(), len: 0 }
    }
}

impl<T> Scheduler<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pending inputs per class (P0..P3), for the queue-depth metric.
    pub fn depths(&self) -> [usize; 4] {
        let mut out = [0; 4];
        for (i, q) in self.queues.iter().enumerate() {
            out[i] = q.values().map(VecDeque::len).sum();
        }
        out
    }

    /// True when an input with this id is waiting here.
    pub fn contains(&self, event_id: &str) -> bool {
        self.index.contains_key(event_id)
    }

    pub fn push(&mut self, pending: Pending<T>) {
        let class = usize::from(pending.event.priority().rank());
        let conv = pending.event.conversation_id().clone();
        self.index.insert(pending.event.id().to_owned(), (class, conv.clone()));
        let queue = self.queues[class].entry(conv.clone()).or_default();
        if queue.is_empty() {
            self.turns[class].push_back(conv);
        }
        queue.push_back(pending);
        self.len += 1;
    }

    /// The next input to apply.
    pub fn pop(&mut self) -> Option<Pending<T>> {
        let class = (0..4).find(|c| !self.turns[*c].is_empty())?;
        let conv = self.turns[class].front()?.clone();
        // Follow the causation chain to the first cause still pending here.
        let mut target = (class, conv);
        let mut hops = 0;
        loop {
            let head = self.queues[target.0].get(&target.1).and_then(VecDeque::front);
            let cause = head.and_then(|p| p.event.causation_id()).and_then(|c| self.index.get(c));
            match cause {
                Some(next) if hops < 64 && *next != target => {
                    target = next.clone();
                    hops += 1;
                }
                _ => break,
            }
        }
        if target.0 == class && hops == 0 {
            // The usual case: take the turn of `conv` and move it to the back.
            self.turns[class].pop_front();
        }
        self.take(target.0, &target.1)
    }

    /// Removes the head of `conv` in `class`. When `pop` follows a causation
    /// chain here, the head is the cause itself or an input recorded before it
    /// in the same class and conversation, so either way the cause comes
    /// closer and journal order within the queue is kept.
    fn take(&mut self, class: usize, conv: &ConversationId) -> Option<Pending<T>> {
        let queue = self.queues[class].get_mut(conv)?;
        let pending = queue.pop_front()?;
        let now_empty = queue.is_empty();
        if now_empty {
            self.queues[class].remove(conv);
            self.turns[class].retain(|c| c != conv);
        } else if !self.turns[class].contains(conv) {
            self.turns[class].push_back(conv.clone());
        }
        self.index.remove(pending.event.id());
        self.len -= 1;
        Some(pending)
    }

    /// Every held token (to send progress for work waiting here).
    pub fn tokens(&self) -> impl Iterator<Item = &T> {
        self.queues.iter().flat_map(|q| q.values().flat_map(|d| d.iter().map(|p| &p.token)))
    }

    /// Drops everything (losing a partition): the tokens are returned unacked.
    pub fn drain(&mut self) -> Vec<Pending<T>> {
        let mut out = Vec::with_capacity(self.len);
        for q in &mut self.queues {
            for (_, d) in std::mem::take(q) {
                out.extend(d);
            }
        }
        self.turns = Default::default();
        self.index.clear();
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::payload::*;

    fn ev(id: &str, conv: &str, data: impl Into<conv_contracts::Payload>) -> Envelope {
        Envelope::new(id, "/t", ConversationId::parse(conv).unwrap(), data).expect("valid event")
    }

    fn delta(id: &str, conv: &str) -> Envelope {
        ev(id, conv, LlmDelta { step_id: "s".into(), attempt: 1, seq: 0, text: "x".into() })
    }

    fn push(s: &mut Scheduler<()>, seq: u64, e: Envelope) {
        s.push(Pending { seq, event: e, token: () });
    }

    fn order(s: &mut Scheduler<()>) -> Vec<String> {
        std::iter::from_fn(|| s.pop()).map(|p| p.event.id().to_owned()).collect()
    }

    #[test]
    fn p0_overtakes_a_p3_backlog() {
        let mut s = Scheduler::new();
        for i in 0..10_000 {
            push(&mut s, i, delta(&format!("d{i}"), "c1"));
        }
        push(&mut s, 10_000, ev("abort", "c1", AbortRequested { reason: None }));
        assert_eq!(s.depths(), [1, 0, 0, 10_000]);
        assert_eq!(s.pop().map(|p| p.event.id().to_owned()), Some("abort".into()));
        let rest = order(&mut s);
        assert_eq!(rest.len(), 10_000);
        assert_eq!(rest[0], "d0", "journal order within a class");
    }

    #[test]
    fn conversations_take_turns() {
        let mut s = Scheduler::new();
        for i in 0..5 {
            push(&mut s, i, delta(&format!("a{i}"), "chatty"));
        }
        push(&mut s, 5, delta("b0", "quiet"));
        push(&mut s, 6, delta("c0", "other"));
        assert_eq!(order(&mut s), ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]);
    }

    #[test]
    fn a_cause_is_applied_before_its_effect() {
        let mut s = Scheduler::new();
        push(&mut s, 1, delta("cause", "c1"));
        let effect =
            ev("effect", "c1", StopRequested {}).with_causation(Some("cause".into()), None).expect("valid ids");
        push(&mut s, 2, effect);
        push(&mut s, 3, ev("other-stop", "c2", StopRequested {}));
        assert_eq!(order(&mut s), ["cause", "effect", "other-stop"]);
    }

    #[test]
    fn causation_cycles_do_not_hang() {
        let mut s = Scheduler::new();
        let a = delta("a", "c1").with_causation(Some("b".into()), None).expect("valid ids");
        let b = delta("b", "c1").with_causation(Some("a".into()), None).expect("valid ids");
        push(&mut s, 1, a);
        push(&mut s, 2, b);
        assert_eq!(order(&mut s).len(), 2);
    }
}

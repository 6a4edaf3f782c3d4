//! Cancel hints without the worker: what a partition's control reader needs
//! to tell effects at once what an abort or stop will cancel.
//!
//! The worker owns the conversation states and may be busy committing a
//! group (loads, entry flushes, snapshot saves, publish acks) for tens of
//! milliseconds under load. The control reader ([`crate::worker`]) takes
//! aborts and stops off the control consumer as they arrive, looks the
//! conversation up on this board and sends the hint (`conv.live.cancel.<id>`)
//! before handing the input to the worker.
//!
//! The board holds, per conversation with a run in progress, the effect ids
//! an abort or stop applied to its **committed** state would cancel
//! ([`conv_core::reducer::cancelable`]), and the ids of the aborts and stops
//! applied lately. A hint may therefore name an effect that has finished
//! since (a no-op: effect ids are never reused) and may miss one started in
//! a group not yet committed (the journaled cancel directive stops that one);
//! it never names an effect of a later run, because an abort or stop that
//! was applied is on the board before anything its application let start.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use conv_contracts::payload::CancelMode;
use conv_contracts::{ConversationId, Envelope};
use conv_core::reducer;

/// Aborts and stops remembered as applied, per partition.
const APPLIED: usize = 4096;

/// One partition's board, shared by its worker and its control reader.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Conversations with a run in progress → the effect ids it would cancel.
    running: HashMap<ConversationId, Vec<String>>,
    applied: HashSet<String>,
    order: VecDeque<String>,
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections only move owned values: a panic in one leaves
        // the maps consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a conversation's committed state: the effects an abort would
    /// cancel now (none: the entry goes).
    pub fn record(&self, conversation: &ConversationId, cancelable: Vec<String>) {
        let mut inner = self.lock();
        if cancelable.is_empty() {
            inner.running.remove(conversation);
        } else {
            inner.running.insert(conversation.clone(), cancelable);
        }
    }

    /// Records an input that was applied (and committed), if it is an abort
    /// or stop: only those are ever hinted.
    pub fn applied(&self, input: &Envelope) {
        if reducer::cancel_mode(input).is_none() {
            return;
        }
        let input_id = input.id();
        let mut inner = self.lock();
        if inner.applied.insert(input_id.to_owned()) {
            inner.order.push_back(input_id.to_owned());
            while inner.order.len() > APPLIED {
                if let Some(old) = inner.order.pop_front() {
                    inner.applied.remove(&old);
                }
            }
        }
    }

    /// Forgets a conversation the worker no longer holds in memory.
    pub fn forget(&self, conversation: &ConversationId) {
        self.lock().running.remove(conversation);
    }

    /// Forgets every conversation (the worker dropped its states).
    pub fn clear(&self) {
        self.lock().running.clear();
    }

    /// What to hint for `input`: its mode and the effect ids to cancel, for
    /// an abort or stop not yet applied of a conversation with a run in
    /// progress.
    pub fn targets(&self, input: &Envelope) -> Option<(CancelMode, Vec<String>)> {
        let mode = reducer::cancel_mode(input)?;
        let inner = self.lock();
        if inner.applied.contains(input.id()) {
            return None;
        }
        let ids = inner.running.get(input.conversation_id())?;
        Some((mode, ids.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::payload::{AbortRequested, RetryRequested, StopRequested};

    fn conv(id: &str) -> ConversationId {
        ConversationId::parse(id).expect("a valid id")
    }

    fn abort(id: &str, c: &str) -> Envelope {
        Envelope::new(id, "test", conv(c), AbortRequested { reason: None }).expect("valid event")
    }

    #[test]
    fn hints_name_what_the_committed_state_would_cancel() {
        let board = Board::default();
        board.record(&conv("c1"), vec!["r1.s1.a1".into(), "call1".into()]);
        assert_eq!(
            board.targets(&abort("x1", "c1")),
            Some((CancelMode::Abort, vec!["r1.s1.a1".into(), "call1".into()]))
        );
        let stop = Envelope::new("x2", "test", conv("c1"), StopRequested {}).expect("valid event");
        assert_eq!(board.targets(&stop).map(|(m, _)| m), Some(CancelMode::Stop));
    }

    #[test]
    fn no_hint_without_a_run_or_for_other_inputs() {
        let board = Board::default();
        assert_eq!(board.targets(&abort("x1", "c1")), None);
        board.record(&conv("c1"), vec!["r1.s1.a1".into()]);
        board.record(&conv("c1"), Vec::new());
        assert_eq!(board.targets(&abort("x1", "c1")), None);
        board.record(&conv("c2"), vec!["r1.s1.a1".into()]);
        board.forget(&conv("c2"));
        assert_eq!(board.targets(&abort("x1", "c2")), None);
        board.record(&conv("c3"), vec!["r1.s1.a1".into()]);
        let retry = Envelope::new("m1", "test", conv("c3"), RetryRequested {}).expect("valid event");
        assert_eq!(board.targets(&retry), None);
        board.clear();
        assert_eq!(board.targets(&abort("x1", "c3")), None);
    }

    #[test]
    fn an_applied_abort_is_never_hinted_again() {
        // Its second copy must not cancel the run that started after it.
        let board = Board::default();
        board.applied(&abort("x1", "c1"));
        // Other inputs are not remembered.
        board.applied(&Envelope::new("m1", "test", conv("c1"), RetryRequested {}).expect("valid event"));
        assert!(board.lock().applied.contains("x1") && !board.lock().applied.contains("m1"));
        board.record(&conv("c1"), vec!["r2.s1.a1".into()]);
        assert_eq!(board.targets(&abort("x1", "c1")), None);
        assert!(board.targets(&abort("x2", "c1")).is_some());
    }

    #[test]
    fn applied_ids_are_bounded() {
        let board = Board::default();
        for i in 0..APPLIED + 10 {
            board.applied(&abort(&format!("x{i}"), "c1"));
        }
        let inner = board.lock();
        assert_eq!(inner.applied.len(), APPLIED);
        assert!(!inner.applied.contains("x0"));
        assert!(inner.applied.contains(&format!("x{}", APPLIED + 9)));
    }
}

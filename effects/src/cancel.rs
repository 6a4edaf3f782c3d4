//! Which effects run here, and which were canceled: cancel directives reach
//! every instance, and each stops what it runs itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// The runtime's clock: the same as std's, and paused in tests.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

/// How long a cancel is remembered for effects that have not started yet.
const REMEMBER: Duration = Duration::from_secs(600);

type Key = (String, String);

#[derive(Debug, Default)]
struct Inner {
    running: HashMap<Key, CancellationToken>,
    canceled: HashMap<Key, Instant>,
    /// When forgotten cancels were last dropped: a sweep at most every
    /// [`PRUNE_EVERY`], so that a storm of cancels costs each one O(1).
    pruned: Option<Instant>,
}

/// How often remembered cancels older than [`REMEMBER`] are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Shared registry of running effects (`(conversation, effect id)` → token).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl Registry {
    /// Registers an effect about to start; `None` if a cancel already came.
    pub fn start(&self, conversation: &str, effect_id: &str) -> Option<CancellationToken> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (conversation.to_owned(), effect_id.to_owned());
        if inner.canceled.contains_key(&key) {
            return None;
        }
        let token = CancellationToken::new();
        inner.running.insert(key, token.clone());
        Some(token)
    }

    pub fn finish(&self, conversation: &str, effect_id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.running.remove(&(conversation.to_owned(), effect_id.to_owned()));
    }

    /// Cancels an effect if it runs here (true the first time only), and
    /// remembers the cancel either way.
    pub fn cancel(&self, conversation: &str, effect_id: &str) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if inner.pruned.is_none_or(|at| now.duration_since(at) >= PRUNE_EVERY) {
            inner.canceled.retain(|_, at| now.duration_since(*at) < REMEMBER);
            inner.pruned = Some(now);
        }
        let key = (conversation.to_owned(), effect_id.to_owned());
        inner.canceled.insert(key.clone(), now);
        match inner.running.get(&key) {
            // A cancel seen twice (work queue and cancel listener) counts once.
            Some(token) if !token.is_cancelled() => {
                token.cancel();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cancels_stop_what_runs_once_and_are_remembered_for_a_while() {
        let r = Registry::default();
        // A cancel that comes first: the effect never starts.
        assert!(!r.cancel("c1", "early"), "nothing ran, nothing was stopped");
        assert!(r.start("c1", "early").is_none());
        // A running effect: stopped by the first copy of the cancel only.
        let token = r.start("c1", "e1").expect("starts");
        assert!(r.cancel("c1", "e1"));
        assert!(token.is_cancelled());
        assert!(!r.cancel("c1", "e1"), "the second copy counts nothing");
        assert!(r.start("c2", "e1").is_some(), "another conversation's effect is another effect");
        // Remembered for REMEMBER, then forgotten (pruned by a later cancel).
        tokio::time::advance(REMEMBER - Duration::from_secs(1)).await;
        r.cancel("c9", "other");
        assert!(r.start("c1", "early").is_none(), "still remembered");
        tokio::time::advance(Duration::from_secs(2)).await;
        r.cancel("c9", "another");
        assert!(r.start("c1", "early").is_some(), "forgotten after {REMEMBER:?}");
    }
}

//! Durable timers in the `conv_timers` bucket.
//!
//! `conv.effect.timer.scheduled` stores `{conversation_id, timer_id,
//! fire_at_ms}` under `<conversation>.<timer id>`;
//! `conv.effect.timer.cancel_requested` deletes it. Every effects instance
//! watches the bucket and fires what is due: it journals
//! `conv.in.timer.fired` (id `<conversation>.timer.<id>.fired`, so instances
//! that fire the same timer at once produce one event) and then deletes the
//! key with its revision. Timers live in JetStream, so they survive restarts
//! of every effects instance. A timer that cannot be journaled is retried
//! with a back-off (200 ms doubling to 10 s); one that can never fire (it
//! names no valid conversation) is logged and dropped.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::Utc;
use conv_contracts::payload::TimerFired;
use conv_contracts::{ConversationId, Envelope};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub use conv_contracts::records::{Timer, timer_key as key};

/// Why a timer could not be stored, deleted or fired.
#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    #[error("encoding the timer: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("storing the timer: {0}")]
    Put(#[from] kv::PutError),
    #[error("deleting the timer: {0}")]
    Delete(#[from] kv::DeleteError),
    #[error("the timer names no valid conversation: {0}")]
    Conversation(#[from] conv_contracts::id::IdError),
    #[error("journaling timer.fired: {0}")]
    Journal(#[from] conv_nats::journal::AppendError),
}

/// Stores a timer.
pub async fn schedule(store: &kv::Store, timer: &Timer) -> Result<(), TimerError> {
    let value = Bytes::from(serde_json::to_vec(timer)?);
    store.put(key(&timer.conversation_id, &timer.timer_id), value).await?;
    Ok(())
}

/// Deletes a timer (it will not fire).
pub async fn cancel(store: &kv::Store, conversation: &str, timer_id: &str) -> Result<(), TimerError> {
    Ok(store.delete(key(conversation, timer_id)).await?)
}

/// Watches the bucket and fires due timers until `shutdown`.
pub async fn run(
    store: kv::Store,
    js: async_nats::jetstream::Context,
    tracer: conv_telemetry::Tracer,
    shutdown: CancellationToken,
) {
    let mut watch = match store.watch_with_history(">").await {
        Ok(w) => w,
        Err(error) => {
            tracing::error!(message = "Cannot watch timers.", %error);
            return;
        }
    };
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            entry = watch.next() => match entry {
                Some(Ok(e)) => match e.operation {
                    kv::Operation::Put => match serde_json::from_slice::<Timer>(&e.value) {
                        Ok(timer) => {
                            let due_ms = timer.fire_at_ms;
                            pending.insert(e.key.clone(), Pending { timer, revision: e.revision, due_ms, failures: 0 });
                        }
                        Err(error) => tracing::warn!(message = "A stored timer does not decode; it cannot fire.", key = %e.key, %error),
                    },
                    kv::Operation::Delete | kv::Operation::Purge => {
                        pending.remove(&e.key);
                    }
                },
                Some(Err(error)) => tracing::warn!(message = "Timer watch error.", %error),
                None => return,
            },
            _ = tick.tick() => {
                let now = Utc::now().timestamp_millis();
                for key in due(&pending, now) {
                    let Some(p) = pending.get_mut(&key) else { continue };
                    match fire(&js, &tracer, &p.timer).await {
                        Ok(()) => {
                            // Fired: the stored timer goes (unless it was
                            // replaced meanwhile: then the new one stays).
                            if let Err(error) = store.delete_expect_revision(&key, Some(p.revision)).await {
                                tracing::debug!(message = "Fired timer not deleted.", %key, %error);
                            }
                            pending.remove(&key);
                        }
                        Err(error @ TimerError::Conversation(_)) => {
                            tracing::error!(message = "A timer that can never fire is dropped.", %key, %error);
                            if let Err(error) = store.delete_expect_revision(&key, Some(p.revision)).await {
                                tracing::warn!(message = "Dropped timer not deleted.", %key, %error);
                            }
                            pending.remove(&key);
                        }
                        Err(error) => {
                            p.failures += 1;
                            p.due_ms = now + retry_after_ms(p.failures);
                            tracing::warn!(message = "Timer not fired; will retry.", %key, failures = p.failures, %error);
                        }
                    }
                }
            }
        }
    }
}

/// A stored timer waiting to fire.
#[derive(Debug)]
struct Pending {
    timer: Timer,
    /// The revision fired (deleted after it, unless replaced meanwhile).
    revision: u64,
    /// When to (try to) fire it next, ms since the epoch.
    due_ms: i64,
    /// Failed attempts so far.
    failures: u32,
}

/// The keys of the timers due at `now_ms`, the earliest first.
fn due(pending: &HashMap<String, Pending>, now_ms: i64) -> Vec<String> {
    let mut due: Vec<(i64, &String)> =
        pending.iter().filter(|(_, p)| p.due_ms <= now_ms).map(|(k, p)| (p.due_ms, k)).collect();
    due.sort();
    due.into_iter().map(|(_, k)| k.clone()).collect()
}

/// Back-off after `failures` failed attempts: 200 ms doubling, 10 s at most.
fn retry_after_ms(failures: u32) -> i64 {
    (100i64 << failures.min(7)).min(10_000)
}

async fn fire(
    js: &async_nats::jetstream::Context,
    tracer: &conv_telemetry::Tracer,
    timer: &Timer,
) -> Result<(), TimerError> {
    let conversation = ConversationId::parse(&timer.conversation_id)?;
    let correlation = timer.correlation_id.clone().unwrap_or_else(|| timer.directive_id.clone());
    let event = Envelope::service(
        format!("{}.timer.{}.fired", timer.conversation_id, timer.timer_id),
        crate::executor::SOURCE,
        conversation,
        TimerFired { timer_id: timer.timer_id.clone() },
    )
    .with_time(Utc::now());
    // The ids come from a decoded directive, so they are valid; if a stored
    // timer says otherwise, a fire without its trace link beats no fire.
    let event = match event.clone().with_causation(Some(timer.directive_id.clone()), Some(correlation)) {
        Ok(linked) => linked,
        Err(error) => {
            tracing::warn!(message = "Timer fires without its cause: the stored ids are invalid.", %error);
            event
        }
    };
    let span = tracer.event(&event, None, std::time::SystemTime::now());
    let appended = conv_nats::journal::append(
        js,
        &event,
        &conv_contracts::trust::derived_msg_id(event.conversation_id(), event.id()),
        &[],
        Duration::from_secs(5),
    )
    .await?;
    if let Some(span) = span.filter(|_| !appended.duplicate) {
        tracer.finish(span.attr(conv_telemetry::attr::STREAM_SEQ, appended.seq));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(at: i64) -> Pending {
        let timer = Timer {
            conversation_id: "c1".into(),
            timer_id: format!("t{at}"),
            fire_at_ms: at,
            directive_id: "d1".into(),
            correlation_id: None,
        };
        Pending { timer, revision: 1, due_ms: at, failures: 0 }
    }

    #[test]
    fn due_timers_come_earliest_first_and_a_retry_waits_its_back_off() {
        let mut all: HashMap<String, Pending> = [300, 100, 200, 900].map(|t| (format!("k{t}"), pending(t))).into();
        assert_eq!(due(&all, 50), Vec::<String>::new());
        assert_eq!(due(&all, 300), vec!["k100", "k200", "k300"]);
        // A failed attempt at 300 moves the timer back by its back-off.
        let p = all.get_mut("k100").expect("k100");
        p.failures = 1;
        p.due_ms = 300 + retry_after_ms(1);
        assert_eq!(due(&all, 300), vec!["k200", "k300"]);
        assert_eq!(due(&all, 500), vec!["k200", "k300", "k100"]);
        assert_eq!(due(&all, 1_000).len(), 4);
    }

    #[test]
    fn back_off_doubles_up_to_ten_seconds() {
        let steps: Vec<i64> = (1..=9).map(retry_after_ms).collect();
        assert_eq!(steps, vec![200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]);
    }
}

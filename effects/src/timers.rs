//! Durable timers in the `conv_timers` bucket.
//!
//! `conv.effect.timer.scheduled` stores `{conversation_id, timer_id,
//! fire_at_ms}` under `<conversation>.<timer id>`;
//! `conv.effect.timer.cancel_requested` deletes it. Every effects instance
//! watches the bucket and fires what is due: it journals
//! `conv.in.timer.fired` (id `<conversation>.timer.<id>.fired`, so instances
//! that fire the same timer at once produce one event) and then deletes the
//! key with its revision. Timers live in JetStream, so they survive restarts
//! of every effects instance.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::Utc;
use conv_contracts::payload::TimerFired;
use conv_contracts::{ConversationId, Envelope};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A stored timer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub conversation_id: String,
    pub timer_id: String,
    /// Unix milliseconds.
    pub fire_at_ms: i64,
    /// The directive that scheduled it (the fired event's cause).
    pub directive_id: String,
    /// The directive's causal chain (the fired event stays in its trace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

pub fn key(conversation: &str, timer_id: &str) -> String {
    format!("{conversation}.{timer_id}")
}

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
    let mut pending: HashMap<String, (Timer, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            entry = watch.next() => match entry {
                Some(Ok(e)) => match e.operation {
                    kv::Operation::Put => {
                        if let Ok(t) = serde_json::from_slice::<Timer>(&e.value) {
                            pending.insert(e.key.clone(), (t, e.revision));
                        }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        pending.remove(&e.key);
                    }
                },
                Some(Err(error)) => tracing::warn!(message = "Timer watch error.", %error),
                None => return,
            },
            _ = tick.tick() => {
                let now = Utc::now().timestamp_millis();
                let due: Vec<(String, Timer, u64)> = pending
                    .iter()
                    .filter(|(_, (t, _))| t.fire_at_ms <= now)
                    .map(|(k, (t, r))| (k.clone(), t.clone(), *r))
                    .collect();
                for (k, timer, revision) in due {
                    if fire(&js, &tracer, &timer).await.is_ok() {
                        let _ = store.delete_expect_revision(&k, Some(revision)).await;
                        pending.remove(&k);
                    }
                }
            }
        }
    }
}

async fn fire(
    js: &async_nats::jetstream::Context,
    tracer: &conv_telemetry::Tracer,
    timer: &Timer,
) -> Result<(), TimerError> {
    let conversation = ConversationId::parse(&timer.conversation_id)?;
    let mut event = Envelope::new(
        format!("{}.timer.{}.fired", timer.conversation_id, timer.timer_id),
        crate::executor::SOURCE,
        conversation,
        TimerFired { timer_id: timer.timer_id.clone() },
    )
    .with_time(Utc::now());
    event.causation_id = Some(timer.directive_id.clone());
    event.correlation_id = timer.correlation_id.clone().or_else(|| Some(timer.directive_id.clone()));
    let span = tracer.event(&event, None, std::time::SystemTime::now());
    let appended = conv_nats::journal::append(
        js,
        &event,
        &conv_contracts::trust::derived_msg_id(&event.conversation_id, &event.id),
        &[],
        Duration::from_secs(5),
    )
    .await?;
    if let Some(span) = span.filter(|_| !appended.duplicate) {
        tracer.finish(span.attr(conv_telemetry::attr::STREAM_SEQ, appended.seq));
    }
    Ok(())
}

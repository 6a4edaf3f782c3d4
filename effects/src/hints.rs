//! Cancel hints (`conv.live.cancel.<conversation>`, sent by the runtime the
//! moment it reads an abort or stop) on a thread and a NATS connection of
//! their own (a lane, [`conv_nats::lane`]).
//!
//! In an abort storm the service's tokio runtime has a thousand streams to
//! wind up and their `canceled` events to journal; a hint read there waited
//! behind all of them (effects saw hints up to ~600 ms after the runtime
//! sent them, the bench ~200 ms). Here a hint stops its effect through the
//! registry at once, and is then handed to the serve loop, which takes a
//! directive still queued for a slot out of the queue (a running effect is
//! counted once: the registry stops it the first time only).

use std::sync::Arc;

use conv_contracts::Envelope;
use conv_contracts::payload::CancelRequested;
use conv_nats::connect::NatsConfig;
use conv_nats::lane::{Lane, LaneError};
use futures::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;

/// A hint as the cancel directive it anticipates.
pub type Hint = (Envelope, CancelRequested);

/// The hint listener: a task on a lane of its own.
#[derive(Debug)]
pub struct Listener {
    lane: Lane,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Its own connection (a readiness check of the service).
    pub fn client(&self) -> &async_nats::Client {
        &self.lane.client
    }

    /// Waits for the listener to end (after `shutdown`), then stops its lane.
    pub async fn join(self) {
        let _ = self.task.await;
        self.lane.stop().await;
    }
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("the hint listener's lane: {0}")]
    Lane(#[from] LaneError),
    #[error("cannot subscribe to the cancel hints: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// Starts the listener: every hint stops its effect through `executor`'s
/// registry, then goes to `forward` (the serve loop), until `shutdown`.
pub async fn spawn(
    nats: &NatsConfig,
    executor: Arc<Executor>,
    forward: UnboundedSender<Hint>,
    shutdown: CancellationToken,
) -> Result<Listener, ListenError> {
    let lane = Lane::start(nats, "conv-effects-hints").await?;
    let mut hints = lane.client.subscribe(conv_contracts::subject::live_cancel_filter()).await?;
    // Once the server has the subscription (2 s at most: a hint sent
    // before is lost, and its directive still cancels, later).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), lane.client.flush()).await;
    let task = lane.spawn(async move {
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = hints.next() => m,
            };
            let Some(m) = m else { break };
            if let Some(hint) = crate::hint_directive(&m.subject, &m.payload) {
                executor.cancel(&hint.0, &hint.1);
                if forward.send(hint).is_err() {
                    break;
                }
            }
        }
        if !shutdown.is_cancelled() {
            tracing::error!(message = "The cancel hint listener stopped; cancels now wait for their directives.");
        }
    });
    Ok(Listener { lane, task })
}

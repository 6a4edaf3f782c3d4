//! Cancel hints (`conv.live.cancel.<conversation>`, sent by the runtime the
//! moment it reads an abort or stop) on a thread and a NATS connection of
//! their own.
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
use futures::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;

/// A hint as the cancel directive it anticipates.
pub type Hint = (Envelope, CancelRequested);

/// The hint listener's thread and connection.
#[derive(Debug)]
pub struct Listener {
    /// Its own connection (a readiness check of the service).
    pub client: async_nats::Client,
    thread: std::thread::JoinHandle<()>,
}

impl Listener {
    /// Waits for the thread to end (after `shutdown`).
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// No thread (the process is out of threads or memory).
    #[error("cannot start the hint listener's thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the hint listener's connection: {source}")]
    Connect {
        #[from]
        source: conv_nats::connect::ConnectError,
    },
    #[error("cannot subscribe to the cancel hints: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The thread ended before it said whether it started.
    #[error("the hint listener stopped before it was ready")]
    Gone,
}

/// Starts the listener: every hint stops its effect through `executor`'s
/// registry, then goes to `forward` (the serve loop), until `shutdown`.
pub async fn spawn(
    nats: &NatsConfig,
    executor: Arc<Executor>,
    forward: UnboundedSender<Hint>,
    shutdown: CancellationToken,
) -> Result<Listener, ListenError> {
    let (ready, started) = tokio::sync::oneshot::channel::<Result<async_nats::Client, ListenError>>();
    let nats = nats.clone();
    let thread = std::thread::Builder::new().name("conv-effects-hints".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        runtime.block_on(async move {
            let (client, mut hints) = match subscribe(&nats).await {
                Ok(subscribed) => subscribed,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(client));
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
        // A DNS lookup of a reconnect in progress must not hold the stop.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    })?;
    let client = started.await.map_err(|_| ListenError::Gone)??;
    Ok(Listener { client, thread })
}

/// The listener's connection, subscribed to the hints once the server has
/// the subscription (2 s at most: a hint sent before is lost, and its
/// directive still cancels, later).
async fn subscribe(nats: &NatsConfig) -> Result<(async_nats::Client, async_nats::Subscriber), ListenError> {
    let client = conv_nats::connect::connect_lazy(nats, "conv-effects-hints").await?;
    let hints = client.subscribe(conv_contracts::subject::live_cancel_filter()).await?;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await;
    Ok((client, hints))
}

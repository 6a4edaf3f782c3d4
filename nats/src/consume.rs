//! The shared consume loop with conv's ack discipline.
//!
//! * `Ok(())` from the handler → **ack**, confirmed by the server (the handler returns only after its
//!   effect is durable, so the ack is the checkpoint);
//! * [`HandlerError::Transient`] → **nak** with a jittered exponential delay
//!   that grows with the delivery count; after `max_deliver` deliveries the
//!   server emits a MAX_DELIVERIES advisory that `CONV_DLQ` captures;
//! * [`HandlerError::Poison`] → **term** with the reason (`+TERM <reason>`),
//!   which the server reports as a MSG_TERMINATED advisory, also captured by
//!   `CONV_DLQ`; other messages keep flowing;
//! * while a handler runs longer than `progress_every`, **progress** (`+WPI`)
//!   is sent so the message is not redelivered under it.
//!
//! Messages are handled one at a time, in delivery order.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message;
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// What went wrong while handling a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (NATS timeout, a dependency briefly down).
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (invalid event): terminate it into the DLQ.
    #[error("poison: {0}")]
    Poison(String),
}

/// Tuning of [`run`].
#[derive(Debug, Clone)]
pub struct Options {
    /// First nak delay.
    pub nak_min: Duration,
    /// Largest nak delay.
    pub nak_max: Duration,
    /// Interval of progress acks while a handler runs (keep it well below the consumer's ack wait).
    pub progress_every: Duration,
    /// Wait for the server to confirm each ack (one round trip per message),
    /// so a counted ack is a stored checkpoint.
    pub confirm_acks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nak_min: Duration::from_millis(200),
            nak_max: Duration::from_secs(30),
            progress_every: Duration::from_secs(10),
            confirm_acks: true,
        }
    }
}

impl Options {
    /// The nak delay for a message delivered `delivered` times (1 = first delivery).
    pub fn nak_delay(&self, delivered: i64) -> Duration {
        let attempt = usize::try_from(delivered.max(1) - 1).unwrap_or(usize::MAX);
        ExponentialBuilder::default()
            .with_min_delay(self.nak_min)
            .with_max_delay(self.nak_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt.min(64))
            .unwrap_or(self.nak_max)
    }
}

/// Counts of what [`run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub acked: u64,
    pub naked: u64,
    pub termed: u64,
    /// Errors from the message stream or from sending acks (logged, not fatal).
    pub errors: u64,
}

/// Terminates a message with a reason (`+TERM <reason>`, nats-server ≥ 2.10.4).
pub async fn term_with_reason(message: &Message, reason: &str) -> Result<(), async_nats::Error> {
    let Some(reply) = message.reply.clone() else {
        return Err("message has no reply subject; it was not delivered by a JetStream consumer".into());
    };
    // The reason travels on one line; keep it short and printable.
    let reason: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).take(256).collect();
    message.context.client().publish(reply, Bytes::from(format!("+TERM {reason}"))).await?;
    Ok(())
}

/// Runs `handler` over `messages` until the stream ends or `shutdown` fires.
/// The message being handled when shutdown fires is finished first.
pub async fn run<S, E, H, Fut>(mut messages: S, mut handler: H, options: Options, shutdown: CancellationToken) -> Stats
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
    H: FnMut(Message) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    let mut stats = Stats::default();
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = messages.next() => next,
        };
        let message = match next {
            None => break,
            Some(Err(error)) => {
                stats.errors += 1;
                tracing::warn!(message = "Consumer stream error.", %error);
                continue;
            }
            Some(Ok(message)) => message,
        };
        let (stream_seq, delivered) = message.info().map(|i| (i.stream_sequence, i.delivered)).unwrap_or((0, 1));
        let outcome = with_progress(&message, options.progress_every, handler(message.clone())).await;
        let sent = match outcome {
            Ok(()) if options.confirm_acks => message.double_ack().await.map(|()| stats.acked += 1),
            Ok(()) => message.ack().await.map(|()| stats.acked += 1),
            Err(HandlerError::Transient(reason)) => {
                stats.naked += 1;
                let delay = options.nak_delay(delivered);
                tracing::warn!(message = "Handler failed; will retry.", %reason, stream_seq, delivered, delay_ms = delay.as_millis() as u64);
                message.ack_with(AckKind::Nak(Some(delay))).await
            }
            Err(HandlerError::Poison(reason)) => {
                stats.termed += 1;
                tracing::warn!(message = "Poison message terminated.", %reason, stream_seq);
                term_with_reason(&message, &reason).await
            }
        };
        if let Err(error) = sent {
            stats.errors += 1;
            tracing::warn!(message = "Failed to ack.", %error, stream_seq);
        }
    }
    stats
}

/// Sends `kind` (a nak, progress, …) for `message`; a failure is logged with
/// the message's stream sequence and `what` was meant (the server
/// redelivers the message after its ack wait, so nothing is lost).
pub async fn settle(message: &Message, kind: AckKind, what: &str) {
    if let Err(error) = message.ack_with(kind).await {
        let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        tracing::debug!(message = "Could not settle a message; it will be redelivered.", what, stream_seq, %error);
    }
}

/// [`term_with_reason`], its failure logged: the message is then
/// redelivered and terminated again.
pub async fn term_or_log(message: &Message, reason: &str) {
    if let Err(error) = term_with_reason(message, reason).await {
        let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        tracing::warn!(message = "Could not terminate a message; it will be redelivered.", reason, stream_seq, %error);
    }
}

/// Runs `work` for `message`, sending progress (`+WPI`) every `every`
/// while it runs so the message is not redelivered under it: what every
/// consume loop of conv does with a message it is working on (this one, the
/// effects admission loop). A progress that fails is logged; the work goes
/// on (at worst the message is redelivered, and handled idempotently).
pub async fn with_progress<T>(message: &Message, every: Duration, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            outcome = &mut work => return outcome,
            _ = ticker.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                    tracing::warn!(message = "Failed to send progress.", %error, stream_seq);
                }
            }
        }
    }
}

/// Like [`run`], but every message is first decoded and validated as a conv
/// event on the subject it arrived on (either content mode). An invalid one
/// never reaches `handler`: it is terminated with `<code>: <reason>` and so
/// dead-lettered, and the loop goes on with the next message. This is how
/// events published straight to NATS by third parties are checked again.
pub async fn run_validated<S, E, H, Fut>(
    messages: S,
    mut handler: H,
    options: Options,
    limits: conv_contracts::Limits,
    shutdown: CancellationToken,
) -> Stats
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
    H: FnMut(conv_contracts::Envelope, Message) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    run(
        messages,
        move |message: Message| {
            let decoded =
                crate::headers::decode(message.subject.as_str(), message.headers.as_ref(), &message.payload, limits);
            let work = decoded.map(|event| handler(event, message));
            async move {
                match work {
                    Ok(work) => work.await,
                    Err(rejection) => Err(HandlerError::Poison(format!("{}: {rejection}", rejection.code()))),
                }
            }
        },
        options,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nak_delay_grows_and_is_capped() {
        let o = Options { nak_min: Duration::from_millis(100), nak_max: Duration::from_secs(2), ..Default::default() };
        let first = o.nak_delay(1);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200), "{first:?}");
        let later = o.nak_delay(4);
        assert!(later >= Duration::from_millis(800), "{later:?}");
        assert!(o.nak_delay(1000) <= Duration::from_secs(4), "jitter stays bounded");
    }
}

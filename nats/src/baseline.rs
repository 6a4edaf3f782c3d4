//! The raw JetStream baseline that every benchmark reports its ratios
//! against, measured on the same server in the same run: async publish
//! with a window of outstanding acks, and one consumer's consume + ack.

use std::time::Instant;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use bytes::Bytes;
use futures::StreamExt;

/// Why a baseline could not be measured.
#[derive(Debug, thiserror::Error)]
#[error("raw JetStream baseline: {what}: {source}")]
pub struct BaselineError {
    what: &'static str,
    #[source]
    source: async_nats::Error,
}

fn failed<E: Into<async_nats::Error>>(what: &'static str) -> impl FnOnce(E) -> BaselineError {
    move |e| BaselineError { what, source: e.into() }
}

/// How the consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// `ack`: sent, not waited for (the fastest one consumer goes).
    Sent,
    /// `double_ack`: waits for the server's confirmation (what a partition
    /// worker does).
    Confirmed,
}

/// Creates the stream `name` on `<subject>.>` (if needed) and publishes `n`
/// messages of `body` to `<subject>.<i % 64>`, at most `window` acks
/// outstanding; returns messages per second.
pub async fn publish(
    js: &async_nats::jetstream::Context,
    name: &str,
    subject: &str,
    n: usize,
    body: Bytes,
    window: usize,
) -> Result<f64, BaselineError> {
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{subject}.>")],
        ..Default::default()
    })
    .await
    .map_err(failed("create the stream"))?;
    let started = Instant::now();
    let mut acks = Vec::with_capacity(window);
    for i in 0..n {
        acks.push(js.publish(format!("{subject}.{}", i % 64), body.clone()).await.map_err(failed("publish"))?);
        if acks.len() >= window.max(1) {
            for a in acks.drain(..) {
                a.await.map_err(failed("publish ack"))?;
            }
        }
    }
    for a in acks {
        a.await.map_err(failed("publish ack"))?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Consumes and acks `n` messages of stream `name` with a fresh durable
/// consumer `durable` (deleted after); returns messages per second.
pub async fn consume(
    js: &async_nats::jetstream::Context,
    name: &str,
    durable: &str,
    n: usize,
    ack: Ack,
) -> Result<f64, BaselineError> {
    let stream = js.get_stream(name).await.map_err(failed("get the stream"))?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .map_err(failed("create the consumer"))?;
    let mut messages = consumer.stream().max_messages_per_batch(1000).messages().await.map_err(failed("consume"))?;
    let started = Instant::now();
    for _ in 0..n {
        let m = messages
            .next()
            .await
            .ok_or_else(|| failed("consume")(std::io::Error::other("the stream ended")))?
            .map_err(failed("consume"))?;
        match ack {
            Ack::Sent => m.ack().await.map_err(failed("ack"))?,
            Ack::Confirmed => m.double_ack().await.map_err(failed("ack"))?,
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stream.delete_consumer(durable).await.map_err(failed("delete the consumer"))?;
    Ok(rate)
}

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

/// The shortest path an abort can take to effects, measured raw: `n`
/// messages published together to a fresh stream (`<name>`, subjects
/// `<subject>.<p>.<i>`), read by `partitions` pull consumers (as many as the
/// runtime has control readers, `batch` messages per pull), each message
/// answered by a core-NATS publish on `<subject>-hint.<i>` the moment its
/// consumer gets it, and that answer seen by a subscriber on `observer`.
///
/// Returns each message's latency in ms, sorted: from just before its
/// publish to its answer seen. No conv code is on this path, so it is the
/// floor for "abort sent → cancel hint seen" on the same server under the
/// same load.
pub async fn storm(
    client: &async_nats::Client,
    observer: &async_nats::Client,
    name: &str,
    subject: &str,
    n: usize,
    partitions: u16,
    batch: usize,
) -> Result<Vec<f64>, BaselineError> {
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{subject}.>")],
            ..Default::default()
        })
        .await
        .map_err(failed("create the stream"))?;
    let mut hints = observer.subscribe(format!("{subject}-hint.*")).await.map_err(failed("subscribe"))?;
    observer.flush().await.map_err(failed("subscribe"))?;
    let partitions = partitions.max(1);
    let mut readers = tokio::task::JoinSet::new();
    for p in 0..partitions {
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("storm-{p}")),
                filter_subject: format!("{subject}.{p}.*"),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .map_err(failed("create a consumer"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(batch.max(1))
            .expires(std::time::Duration::from_secs(2))
            .messages()
            .await
            .map_err(failed("consume"))?;
        let client = client.clone();
        let hint = format!("{subject}-hint");
        readers.spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                let i = m.subject.rsplit('.').next().unwrap_or_default().to_owned();
                let _ = client.publish(format!("{hint}.{i}"), Bytes::new()).await;
                let _ = m.ack().await;
            }
        });
    }
    // Let every reader's first pull reach the server.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut sent = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        sent.push(Instant::now());
        let p = i % usize::from(partitions);
        acks.push(
            js.publish(format!("{subject}.{p}.{i}"), Bytes::from_static(b"{}")).await.map_err(failed("publish"))?,
        );
    }
    for a in acks {
        a.await.map_err(failed("publish ack"))?;
    }
    let mut latencies = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while latencies.len() < n {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, hints.next()).await else {
            break;
        };
        if let Some(i) = m.subject.rsplit('.').next().and_then(|i| i.parse::<usize>().ok())
            && i < n
            && !seen[i]
        {
            seen[i] = true;
            latencies.push(sent[i].elapsed().as_secs_f64() * 1000.0);
        }
    }
    readers.abort_all();
    let _ = js.delete_stream(name).await;
    if latencies.len() < n {
        return Err(failed("storm")(std::io::Error::other(format!(
            "{} of {n} answers seen within 30 s",
            latencies.len()
        ))));
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok(latencies)
}

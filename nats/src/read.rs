//! Reading stored messages back in stream order (for replay, trace and
//! operator tools), with an ordered consumer that ends at the last match.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures::StreamExt;

/// Why stored messages could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("stream {stream}: {source}")]
    Stream { stream: String, source: jetstream::context::GetStreamError },
    #[error("reading {stream}: {source}")]
    Consumer { stream: String, source: jetstream::stream::ConsumerError },
    #[error("reading {stream}: {source}")]
    Messages { stream: String, source: jetstream::consumer::StreamError },
    #[error("reading {stream}: {source}")]
    Message { stream: String, source: jetstream::consumer::pull::OrderedError },
    #[error("reading {stream}: a message without JetStream metadata: {detail}")]
    Metadata { stream: String, detail: String },
    #[error("reading {stream} timed out")]
    TimedOut { stream: String },
    #[error("start time out of range: {0}")]
    StartTime(#[from] time::error::ComponentRange),
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    pub headers: HeaderMap,
    /// Empty when read with `headers_only`.
    pub payload: Bytes,
    /// When the server stored it.
    pub stored_at: time::OffsetDateTime,
}

impl Stored {
    /// First value of a header, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::headers::header(&self.headers, name)
    }
}

/// Every message of `stream` matching `filter` (empty: all), oldest first.
pub async fn all(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    headers_only: bool,
) -> Result<Vec<Stored>, ReadError> {
    from(js, stream, filter, 0, headers_only).await
}

/// Every message of `stream` matching `filter` stored at or after sequence
/// `start` (0: from the first), oldest first.
pub async fn from(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    start: u64,
    headers_only: bool,
) -> Result<Vec<Stored>, ReadError> {
    let deliver_policy =
        if start > 1 { DeliverPolicy::ByStartSequence { start_sequence: start } } else { DeliverPolicy::All };
    read(js, stream, filter, deliver_policy, headers_only).await
}

/// Every message of `stream` matching `filter` stored at or after `start`
/// (by the server's clock), oldest first: what happened lately, without
/// reading a long history.
pub async fn since(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    start: chrono::DateTime<chrono::Utc>,
    headers_only: bool,
) -> Result<Vec<Stored>, ReadError> {
    let nanos = i128::from(start.timestamp_nanos_opt().unwrap_or_default());
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)?;
    stored_since(js, stream, filter, start_time, headers_only).await
}

/// [`since`] with the server's own time type (a stored message's `time`).
pub async fn stored_since(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    start_time: time::OffsetDateTime,
    headers_only: bool,
) -> Result<Vec<Stored>, ReadError> {
    read(js, stream, filter, DeliverPolicy::ByStartTime { start_time }, headers_only).await
}

async fn read(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    deliver_policy: DeliverPolicy,
    headers_only: bool,
) -> Result<Vec<Stored>, ReadError> {
    let named = || stream.to_owned();
    let s = js.get_stream_no_info(stream).await.map_err(|source| ReadError::Stream { stream: named(), source })?;
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy,
            headers_only,
            ..Default::default()
        })
        .await
        .map_err(|source| ReadError::Consumer { stream: named(), source })?;
    let mut remaining = consumer.cached_info().num_pending;
    let mut out = Vec::with_capacity(usize::try_from(remaining).unwrap_or(0));
    if remaining == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|source| ReadError::Messages { stream: named(), source })?;
    while remaining > 0 {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| ReadError::TimedOut { stream: named() })?;
        let Some(m) = next else { break };
        let m = m.map_err(|source| ReadError::Message { stream: named(), source })?;
        let info = m.info().map_err(|e| ReadError::Metadata { stream: named(), detail: e.to_string() })?;
        remaining = info.pending;
        let seq = info.stream_sequence;
        out.push(Stored {
            stream: stream.to_owned(),
            seq,
            subject: m.subject.to_string(),
            headers: m.headers.clone().unwrap_or_default(),
            payload: m.payload.clone(),
            stored_at: info.published,
        });
    }
    Ok(out)
}

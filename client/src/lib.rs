//! # conv-client
//!
//! The one client of a conversation's stream (`GET
//! /v1/conversations/{id}/stream`, server-sent events), for `convctl send`,
//! `convctl bench` and the tests: [`EventStream::open`] connects (with a
//! client key and a `Last-Event-ID` when given) and [`EventStream::next`]
//! yields each event with its SSE id and its type parsed into an
//! [`EventType`]. Comments (heartbeats) are skipped, and so are events of a
//! type this build does not know (a newer server), so a reader never
//! matches on type strings.

use bytes::Bytes;
use conv_contracts::EventType;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The SSE id: the position to resume after (`Last-Event-ID`).
    pub id: Option<String>,
    pub ty: EventType,
    /// The event as the server sent it (a CloudEvent in JSON).
    pub raw: Value,
}

impl Event {
    /// The event's `data`.
    pub fn data(&self) -> &Value {
        &self.raw["data"]
    }

    /// `causationid`: the event that caused this one.
    pub fn causation_id(&self) -> Option<&str> {
        self.raw["causationid"].as_str()
    }
}

/// Why the stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("projections does not answer at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("projections answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the stream broke: {0}")]
    Broken(#[source] reqwest::Error),
}

/// A conversation's stream of events.
pub struct EventStream {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: String,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").field("buffered", &self.buf.len()).finish()
    }
}

impl EventStream {
    /// Opens the stream of `conversation` at projections' `base` URL
    /// (`http://host:port`), after `last_event_id` when given, with the
    /// client `key` when given.
    pub async fn open(
        http: &reqwest::Client,
        base: &str,
        conversation: &str,
        last_event_id: Option<&str>,
        key: Option<&str>,
    ) -> Result<EventStream, Error> {
        let url = format!("{}/v1/conversations/{conversation}/stream", base.trim_end_matches('/'));
        let mut request = http.get(&url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|source| Error::Unreachable { url, source })?;
        let status = response.status();
        if !status.is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or_default().to_owned();
            return Err(Error::Refused { status: status.as_u16(), message });
        }
        Ok(EventStream::from_body(response.bytes_stream().boxed()))
    }

    /// Reads events from an SSE body (for a body fetched otherwise).
    pub fn from_body(body: BoxStream<'static, reqwest::Result<Bytes>>) -> EventStream {
        EventStream { body, buf: String::new() }
    }

    /// The next event; `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                if let Some(event) = parse(&frame) {
                    return Some(Ok(event));
                }
            }
            match self.body.next().await? {
                Ok(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Err(e) => return Some(Err(Error::Broken(e))),
            }
        }
    }
}

/// One SSE frame → an event (`None`: a comment, or a type not known here).
fn parse(frame: &str) -> Option<Event> {
    let (mut id, mut ty, mut data) = (None, None, String::new());
    for line in frame.lines() {
        let field = |name: &str| line.strip_prefix(name).map(|v| v.strip_prefix(' ').unwrap_or(v));
        if let Some(v) = field("id:") {
            id = Some(v.to_owned());
        } else if let Some(v) = field("event:") {
            ty = Some(v.to_owned());
        } else if let Some(v) = field("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v);
        }
    }
    let raw: Value = serde_json::from_str(&data).ok()?;
    let ty = ty.or_else(|| raw["type"].as_str().map(str::to_owned))?.parse::<EventType>().ok()?;
    Some(Event { id, ty, raw })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_become_typed_events_whatever_the_chunking() {
        let (delta, status) = (EventType::OutMessageDelta.as_str(), EventType::OutRunStatus.as_str());
        let future = format!("{delta}_from_a_newer_server");
        let text = format!(
            ": heartbeat\n\n\
             id: 3\nevent: {delta}\ndata: {{\"type\":\"{delta}\",\"data\":{{\"text\":\"hi\"}}}}\n\n\
             id: 4\nevent: {future}\ndata: {{}}\n\n\
             id:5\nevent:{status}\ndata:{{\"data\":{{\"status\":\"idle\"}},\"causationid\":\"u1\"}}\n\n"
        );
        // Split at every byte boundary: frames may arrive in any pieces.
        for cut in [1, 7, 40, text.len()] {
            let pieces: Vec<reqwest::Result<Bytes>> =
                text.as_bytes().chunks(cut).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let mut s = EventStream::from_body(futures::stream::iter(pieces).boxed());
            let first = s.next().await.expect("one").expect("ok");
            assert_eq!((first.id.as_deref(), first.ty), (Some("3"), EventType::OutMessageDelta));
            assert_eq!(first.data()["text"], "hi");
            let second = s.next().await.expect("two").expect("ok");
            assert_eq!(
                (second.id.as_deref(), second.ty),
                (Some("5"), EventType::OutRunStatus),
                "unknown types skipped"
            );
            assert_eq!(second.causation_id(), Some("u1"));
            assert!(s.next().await.is_none());
        }
    }
}

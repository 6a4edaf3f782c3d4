//! # conv-client
//!
//! The one client of a conversation's stream (`GET
//! /v1/conversations/{id}/stream`, server-sent events), for `convctl send`,
//! `convctl bench` and the tests: [`EventStream::open`] connects (with a
//! client key and a `Last-Event-ID` when given) and [`EventStream::next`]
//! yields each event with its SSE id and its type parsed into an
//! [`EventType`] (`None` for a type this build does not know, from a newer
//! server: the event is still there, so nothing is lost and nobody matches
//! on type strings). Comments (heartbeats) are skipped. When the server
//! closes a reader that fell behind, [`EventStream::next`] says so
//! ([`Error::Closed`]) and [`EventStream::reconnect`] resumes after the
//! last event read. [`Text`] joins a reply's deltas as a reader shows them.

use bytes::Bytes;
use conv_contracts::EventType;
use conv_contracts::api::{STREAM_CLOSED, StreamClosed};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The SSE id: the position to resume after (`Last-Event-ID`).
    pub id: Option<String>,
    /// The type; `None` when this build does not know it.
    pub ty: Option<EventType>,
    /// The event as the server sent it (a CloudEvent in JSON).
    pub raw: Value,
}

impl Event {
    /// The event's `data`.
    pub fn data(&self) -> &Value {
        &self.raw["data"]
    }

    /// Whether the event is of type `ty`.
    pub fn is(&self, ty: EventType) -> bool {
        self.ty == Some(ty)
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
    /// The server ended the stream (the reader fell behind); reconnecting
    /// resumes it.
    #[error("the server closed the stream ({}): {}", .0.reason, .0.message)]
    Closed(StreamClosed),
    #[error("this stream was not opened by URL and cannot be reopened")]
    NotReopenable,
}

/// Where a stream was opened, to open it again.
#[derive(Debug, Clone)]
struct Origin {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
}

/// A conversation's stream of events.
pub struct EventStream {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    /// Bytes of frames not complete yet (a character may be split between
    /// two chunks: frames are decoded once whole).
    buf: Vec<u8>,
    last_id: Option<String>,
    origin: Option<Origin>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").field("buffered", &self.buf.len()).field("last_id", &self.last_id).finish()
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
        let origin = Origin {
            http: http.clone(),
            url: format!("{}/v1/conversations/{conversation}/stream", base.trim_end_matches('/')),
            key: key.map(str::to_owned),
        };
        let body = origin.connect(last_event_id).await?;
        Ok(EventStream { body, buf: Vec::new(), last_id: last_event_id.map(str::to_owned), origin: Some(origin) })
    }

    /// Reads events from an SSE body (for a body fetched otherwise; such a
    /// stream cannot [`reconnect`](Self::reconnect)).
    pub fn from_body(body: BoxStream<'static, reqwest::Result<Bytes>>) -> EventStream {
        EventStream { body, buf: Vec::new(), last_id: None, origin: None }
    }

    /// The id of the last event read (or the one the stream was opened
    /// after): where a reconnect resumes.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Opens the stream again after the last event read: nothing is read
    /// twice and nothing is missed.
    pub async fn reconnect(&mut self) -> Result<(), Error> {
        let origin = self.origin.as_ref().ok_or(Error::NotReopenable)?;
        self.body = origin.connect(self.last_id.as_deref()).await?;
        self.buf.clear();
        Ok(())
    }

    /// The next event; `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                match parse(&String::from_utf8_lossy(&frame)) {
                    Frame::Event(event) => {
                        if event.id.is_some() {
                            self.last_id.clone_from(&event.id);
                        }
                        return Some(Ok(event));
                    }
                    Frame::Closed(why) => return Some(Err(Error::Closed(why))),
                    Frame::Skip => {}
                }
            }
            match self.body.next().await? {
                Ok(chunk) => self.buf.extend_from_slice(&chunk),
                Err(e) => return Some(Err(Error::Broken(e))),
            }
        }
    }
}

impl Origin {
    async fn connect(&self, last_event_id: Option<&str>) -> Result<BoxStream<'static, reqwest::Result<Bytes>>, Error> {
        let mut request = self.http.get(&self.url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|source| Error::Unreachable { url: self.url.clone(), source })?;
        let status = response.status();
        if !status.is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or_default().to_owned();
            return Err(Error::Refused { status: status.as_u16(), message });
        }
        Ok(response.bytes_stream().boxed())
    }
}

enum Frame {
    Event(Event),
    Closed(StreamClosed),
    /// A comment (heartbeat), or data that is not JSON.
    Skip,
}

/// One SSE frame.
fn parse(frame: &str) -> Frame {
    let (mut id, mut name, mut data) = (None, None, String::new());
    for line in frame.lines() {
        let field = |name: &str| line.strip_prefix(name).map(|v| v.strip_prefix(' ').unwrap_or(v));
        if let Some(v) = field("id:") {
            id = Some(v.to_owned());
        } else if let Some(v) = field("event:") {
            name = Some(v.to_owned());
        } else if let Some(v) = field("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v);
        }
    }
    if name.as_deref() == Some(STREAM_CLOSED) {
        let why =
            serde_json::from_str(&data).unwrap_or_else(|_| StreamClosed { reason: "unknown".into(), message: data });
        return Frame::Closed(why);
    }
    let Ok(raw) = serde_json::from_str::<Value>(&data) else { return Frame::Skip };
    let ty = name.as_deref().or_else(|| raw["type"].as_str()).and_then(|t| t.parse::<EventType>().ok());
    Frame::Event(Event { id, ty, raw })
}

/// A reply's text as a reader shows it: deltas appended, resets applied
/// (a reset cuts the text back to its offset; what follows replaces it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(pub String);

impl Text {
    /// Folds one event in; returns whether the text changed.
    pub fn apply(&mut self, event: &Event) -> bool {
        match event.ty {
            Some(EventType::OutMessageDelta) => {
                self.0.push_str(event.data()["text"].as_str().unwrap_or_default());
                true
            }
            Some(EventType::OutMessageReset) => {
                let offset = usize::try_from(event.data()["offset"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX);
                let mut cut = offset.min(self.0.len());
                while !self.0.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.0.truncate(cut);
                true
            }
            _ => false,
        }
    }

    /// The text of `events` joined.
    pub fn of<'a>(events: impl IntoIterator<Item = &'a Event>) -> String {
        let mut text = Text::default();
        for e in events {
            text.apply(e);
        }
        text.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(text: &str, cut: usize) -> BoxStream<'static, reqwest::Result<Bytes>> {
        let pieces: Vec<reqwest::Result<Bytes>> =
            text.as_bytes().chunks(cut).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures::stream::iter(pieces).boxed()
    }

    #[tokio::test]
    async fn frames_become_typed_events_whatever_the_chunking() {
        let (delta, status) = (EventType::OutMessageDelta.as_str(), EventType::OutRunStatus.as_str());
        let future = format!("{delta}_from_a_newer_server");
        // "é" and "→" are two and three bytes: some cuts split them.
        let text = format!(
            ": heartbeat\n\n\
             id: 3\nevent: {delta}\ndata: {{\"type\":\"{delta}\",\"data\":{{\"text\":\"café → ok\"}}}}\n\n\
             id: 4\nevent: {future}\ndata: {{\"data\":{{}}}}\n\n\
             id:5\nevent:{status}\ndata:{{\"data\":{{\"status\":\"idle\"}},\"causationid\":\"u1\"}}\n\n"
        );
        for cut in 1..=text.len() {
            let mut s = EventStream::from_body(body(&text, cut));
            let first = s.next().await.expect("one").expect("ok");
            assert_eq!((first.id.as_deref(), first.ty), (Some("3"), Some(EventType::OutMessageDelta)));
            assert_eq!(first.data()["text"], "café → ok", "cut every {cut} bytes");
            let unknown = s.next().await.expect("two").expect("ok");
            assert_eq!((unknown.id.as_deref(), unknown.ty), (Some("4"), None), "an unknown type is kept, untyped");
            let third = s.next().await.expect("three").expect("ok");
            assert_eq!((third.id.as_deref(), third.ty), (Some("5"), Some(EventType::OutRunStatus)));
            assert_eq!(third.causation_id(), Some("u1"));
            assert_eq!(s.last_event_id(), Some("5"));
            assert!(s.next().await.is_none());
        }
    }

    #[tokio::test]
    async fn a_closed_stream_says_why_and_where_to_resume() {
        let delta = EventType::OutMessageDelta.as_str();
        let closed = StreamClosed { reason: "lagged".into(), message: "fell 10 events behind".into() };
        let text = format!("id: 7:a1:5\nevent: {delta}\ndata: {{\"data\":{{\"text\":\"x\"}}}}\n\n{}", closed.frame());
        let mut s = EventStream::from_body(body(&text, 5));
        assert!(s.next().await.expect("one").expect("ok").is(EventType::OutMessageDelta));
        match s.next().await.expect("two") {
            Err(Error::Closed(why)) => assert_eq!(why, closed),
            other => panic!("expected Closed, got {other:?}"),
        }
        assert_eq!(s.last_event_id(), Some("7:a1:5"), "resume after the last event read");
        assert!(matches!(s.reconnect().await, Err(Error::NotReopenable)));
    }

    #[test]
    fn text_joins_deltas_and_applies_resets() {
        let ev = |ty: EventType, data: Value| Event { id: None, ty: Some(ty), raw: serde_json::json!({"data": data}) };
        let events = [
            ev(EventType::OutMessageDelta, serde_json::json!({"text": "héllo"})),
            ev(EventType::OutMessageDelta, serde_json::json!({"text": " wrld"})),
            ev(EventType::OutMessageReset, serde_json::json!({"offset": 6})),
            ev(EventType::OutMessageDelta, serde_json::json!({"text": " world"})),
            ev(EventType::OutRunStatus, serde_json::json!({"status": "idle"})),
        ];
        assert_eq!(Text::of(&events), "héllo world");
        // An offset inside a character cuts before it.
        let mut t = Text("é".into());
        assert!(t.apply(&ev(EventType::OutMessageReset, serde_json::json!({"offset": 1}))));
        assert_eq!(t.0, "");
    }
}

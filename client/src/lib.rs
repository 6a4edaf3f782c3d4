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
use conv_contracts::api::{ErrorBody, STREAM_CLOSED, StreamClosed};
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
    /// More than [`MAX_FRAME_BYTES`] without the end of a frame.
    #[error("the stream sent more than {MAX_FRAME_BYTES} bytes without ending a frame")]
    FrameTooLarge,
}

/// The longest frame read (an event is at most 1 MiB on the wire).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

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
    /// The last byte read was a CR (its LF, if it comes, is the same line end).
    after_cr: bool,
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
        Ok(EventStream {
            body,
            buf: Vec::new(),
            after_cr: false,
            last_id: last_event_id.map(str::to_owned),
            origin: Some(origin),
        })
    }

    /// Reads events from an SSE body (for a body fetched otherwise; such a
    /// stream cannot [`reconnect`](Self::reconnect)).
    pub fn from_body(body: BoxStream<'static, reqwest::Result<Bytes>>) -> EventStream {
        EventStream { body, buf: Vec::new(), after_cr: false, last_id: None, origin: None }
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
        self.after_cr = false;
        Ok(())
    }

    /// The next event; `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let (id, frame) = parse(&String::from_utf8_lossy(&frame));
                // Every frame with an id moves the resume point, events or not.
                if let Some(id) = id {
                    self.last_id = Some(id);
                }
                match frame {
                    Frame::Event(event) => return Some(Ok(event)),
                    Frame::Closed(why) => return Some(Err(Error::Closed(why))),
                    Frame::Skip => {}
                }
            }
            if self.buf.len() > MAX_FRAME_BYTES {
                return Some(Err(Error::FrameTooLarge));
            }
            match self.body.next().await? {
                Ok(chunk) => self.push(&chunk),
                Err(e) => return Some(Err(Error::Broken(e))),
            }
        }
    }

    /// Buffers `chunk` with its line ends made LF (SSE allows CRLF, LF, CR).
    fn push(&mut self, chunk: &[u8]) {
        for &b in chunk {
            match (b, self.after_cr) {
                (b'\n', true) => self.after_cr = false,
                (b'\r', _) => {
                    self.buf.push(b'\n');
                    self.after_cr = true;
                }
                (b, _) => {
                    self.buf.push(b);
                    self.after_cr = false;
                }
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
            let message = response.json::<ErrorBody>().await.map(|b| b.error.message).unwrap_or_default();
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

/// One SSE frame: its id (when it names one) and what it holds.
fn parse(frame: &str) -> (Option<String>, Frame) {
    let (mut id, mut name, mut data): (Option<String>, Option<String>, String) = (None, None, String::new());
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
    let id = id.filter(|i: &String| !i.is_empty());
    if name.as_deref() == Some(STREAM_CLOSED) {
        let why =
            serde_json::from_str(&data).unwrap_or_else(|_| StreamClosed { reason: "unknown".into(), message: data });
        return (id, Frame::Closed(why));
    }
    let Ok(raw) = serde_json::from_str::<Value>(&data) else { return (id, Frame::Skip) };
    let ty = name.as_deref().or_else(|| raw["type"].as_str()).and_then(|t| t.parse::<EventType>().ok());
    (id.clone(), Frame::Event(Event { id, ty, raw }))
}

/// The text of a reply's entries as a reader shows them: deltas appended
/// to their entry, resets applied to theirs (a reset cuts its entry back to
/// `offset` bytes; what follows replaces it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text {
    /// `(entry id, text)`, in the order the entries first streamed.
    entries: Vec<(String, String)>,
}

impl Text {
    /// Folds one event in; returns the id of the entry it changed.
    pub fn apply(&mut self, event: &Event) -> Option<&str> {
        let entry = event.data()["entry_id"].as_str().unwrap_or_default();
        let at = match self.entries.iter().position(|(id, _)| id == entry) {
            Some(at) => at,
            None if matches!(event.ty, Some(EventType::OutMessageDelta | EventType::OutMessageReset)) => {
                self.entries.push((entry.to_owned(), String::new()));
                self.entries.len() - 1
            }
            None => return None,
        };
        let text = &mut self.entries[at].1;
        match event.ty {
            Some(EventType::OutMessageDelta) => text.push_str(event.data()["text"].as_str().unwrap_or_default()),
            Some(EventType::OutMessageReset) => {
                let offset = usize::try_from(event.data()["offset"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX);
                let mut cut = offset.min(text.len());
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            _ => return None,
        }
        Some(&self.entries[at].0)
    }

    /// The text of entry `id` so far.
    pub fn of_entry(&self, id: &str) -> &str {
        self.entries.iter().find(|(e, _)| e == id).map_or("", |(_, t)| t.as_str())
    }

    /// The text of every entry of `events`, joined in the order they streamed.
    pub fn of<'a>(events: impl IntoIterator<Item = &'a Event>) -> String {
        let mut text = Text::default();
        for e in events {
            text.apply(e);
        }
        text.entries.into_iter().map(|(_, t)| t).collect()
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
    async fn any_line_end_and_any_frame_with_an_id_count() {
        let delta = EventType::OutMessageDelta.as_str();
        // CRLF line ends (a proxy's), a frame whose data is not JSON, an empty id.
        let text = format!(
            "id: 1\r\nevent: {delta}\r\ndata: {{\"data\":{{\"text\":\"a\"}}}}\r\n\r\n\
             id: 2\r\nevent: {delta}\r\ndata: not json\r\n\r\n\
             id:\revent: {delta}\rdata: {{\"data\":{{\"text\":\"b\"}}}}\r\r"
        );
        for cut in 1..=text.len() {
            let mut s = EventStream::from_body(body(&text, cut));
            let first = s.next().await.expect("one").expect("ok");
            assert_eq!((first.id.as_deref(), first.data()["text"].as_str()), (Some("1"), Some("a")), "cut {cut}");
            let second = s.next().await.expect("two").expect("ok");
            assert_eq!((second.id.as_deref(), second.data()["text"].as_str()), (None, Some("b")), "cut {cut}");
            assert_eq!(s.last_event_id(), Some("2"), "the skipped frame's id counts, the empty one does not");
            assert!(s.next().await.is_none());
        }
    }

    #[tokio::test]
    async fn a_frame_that_never_ends_is_refused() {
        let endless = futures::stream::iter((0..17).map(|_| Ok(Bytes::from(vec![b'x'; 1 << 20])))).boxed();
        let mut s = EventStream::from_body(endless);
        assert!(matches!(s.next().await, Some(Err(Error::FrameTooLarge))));
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
    fn text_joins_deltas_and_applies_resets_per_entry() {
        let ev = |ty: EventType, data: Value| Event { id: None, ty: Some(ty), raw: serde_json::json!({"data": data}) };
        let delta = |entry: &str, text: &str| {
            ev(EventType::OutMessageDelta, serde_json::json!({"entry_id": entry, "text": text}))
        };
        let reset = |entry: &str, offset: u64| {
            ev(EventType::OutMessageReset, serde_json::json!({"entry_id": entry, "offset": offset}))
        };
        let events = [
            delta("a1", "Let me look. "),
            delta("a2", "héllo"),
            delta("a2", " wrld"),
            // The offset counts from the start of its own entry.
            reset("a2", 6),
            delta("a2", " world"),
            ev(EventType::OutRunStatus, serde_json::json!({"status": "idle"})),
        ];
        assert_eq!(Text::of(&events), "Let me look. héllo world");
        let mut t = Text::default();
        for e in &events {
            t.apply(e);
        }
        assert_eq!((t.of_entry("a1"), t.of_entry("a2")), ("Let me look. ", "héllo world"));
        // An offset inside a character cuts before it.
        let mut t = Text::default();
        t.apply(&delta("a3", "é"));
        assert_eq!(t.apply(&reset("a3", 1)), Some("a3"));
        assert_eq!(t.of_entry("a3"), "");
        assert_eq!(t.apply(&events[5]), None, "other events change no text");
    }
}

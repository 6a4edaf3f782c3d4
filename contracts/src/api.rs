//! The bodies of the HTTP API (the ingress and projections endpoints of the
//! brief) that are not events: the 202 answer, the error body, the timeline
//! view, and the stream's closing frame. Servers serialize these types and
//! clients (`conv-client`, `convctl`, the console's tests) read them, so a
//! field spelled here is spelled once.

use serde::{Deserialize, Serialize};

use crate::payload::{EntryRole, EntryStatus, RunStatus};

/// The answer to an accepted event (`202 Accepted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub event_id: String,
    pub conversation_id: String,
    /// Where the event is in `CONV_IN` (the first copy's, for a duplicate).
    pub stream_seq: u64,
    /// The event was already accepted: nothing was appended this time.
    pub duplicate: bool,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine `code` and words for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { code: code.into(), message: message.into() } }
    }
}

/// One entry of a timeline: a message, a tool call or a system notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub role: EntryRole,
    pub text: String,
    pub status: EntryStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<String>,
}

/// What `GET /v1/conversations/{id}/timeline` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub conversation_id: String,
    pub run_status: RunStatus,
    pub entries: Vec<Entry>,
    /// Output position of the last event folded in: the view is the fold of
    /// positions 1..=position (a stream reader can resume after it).
    pub position: u64,
}

/// The SSE event name of the stream's last frame when the server closes a
/// reader (it fell too far behind); its data is a [`StreamClosed`].
pub const STREAM_CLOSED: &str = "conv.stream.closed";

/// Why the server closed a stream; reconnecting with `Last-Event-ID`
/// resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamClosed {
    /// `lagged`: the reader fell more than the server buffers behind.
    pub reason: String,
    pub message: String,
}

impl StreamClosed {
    /// The SSE frame that ends a stream: `event: conv.stream.closed`.
    pub fn frame(&self) -> String {
        let data = serde_json::json!({"reason": self.reason, "message": self.message});
        format!("event: {STREAM_CLOSED}\ndata: {data}\n\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_documented_shape() {
        let e = serde_json::to_value(ErrorBody::new("not_found", "no such conversation")).expect("json");
        assert_eq!(e, serde_json::json!({"error": {"code": "not_found", "message": "no such conversation"}}));
        let a = Accepted { event_id: "e1".into(), conversation_id: "c1".into(), stream_seq: 7, duplicate: false };
        let v = serde_json::to_value(&a).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"event_id": "e1", "conversation_id": "c1", "stream_seq": 7, "duplicate": false})
        );
        assert_eq!(serde_json::from_value::<Accepted>(v).expect("back"), a);
        let entry = Entry {
            id: "u1".into(),
            role: EntryRole::User,
            text: "hi".into(),
            status: EntryStatus::Completed,
            tool_call_id: None,
            tool_name: None,
        };
        let t =
            Timeline { conversation_id: "c1".into(), run_status: RunStatus::Idle, entries: vec![entry], position: 1 };
        let v = serde_json::to_value(&t).expect("json");
        assert!(v["entries"][0].get("tool_name").is_none(), "absent tool fields are left out: {v}");
        assert_eq!(serde_json::from_value::<Timeline>(v).expect("back"), t);
        let closed = StreamClosed { reason: "lagged".into(), message: "fell \"far\" behind".into() };
        let frame = closed.frame();
        let data = frame.strip_prefix("event: conv.stream.closed\ndata: ").expect("named").trim_end();
        assert_eq!(serde_json::from_str::<StreamClosed>(data).expect("data"), closed);
        assert!(frame.ends_with("\n\n"));
    }
}

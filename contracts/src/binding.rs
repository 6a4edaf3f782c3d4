//! Encodings of an [`Envelope`] on the wire, both ways:
//!
//! * **structured** mode: the whole event as one JSON object
//!   (`content-type: application/cloudevents+json`), used on HTTP and accepted on NATS;
//! * **binary** mode: attributes as `ce-` headers (values percent-encoded as the
//!   CloudEvents HTTP and NATS bindings require), `data` as the body with
//!   `content-type` as its media type. conv publishes to NATS in this mode.
//!
//! Both decoders funnel into one validation routine, so an event gets the
//! same verdict whichever way it arrives. Header maps are passed as plain
//! `(name, value)` pairs: this crate knows nothing of NATS or HTTP clients.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde_json::{Map, Value};

use crate::envelope::{CAUSATION_ID, CLOUDEVENTS_JSON, CORRELATION_ID, Envelope, JSON, SPEC_VERSION};
use crate::id::{ConversationId, check_event_id};
use crate::payload::Payload;
use crate::rejection::{Limits, Rejection};
use crate::types::EventType;
use crate::version::{self, SchemaVersion};

/// Header prefix of binary-mode attributes.
pub const HEADER_PREFIX: &str = "ce-";
pub const CONTENT_TYPE: &str = "content-type";

/// Characters percent-encoded in header values: controls, space, `"`, `%`
/// and (implicitly) everything outside ASCII.
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

pub(crate) const CONTEXT_ATTRIBUTES: [&str; 8] =
    ["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"];

/// Percent-encodes a header value.
pub fn encode_header_value(value: &str) -> String {
    utf8_percent_encode(value, HEADER_VALUE).to_string()
}

/// Decodes a percent-encoded header value.
pub fn decode_header_value(name: &str, value: &str) -> Result<String, Rejection> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| Rejection::Malformed { detail: format!("header {name} is not valid percent-encoded UTF-8") })
}

/// How an event was encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Structured,
    Binary,
}

/// Picks the content mode from the headers: `ce-specversion` means binary,
/// anything else is read as structured (the original NATS binding sent
/// structured JSON without headers).
pub fn detect_mode<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Mode {
    if headers.into_iter().any(|(n, _)| n.eq_ignore_ascii_case("ce-specversion")) {
        Mode::Binary
    } else {
        Mode::Structured
    }
}

// ---------------------------------------------------------------- encoding

/// The event as a structured-mode JSON object.
pub fn to_structured_json(event: &Envelope) -> Value {
    let mut obj = Map::new();
    obj.insert("specversion".into(), SPEC_VERSION.into());
    for (name, value) in attributes(event) {
        obj.insert(name.into(), Value::String(value));
    }
    obj.insert("datacontenttype".into(), JSON.into());
    obj.insert("data".into(), event.data.to_json());
    Value::Object(obj)
}

/// Structured-mode bytes (`application/cloudevents+json`).
pub fn encode_structured(event: &Envelope) -> Vec<u8> {
    crate::json::bytes(&to_structured_json(event))
}

/// Binary mode: `ce-` headers plus `content-type`, and the JSON `data` as body.
pub fn encode_binary(event: &Envelope) -> (Vec<(String, String)>, Vec<u8>) {
    let mut headers = vec![(format!("{HEADER_PREFIX}specversion"), SPEC_VERSION.to_owned())];
    for (name, value) in attributes(event) {
        headers.push((format!("{HEADER_PREFIX}{name}"), encode_header_value(&value)));
    }
    headers.push((CONTENT_TYPE.to_owned(), JSON.to_owned()));
    let body = crate::json::bytes(&event.data.to_json());
    (headers, body)
}

/// Context attributes and extensions other than `specversion`, `datacontenttype` and `data`.
fn attributes(event: &Envelope) -> Vec<(&str, String)> {
    let mut out = vec![
        ("id", event.id.clone()),
        ("source", event.source.clone()),
        ("type", event.event_type().as_str().to_owned()),
        ("subject", event.conversation_id.as_str().to_owned()),
    ];
    if let Some(time) = event.time {
        out.push(("time", format_time(time)));
    }
    if let Some(schema) = &event.dataschema {
        out.push(("dataschema", schema.clone()));
    }
    if let Some(c) = &event.causation_id {
        out.push((CAUSATION_ID, c.clone()));
    }
    if let Some(c) = &event.correlation_id {
        out.push((CORRELATION_ID, c.clone()));
    }
    for (name, value) in &event.extensions {
        out.push((name.as_str(), value.clone()));
    }
    out
}

/// RFC 3339 with nanoseconds only when needed.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

// ---------------------------------------------------------------- decoding

/// Attributes as they arrived, before validation.
#[derive(Debug, Default)]
pub(crate) struct RawEvent {
    pub(crate) attrs: BTreeMap<String, Value>,
    pub(crate) data: Option<Value>,
}

/// Decodes and validates a structured-mode event.
pub fn decode_structured(bytes: &[u8], limits: Limits) -> Result<Envelope, Rejection> {
    check_size(bytes.len(), limits)?;
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| Rejection::Malformed { detail: format!("body is not JSON: {e}") })?;
    let Value::Object(mut obj) = value else {
        return Err(Rejection::Malformed { detail: "a structured event must be a JSON object".into() });
    };
    if obj.contains_key("data_base64") {
        return Err(Rejection::UnsupportedContentType { found: "data_base64 (binary data)".into() });
    }
    let data = obj.remove("data");
    validate(RawEvent { attrs: obj.into_iter().collect(), data })
}

/// Decodes and validates a binary-mode event from `(name, value)` headers and a body.
pub fn decode_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
    limits: Limits,
) -> Result<Envelope, Rejection> {
    let mut raw = RawEvent::default();
    let mut size = body.len();
    let mut content_type = None;
    for (name, value) in headers {
        size += name.len() + value.len();
        let lower = name.to_ascii_lowercase();
        if lower == CONTENT_TYPE {
            content_type.get_or_insert_with(|| value.to_owned());
        } else if let Some(attr) = lower.strip_prefix(HEADER_PREFIX) {
            if attr.is_empty() || attr == "data" {
                continue;
            }
            if !raw.attrs.contains_key(attr) {
                let decoded = decode_header_value(name, value)?;
                raw.attrs.insert(attr.to_owned(), Value::String(decoded));
            }
        }
    }
    check_size(size, limits)?;
    if let Some(ct) = content_type {
        raw.attrs.insert("datacontenttype".into(), Value::String(ct));
    }
    if !body.is_empty() {
        // The media type is checked before the body is parsed, so a non-JSON
        // body with a non-JSON content type reports the content type.
        if let Some(Value::String(ct)) = raw.attrs.get("datacontenttype") {
            check_content_type(ct)?;
        }
        let data: Value = serde_json::from_slice(body).map_err(|e| Rejection::PayloadSchema {
            event_type: raw_type(&raw).unwrap_or(EventType::MessageReceived),
            detail: format!("data is not JSON: {e}"),
        })?;
        raw.data = Some(data);
    }
    validate(raw)
}

/// Decodes an event that arrived on NATS `subject` (either mode) and checks
/// that the subject agrees with its type and conversation.
pub fn decode_nats<'a>(
    subject: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    body: &[u8],
    limits: Limits,
) -> Result<Envelope, Rejection> {
    let event = match detect_mode(headers.clone()) {
        Mode::Binary => decode_binary(headers, body, limits)?,
        Mode::Structured => {
            let ct = headers.into_iter().find(|(n, _)| n.eq_ignore_ascii_case(CONTENT_TYPE)).map(|(_, v)| v);
            if let Some(ct) = ct {
                let media = media_type(ct);
                if media != CLOUDEVENTS_JSON && media != JSON {
                    return Err(Rejection::UnsupportedContentType { found: ct.to_owned() });
                }
            }
            decode_structured(body, limits)?
        }
    };
    check_subject(&event, subject)?;
    Ok(event)
}

/// An event in binary content mode: what is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `ce-` headers and `content-type`.
    pub headers: Vec<(String, String)>,
    /// The JSON `data`.
    pub body: Vec<u8>,
}

/// Validates an event built in code (ids, attributes, payload rules, size)
/// exactly as if it had arrived on the wire: the bytes that will be
/// published are decoded like any NATS message. Publish what this returns:
/// one encode per hop.
pub fn check(event: &Envelope, limits: Limits) -> Result<Encoded, Rejection> {
    let (headers, body) = encode_binary(event);
    check_header_size(&headers)?;
    decode_binary(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())), &body, limits)?;
    Ok(Encoded { headers, body })
}

/// Most bytes an event's attributes may take as NATS headers: the server
/// refuses more than 64 KiB of headers, and room is left for
/// `Nats-Msg-Id` and the headers a re-drive adds.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Refuses an event whose attributes would not fit in NATS headers (a
/// problem no retry fixes, so it must never look like an outage).
fn check_header_size(pairs: &[(String, String)]) -> Result<(), Rejection> {
    // `NATS/1.0\r\n`, then `name: value\r\n` per header, then `\r\n`.
    let size = 12 + pairs.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return Err(Rejection::BadAttribute {
            name: "attributes".into(),
            detail: format!(
                "they take {size} bytes as NATS headers; at most {MAX_HEADER_BYTES} fit (a long source or extension?)"
            ),
        });
    }
    Ok(())
}

/// Passes `conv.in.*` events (what a conversation takes from outside) and
/// refuses every other kind with [`Rejection::NotAnInput`].
pub fn require_input(event: Envelope) -> Result<Envelope, Rejection> {
    let ty = event.event_type();
    if ty.kind() == crate::types::Kind::In { Ok(event) } else { Err(Rejection::NotAnInput { event_type: ty }) }
}

/// Checks that a NATS subject belongs to this event's type and conversation.
pub fn check_subject(event: &Envelope, subject: &str) -> Result<(), Rejection> {
    let ty = event.event_type();
    let mismatch = || Rejection::SubjectTypeMismatch {
        subject: subject.to_owned(),
        event_type: ty.as_str().to_owned(),
        conversation: event.conversation_id.as_str().to_owned(),
    };
    let parsed = crate::subject::parse(subject).map_err(|_| mismatch())?;
    if parsed.kind != ty.kind() || parsed.family != ty.family() || parsed.conversation != event.conversation_id {
        return Err(mismatch());
    }
    Ok(())
}

fn check_size(size: usize, limits: Limits) -> Result<(), Rejection> {
    if size > limits.max_event_bytes {
        return Err(Rejection::Oversize { size, limit: limits.max_event_bytes });
    }
    Ok(())
}

fn raw_type(raw: &RawEvent) -> Option<EventType> {
    raw.attrs.get("type").and_then(Value::as_str).and_then(|t| t.parse().ok())
}

fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

fn check_content_type(ct: &str) -> Result<(), Rejection> {
    let media = media_type(ct);
    if media == JSON || media == "text/json" || (media.starts_with("application/") && media.ends_with("+json")) {
        Ok(())
    } else {
        Err(Rejection::UnsupportedContentType { found: ct.to_owned() })
    }
}

fn take_string(attrs: &mut BTreeMap<String, Value>, name: &'static str) -> Result<Option<String>, Rejection> {
    match attrs.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Rejection::BadAttribute {
            name: name.to_owned(),
            detail: format!("must be a string, got {}", json_kind(&other)),
        }),
    }
}

fn require(attrs: &mut BTreeMap<String, Value>, name: &'static str) -> Result<String, Rejection> {
    take_string(attrs, name)?.ok_or(Rejection::MissingField { field: name })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn is_extension_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 20 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The one validation routine behind every decoder.
pub(crate) fn validate(mut raw: RawEvent) -> Result<Envelope, Rejection> {
    let attrs = &mut raw.attrs;
    let specversion = require(attrs, "specversion")?;
    if specversion != SPEC_VERSION {
        return Err(Rejection::BadSpecVersion { found: specversion });
    }
    let id = require(attrs, "id")?;
    let source = require(attrs, "source")?;
    let ty = require(attrs, "type")?;
    let subject = require(attrs, "subject")?;

    let ty: EventType = ty.parse().map_err(|_| Rejection::UnknownType { found: ty.clone() })?;
    let conversation_id = ConversationId::parse(&subject)
        .map_err(|e| Rejection::BadConversationId { found: subject.clone(), detail: e.to_string() })?;
    check_event_id(&id).map_err(|e| Rejection::BadAttribute { name: "id".into(), detail: e.to_string() })?;
    if source.trim().is_empty() {
        return Err(Rejection::BadAttribute { name: "source".into(), detail: "must not be empty".into() });
    }
    let time = take_string(attrs, "time")?
        .map(|t| {
            DateTime::parse_from_rfc3339(&t).map(|t| t.with_timezone(&Utc)).map_err(|e| Rejection::BadAttribute {
                name: "time".into(),
                detail: format!("{t:?} is not an RFC 3339 timestamp: {e}"),
            })
        })
        .transpose()?;
    if let Some(ct) = take_string(attrs, "datacontenttype")? {
        check_content_type(&ct)?;
    }
    let dataschema = take_string(attrs, "dataschema")?;
    if let Some(schema) = &dataschema {
        match version::parse_schema(ty, schema) {
            Ok(SchemaVersion::Foreign) => {}
            Ok(SchemaVersion::Conv(v)) if v > version::current(ty) => {
                return Err(Rejection::UnsupportedVersion {
                    event_type: ty,
                    version: v,
                    supported: version::current(ty),
                });
            }
            Ok(SchemaVersion::Conv(_)) => {}
            Err(detail) => {
                return Err(Rejection::BadAttribute { name: "dataschema".into(), detail: detail.to_string() });
            }
        }
    }
    let causation_id = take_id(attrs, CAUSATION_ID)?;
    let correlation_id = take_id(attrs, CORRELATION_ID)?;

    let mut extensions = BTreeMap::new();
    for (name, value) in std::mem::take(attrs) {
        if CONTEXT_ATTRIBUTES.contains(&name.as_str()) {
            continue;
        }
        if !is_extension_name(&name) {
            return Err(Rejection::BadAttribute {
                name,
                detail: "extension names are 1-20 characters of [a-z0-9]".into(),
            });
        }
        let value = match value {
            Value::String(s) => s,
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(Rejection::BadAttribute {
                    name,
                    detail: format!("extension values are strings, numbers or booleans, got {}", json_kind(&other)),
                });
            }
        };
        extensions.insert(name, value);
    }

    let data = match raw.data {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(d) => d,
    };
    let data = Payload::from_json(ty, data)
        .map_err(|detail| Rejection::PayloadSchema { event_type: ty, detail: detail.to_string() })?;
    Ok(Envelope { id, source, conversation_id, time, dataschema, causation_id, correlation_id, extensions, data })
}

fn take_id(attrs: &mut BTreeMap<String, Value>, name: &'static str) -> Result<Option<String>, Rejection> {
    let value = take_string(attrs, name)?;
    if let Some(v) = &value {
        check_event_id(v).map_err(|e| Rejection::BadAttribute { name: name.to_owned(), detail: e.to_string() })?;
    }
    Ok(value)
}

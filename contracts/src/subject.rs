//! NATS subjects and stream names of the contract.
//!
//! Publish subject of an event: `conv.<kind>.<family>.<conversation_id>`, where
//! `<kind>.<family>` are the second and third tokens of its type. `CONV_IN`
//! rewrites incoming subjects with a server-side transform to
//! `conv.in.<partition>.<family>.<conversation_id>`, so publishers never need to
//! know the partition count; [`parse`] accepts both shapes.

use crate::id::{ConversationId, IdError};
use crate::types::{EventType, Kind};

pub const STREAM_IN: &str = "CONV_IN";
pub const STREAM_EFFECT: &str = "CONV_EFFECT";
pub const STREAM_APPLIED: &str = "CONV_APPLIED";
pub const STREAM_OUT: &str = "CONV_OUT";
pub const STREAM_AUDIT: &str = "CONV_AUDIT";
/// The streams one turn writes to: inputs, directives, applied markers, output.
pub const JOURNAL_STREAMS: [&str; 4] = [STREAM_IN, STREAM_EFFECT, STREAM_APPLIED, STREAM_OUT];
pub const STREAM_DLQ: &str = "CONV_DLQ";

/// Every pinned stream name.
pub const STREAMS: [&str; 6] = [STREAM_IN, STREAM_EFFECT, STREAM_APPLIED, STREAM_OUT, STREAM_AUDIT, STREAM_DLQ];

/// Subjects under which conv writes its own dead-letter records into `CONV_DLQ`.
pub const DLQ_SUBJECT_PREFIX: &str = "conv.dlq";

/// The NATS service group of ingress's request API (`conv.ingress.event`,
/// `conv.ingress.message`).
pub const INGRESS_API_GROUP: &str = "conv.ingress";

/// Whether `subject` is in the input namespace (`conv.in.…`), well formed or not.
pub fn is_input(subject: &str) -> bool {
    subject.starts_with("conv.in.")
}

/// What `CONV_IN` captures: exactly the well-shaped input subjects
/// `conv.in.<family>.<conversation_id>`.
pub const IN_SUBJECTS: &str = "conv.in.*.*";

/// Every other shape under `conv.in.>` (3 tokens, 5 tokens, 6 or more).
/// `CONV_DLQ` captures these, so together the two streams cover `conv.in.>`:
/// a stray publish is journaled as a dead letter, never lost and never applied.
pub const IN_STRAY_SUBJECTS: [&str; 3] = ["conv.in.*", "conv.in.*.*.*", "conv.in.*.*.*.>"];

/// What `CONV_OUT` captures: the output subjects `conv.out.<family>.<conversation_id>`
/// (stored with a partition token, see [`out_partition_transform`]).
pub const OUT_SUBJECTS: &str = "conv.out.*.*";

/// Default number of `CONV_IN` (and `CONV_OUT`) partitions.
pub const DEFAULT_PARTITIONS: u16 = 16;

/// The subject an event is published to.
pub fn for_event(ty: EventType, conversation: &ConversationId) -> String {
    format!("conv.{}.{}.{}", ty.kind().token(), ty.family(), conversation)
}

/// Wildcard subject of every event of one kind (`conv.in.>`).
pub fn kind_wildcard(kind: Kind) -> String {
    format!("conv.{}.>", kind.token())
}

/// Source and destination of the `CONV_IN` subject transform that adds the
/// partition token: `conv.in.<family>.<id>` → `conv.in.<p>.<family>.<id>`.
pub fn in_partition_transform(partitions: u16) -> (String, String) {
    (
        "conv.in.*.*".to_owned(),
        format!("conv.in.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
    )
}

/// Source and destination of the `CONV_OUT` subject transform:
/// `conv.out.<family>.<id>` → `conv.out.<p>.<family>.<id>`, the same
/// partition as the conversation's inputs, so views can be owned per
/// partition like the runtime's state.
pub fn out_partition_transform(partitions: u16) -> (String, String) {
    (
        OUT_SUBJECTS.to_owned(),
        format!("conv.out.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
    )
}

/// Filter subject of one `CONV_OUT` partition (stored subjects).
pub fn out_partition_filter(partition: u16) -> String {
    format!("conv.out.{partition}.>")
}

/// Filter of every stored `CONV_OUT` event of one conversation.
pub fn out_conversation_filter(conversation: &ConversationId) -> String {
    format!("conv.out.*.*.{conversation}")
}

/// Subscription to one conversation's output as it is published (core NATS
/// sees the subject before the stream's transform).
pub fn out_published_filter(conversation: &ConversationId) -> String {
    format!("conv.out.*.{conversation}")
}

/// Filter of every stored `CONV_IN` event of one conversation.
pub fn in_conversation_filter(conversation: &ConversationId) -> String {
    format!("conv.in.*.*.{conversation}")
}

/// Filter of one family of one conversation's stored inputs (`conv.in.<p>.<family>.<id>`).
pub fn in_family_filter(family: &str, conversation: &ConversationId) -> String {
    format!("conv.in.*.{family}.{conversation}")
}

/// Filter of one kind's events of one conversation in an unpartitioned stream.
pub fn kind_conversation_filter(kind: Kind, conversation: &ConversationId) -> String {
    match kind {
        Kind::In => in_conversation_filter(conversation),
        Kind::Out => out_conversation_filter(conversation),
        other => format!("conv.{}.*.{conversation}", other.token()),
    }
}

/// Prefix of the live lane: core NATS subjects no stream captures, carrying
/// token deltas at token rate (see [`crate::live`]).
pub const LIVE_PREFIX: &str = "conv.live";

/// The live-lane subject of one conversation.
pub fn live_subject(conversation: &ConversationId) -> String {
    format!("{LIVE_PREFIX}.{conversation}")
}

/// The live-lane subject of a conversation's cancel hints
/// ([`crate::live::LiveCancel`]). Four tokens, so it never meets a
/// conversation's delta subject (three tokens).
pub fn live_cancel_subject(conversation: &ConversationId) -> String {
    format!("{LIVE_PREFIX}.cancel.{conversation}")
}

/// Filter of every conversation's cancel hints.
pub fn live_cancel_filter() -> String {
    format!("{LIVE_PREFIX}.cancel.*")
}

/// Filter of every `conv.effect.cancel.*` directive.
pub fn cancel_filter() -> String {
    format!("conv.{}.{}.>", Kind::Effect.token(), EventType::CancelRequested.family())
}

/// Filter subject of one `CONV_IN` partition's control inputs.
pub fn in_partition_control_filter(partition: u16) -> String {
    format!("conv.in.{partition}.{}.>", EventType::AbortRequested.family())
}

/// Filter subject of one `CONV_IN` partition.
pub fn in_partition_filter(partition: u16) -> String {
    format!("conv.in.{partition}.>")
}

/// The partition of a conversation, computed exactly like the server's
/// `partition(n, …)` transform (FNV-1a 32 of the token, modulo `n`).
pub fn partition_of(conversation: &ConversationId, partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in conversation.as_str().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    // The remainder is below `partitions`, so it fits in u16.
    u16::try_from(hash % u32::from(partitions.max(1))).unwrap_or(0)
}

/// A parsed conv subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub kind: Kind,
    /// Present on `CONV_IN` and `CONV_OUT` subjects after the partition transform.
    pub partition: Option<u16>,
    pub family: String,
    pub conversation: ConversationId,
}

impl Parsed {
    /// The subject without the partition token, as a publisher wrote it.
    pub fn unpartitioned(&self) -> String {
        format!("conv.{}.{}.{}", self.kind.token(), self.family, self.conversation)
    }
}

/// Why a subject is not a conv event subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject {0:?} does not have the shape conv.<kind>.[<partition>.]<family>.<conversation_id>")]
    Shape(String),
    #[error("subject {subject:?} has an unknown kind token {kind:?}")]
    UnknownKind { subject: String, kind: String },
    #[error("subject {subject:?}: conversation id {reason}")]
    Conversation { subject: String, reason: IdError },
}

/// Parses `conv.<kind>.<family>.<id>`, `conv.in.<p>.<family>.<id>` or `conv.out.<p>.<family>.<id>`.
pub fn parse(subject: &str) -> Result<Parsed, SubjectError> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let shape = || SubjectError::Shape(subject.to_owned());
    if tokens.first() != Some(&"conv") || tokens.iter().any(|t| t.is_empty()) {
        return Err(shape());
    }
    let kind_token = tokens.get(1).ok_or_else(shape)?;
    let kind = Kind::from_token(kind_token)
        .ok_or_else(|| SubjectError::UnknownKind { subject: subject.to_owned(), kind: (*kind_token).to_owned() })?;
    let (partition, family, id) = match (kind, tokens.len()) {
        (_, 4) => (None, tokens[2], tokens[3]),
        (Kind::In | Kind::Out, 5) => (Some(tokens[2].parse::<u16>().map_err(|_| shape())?), tokens[3], tokens[4]),
        _ => return Err(shape()),
    };
    let conversation = ConversationId::parse(id)
        .map_err(|reason| SubjectError::Conversation { subject: subject.to_owned(), reason })?;
    Ok(Parsed { kind, partition, family: family.to_owned(), conversation })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses() {
        let c = ConversationId::parse("demo").unwrap();
        let s = for_event(EventType::AbortRequested, &c);
        assert_eq!(s, "conv.in.control.demo");
        let p = parse(&s).unwrap();
        assert_eq!((p.kind, p.partition, p.family.as_str()), (Kind::In, None, "control"));
        let p = parse("conv.in.7.message.demo").unwrap();
        assert_eq!(p.partition, Some(7));
        assert_eq!(p.unpartitioned(), "conv.in.message.demo");
        assert_eq!(parse("conv.out.7.message.demo").unwrap().unpartitioned(), "conv.out.message.demo");
        assert!(parse("conv.effect.7.llm.demo").is_err());
        assert!(parse("conv.nope.message.demo").is_err());
        assert!(parse("conv.in.message").is_err());
        assert!(parse("other.in.message.demo").is_err());
    }

    #[test]
    fn transform_string() {
        let (src, dest) = in_partition_transform(16);
        assert_eq!(src, "conv.in.*.*");
        assert_eq!(dest, "conv.in.{{partition(16,2)}}.{{wildcard(1)}}.{{wildcard(2)}}");
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let c = ConversationId::parse("demo").unwrap();
        assert_eq!(partition_of(&c, 16), partition_of(&c, 16));
        for i in 0..200 {
            let c = ConversationId::parse(&format!("c{i}")).unwrap();
            assert!(partition_of(&c, 16) < 16);
        }
    }
}

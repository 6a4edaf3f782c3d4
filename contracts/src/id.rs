//! Identifiers that cross the wire: conversation ids and event ids.

use std::fmt;

/// Longest conversation id accepted (characters; ids are ASCII).
pub const MAX_CONVERSATION_ID_LEN: usize = 128;
/// Longest event id accepted. Event ids become `Nats-Msg-Id` headers and KV keys.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} characters long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("contains {found:?}; only [A-Za-z0-9_-] is allowed")]
    BadChar { found: char },
    /// An event id holds only printable ASCII, no spaces.
    #[error("contains {found:?}; only printable ASCII without spaces is allowed")]
    NotPrintable { found: char },
}

/// A conversation id: 1–128 characters of `[A-Za-z0-9_-]`.
///
/// It is the CloudEvents `subject` of every event and the last token of every
/// NATS subject of the conversation, which is why `.`, `*`, `>` and whitespace
/// can never appear in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConversationId(String);

impl ConversationId {
    /// Checks and wraps a conversation id.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        if raw.len() > MAX_CONVERSATION_ID_LEN {
            return Err(IdError::TooLong { len: raw.len(), max: MAX_CONVERSATION_ID_LEN });
        }
        if let Some(found) = raw.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
            return Err(IdError::BadChar { found });
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ConversationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Checks a CloudEvents `id`: non-empty, at most 256 characters, printable
/// ASCII without spaces (it travels as the `Nats-Msg-Id` header).
pub fn check_event_id(raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    if raw.len() > MAX_EVENT_ID_LEN {
        return Err(IdError::TooLong { len: raw.len(), max: MAX_EVENT_ID_LEN });
    }
    if let Some(found) = raw.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(IdError::NotPrintable { found });
    }
    Ok(())
}

fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The id of the `tag`-th event derived from the event `base`:
/// `<base>~<tag>` (the scheduler reads the tag back to find a cause), or,
/// when `base` is longer than 200 characters or not a valid id itself,
/// `h<FNV-1a of base>.<tag>`. A valid id for any tag of at most 40
/// printable ASCII characters, and the same for the same arguments (dedupe
/// and replay rely on it).
pub fn derived_id(base: &str, tag: impl std::fmt::Display) -> String {
    if base.len() <= 200 && check_event_id(base).is_ok() {
        format!("{base}~{tag}")
    } else {
        format!("h{:016x}.{tag}", fnv1a(base))
    }
}

/// `readable` when it is a valid event id, otherwise
/// `<conversation>.h<FNV-1a of it>`: an id built from parts (a tool call id
/// a model chose, say) that is always valid, always the same for the same
/// parts, and stays in the conversation's namespace, which clients may not
/// use (`trust::check_client_id`).
pub fn fit_event_id(conversation: &ConversationId, readable: String) -> String {
    if check_event_id(&readable).is_ok() { readable } else { format!("{conversation}.h{:016x}", fnv1a(&readable)) }
}

/// True for the form [`derived_id`] gives a long base: `h<16 hex digits>`
/// then `.` or the end.
pub fn is_hashed_derived_id(id: &str) -> bool {
    let hex = id.strip_prefix('h').and_then(|rest| rest.get(..16));
    let after = id.get(17..);
    hex.is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        && after.is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids() {
        assert!(ConversationId::parse("demo").is_ok());
        assert!(ConversationId::parse("a-B_9").is_ok());
        assert_eq!(ConversationId::parse(""), Err(IdError::Empty));
        assert_eq!(ConversationId::parse("a.b"), Err(IdError::BadChar { found: '.' }));
        assert_eq!(ConversationId::parse("a b"), Err(IdError::BadChar { found: ' ' }));
        assert!(ConversationId::parse(&"x".repeat(128)).is_ok());
        assert_eq!(ConversationId::parse(&"x".repeat(129)), Err(IdError::TooLong { len: 129, max: 128 }));
    }

    #[test]
    fn event_ids() {
        assert!(check_event_id("01J0-abc").is_ok());
        assert_eq!(check_event_id(""), Err(IdError::Empty));
        assert_eq!(check_event_id("a b"), Err(IdError::NotPrintable { found: ' ' }));
    }

    #[test]
    fn built_ids_are_always_valid_and_stable() {
        assert_eq!(derived_id("m1", 3), "m1~3");
        assert_eq!(derived_id("m1", usize::MAX), format!("m1~{}", usize::MAX));
        for base in ["x".repeat(256), "with space".into(), String::new(), "é".into()] {
            let id = derived_id(&base, 7);
            assert!(check_event_id(&id).is_ok() && id.ends_with(".7"), "{id}");
            assert_eq!(id, derived_id(&base, 7));
        }
        let c1 = ConversationId::parse("c1").expect("id");
        assert_eq!(fit_event_id(&c1, "c1.tool.a".into()), "c1.tool.a");
        for readable in ["a b".to_owned(), "y".repeat(300), String::new()] {
            let id = fit_event_id(&c1, readable.clone());
            assert!(check_event_id(&id).is_ok() && id.starts_with("c1.h"), "{id}");
            assert_eq!(id, fit_event_id(&c1, readable));
        }
        assert!(is_hashed_derived_id(&derived_id(&"x".repeat(256), 3)));
        assert!(is_hashed_derived_id("h0123456789abcdef"));
        assert!(!is_hashed_derived_id("h0123456789abcdefg"));
        assert!(!is_hashed_derived_id("hello"));
    }
}

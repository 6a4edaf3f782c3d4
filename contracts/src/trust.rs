//! The trust boundary on the wire: how ingress dedupes what clients send,
//! and the callback tokens that let a webhook tool (or an external worker)
//! report the outcome of exactly one effect.
//!
//! - **Dedupe key.** CloudEvents makes `id` unique per `source` only, and a
//!   client chooses both. Ingress stores an accepted event with
//!   `Nats-Msg-Id` = [`ingress_msg_id`] of (conversation, source, id): one
//!   client's id can never make another conversation's event (or a
//!   runtime- or effects-derived one, whose message ids are their plain
//!   event ids) a "duplicate". Ids a client chooses must also stay out of
//!   the namespaces conv derives ids in ([`check_client_id`]), so the
//!   reducer's per-conversation dedupe by id cannot be squatted either.
//! - **Callback tokens.** `hex(HMAC-SHA256(secret, "conv-callback-v1\n" +
//!   conversation + "\n" + target))` where the target is `llm\n<step>\n<attempt>`,
//!   `tool\n<tool call id>` or `timer\n<timer id>`; the secret is
//!   `CONV_CALLBACK_SECRET`, shared by ingress and effects. Effects send it to
//!   webhook tools with the call (header [`CALLBACK_TOKEN_HEADER`] and field
//!   `callback_token`); ingress takes an LLM, tool or timer outcome only with
//!   the token of that very effect.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::ConversationId;

/// Header that carries a callback token (requests to webhook tools, and
/// callbacks to ingress; `Authorization: Bearer <token>` works too).
pub const CALLBACK_TOKEN_HEADER: &str = "conv-callback-token";

/// `Nats-Msg-Id` of an event accepted from outside: a digest of
/// (conversation, source, id), in a namespace (`in1.`) no derived id uses.
pub fn ingress_msg_id(conversation: &ConversationId, source: &str, id: &str) -> String {
    let mut digest = Sha256::new();
    for part in [conversation.as_str(), source, id] {
        // Length-prefixed: no two triples give the same bytes.
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part.as_bytes());
    }
    format!("in1.{}", hex(&digest.finalize()))
}

/// `Nats-Msg-Id` of an event conv derives itself (runtime outputs,
/// directives and markers; effect outcomes): scoped to its conversation,
/// because a derived id is built from an input id, and input ids are unique
/// per conversation only. Conversation ids hold no `:`, ingress's keys no
/// `:` either, so the three kinds never meet.
pub fn derived_msg_id(conversation: &ConversationId, id: &str) -> String {
    format!("{conversation}:{id}")
}

/// Refuses ids a client may not choose: those conv derives itself — ids
/// ingress derives from keys (idempotency, natural keys) and every effect
/// outcome id start with `<conversation>.`, runtime-derived ids contain `~`
/// or, from a long input id, are `h<16 hex digits>.<n>` (ingress's other ids
/// are fresh UUIDv7s).
pub fn check_client_id(conversation: &ConversationId, id: &str) -> Result<(), crate::Invalid> {
    if id.contains('~') {
        return Err("`~` is reserved for ids conv derives".into());
    }
    if crate::id::is_hashed_derived_id(id) {
        return Err("ids of the form h<16 hex digits>[.…] are reserved for ids conv derives".into());
    }
    if id.strip_prefix(conversation.as_str()).is_some_and(|rest| rest.starts_with('.')) {
        return Err(format!(
            "ids starting with \"{conversation}.\" are reserved for ids conv derives; choose another (a UUID, say)"
        )
        .into());
    }
    Ok(())
}

/// Which effect a callback reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackTarget<'a> {
    Llm { step_id: &'a str, attempt: u32 },
    Tool { tool_call_id: &'a str },
    Timer { timer_id: &'a str },
}

fn mac(secret: &[u8], conversation: &ConversationId, target: CallbackTarget<'_>) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    let target = match target {
        CallbackTarget::Llm { step_id, attempt } => format!("llm\n{step_id}\n{attempt}"),
        CallbackTarget::Tool { tool_call_id } => format!("tool\n{tool_call_id}"),
        CallbackTarget::Timer { timer_id } => format!("timer\n{timer_id}"),
    };
    mac.update(format!("conv-callback-v1\n{conversation}\n{target}").as_bytes());
    mac
}

/// The callback token of one effect.
pub fn callback_token(secret: &[u8], conversation: &ConversationId, target: CallbackTarget<'_>) -> String {
    hex(&mac(secret, conversation, target).finalize().into_bytes())
}

/// Whether `token` is the callback token of this effect (constant time).
pub fn verify_callback_token(
    secret: &[u8],
    conversation: &ConversationId,
    target: CallbackTarget<'_>,
    token: &str,
) -> bool {
    let Some(bytes) = unhex(token.trim()) else { return false };
    mac(secret, conversation, target).verify_slice(&bytes).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(id: &str) -> ConversationId {
        ConversationId::parse(id).expect("valid")
    }

    #[test]
    fn the_dedupe_key_separates_conversations_and_sources() {
        let a = ingress_msg_id(&conv("victim"), "/x", "victim.llm.r1.s1.1.completed");
        assert_ne!(a, ingress_msg_id(&conv("attacker"), "/x", "victim.llm.r1.s1.1.completed"));
        assert_ne!(a, ingress_msg_id(&conv("victim"), "/y", "victim.llm.r1.s1.1.completed"));
        assert_eq!(a, ingress_msg_id(&conv("victim"), "/x", "victim.llm.r1.s1.1.completed"));
        // Not a derived id's namespace, and no concatenation ambiguity.
        assert!(a.starts_with("in1.") && !a.contains('~'));
        assert_ne!(ingress_msg_id(&conv("c"), "ab", "c"), ingress_msg_id(&conv("c"), "a", "bc"));
        // Derived events of two conversations never share a key.
        assert_ne!(derived_msg_id(&conv("a"), "m1~0"), derived_msg_id(&conv("b"), "m1~0"));
        assert!(!a.contains(':'));
    }

    #[test]
    fn clients_cannot_choose_derived_ids() {
        let c = conv("victim");
        assert!(check_client_id(&c, "victim.llm.r1.s1.1.completed").is_err());
        assert!(check_client_id(&c, "m1~0").is_err());
        assert!(check_client_id(&c, "h0123456789abcdef.2").is_err());
        assert!(check_client_id(&c, "hello").is_ok());
        assert!(check_client_id(&c, "0190b6c4-7d1e-7000-8000-000000000000").is_ok());
        assert!(check_client_id(&c, "victimized").is_ok());
        assert!(check_client_id(&c, "other.llm.r1.s1.1.completed").is_ok());
    }

    #[test]
    fn a_callback_token_fits_one_effect_only() {
        let c = conv("c1");
        let llm = CallbackTarget::Llm { step_id: "r1.s1", attempt: 1 };
        let t = callback_token(b"secret", &c, llm);
        assert_eq!(t.len(), 64);
        assert!(verify_callback_token(b"secret", &c, llm, &t));
        assert!(!verify_callback_token(b"other", &c, llm, &t));
        assert!(!verify_callback_token(b"secret", &conv("c2"), llm, &t));
        assert!(!verify_callback_token(b"secret", &c, CallbackTarget::Llm { step_id: "r1.s1", attempt: 2 }, &t));
        assert!(!verify_callback_token(b"secret", &c, CallbackTarget::Tool { tool_call_id: "r1.s1" }, &t));
        assert!(!verify_callback_token(b"secret", &c, llm, "zz"));
        assert!(!verify_callback_token(b"secret", &c, llm, ""));
    }
}

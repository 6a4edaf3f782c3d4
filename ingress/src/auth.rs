//! Who may post what (the trust model: docs/adr/0009-trust-boundary.md).
//!
//! - **Clients** (messages, abort, stop, retry, and CloudEvents of those
//!   types) present an API key from `CONV_INGRESS_API_KEYS` as
//!   `Authorization: Bearer <key>`: 401 without a valid one, 403 when the
//!   key is scoped to a conversation-id prefix that does not cover the
//!   conversation. With no keys configured ingress is open, and then it
//!   serves only on a loopback address (checked at start).
//! - **Callbacks** (LLM, tool and timer outcomes, by route or as CloudEvents,
//!   over HTTP or NATS) present the callback token of that very effect
//!   (`conv_contracts::trust`), as `Conv-Callback-Token: <token>` or
//!   `Authorization: Bearer <token>`: 403 otherwise, and nothing is
//!   journaled. Client keys are not callback tokens. Without
//!   `CONV_CALLBACK_SECRET` every callback is refused.

use conv_contracts::payload::Payload;
use conv_contracts::trust::{self, CallbackTarget};
use conv_contracts::{ConversationId, Envelope};
use conv_nats::keys::{ApiKeys, KeyError};
use conv_nats::secret::Secret;

use crate::core::IngestError;

/// The credentials ingress checks.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    keys: ApiKeys,
    callback_secret: Option<Secret>,
}

/// The credential of a request: `Authorization: Bearer <x>`, or for
/// callbacks the `Conv-Callback-Token` header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    pub bearer: Option<&'a str>,
    pub callback_token: Option<&'a str>,
}

impl Presented<'_> {
    /// Reads the credential headers (`name`, `value` pairs, any case).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Presented<'a> {
        let mut p = Presented::default();
        for (name, value) in pairs {
            if name.eq_ignore_ascii_case("authorization") {
                p.bearer = conv_nats::keys::bearer(value);
            } else if name.eq_ignore_ascii_case(trust::CALLBACK_TOKEN_HEADER) {
                p.callback_token = Some(value.trim());
            }
        }
        p
    }
}

impl Auth {
    /// From `CONV_INGRESS_API_KEYS` (`key` or `key:prefix`, comma-separated)
    /// and `CONV_CALLBACK_SECRET`. Errors never quote a key.
    pub fn new(api_keys: &Secret, callback_secret: &Secret) -> Result<Self, conv_nats::service::Invalid> {
        let keys = ApiKeys::new(api_keys)?;
        let callback_secret = (!callback_secret.is_empty()).then(|| callback_secret.clone());
        if callback_secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            return Err("CONV_CALLBACK_SECRET must be at least 16 characters".into());
        }
        Ok(Self { keys, callback_secret })
    }

    /// No client keys: anyone who reaches ingress may post (loopback only).
    pub fn is_open(&self) -> bool {
        self.keys.is_open()
    }

    /// Whether callbacks can be checked at all.
    pub fn takes_callbacks(&self) -> bool {
        self.callback_secret.is_some()
    }

    /// Checks a request that carries `event`: a callback needs its effect's
    /// token, anything else a client key for the conversation. Returns which
    /// key it was (for its rate limit); `None` for callbacks and open ingress.
    pub fn check(&self, event: &Envelope, presented: Presented<'_>) -> Result<Option<usize>, IngestError> {
        match callback_target(event.data()) {
            Some(target) => self.check_callback(event.conversation_id(), target, presented).map(|()| None),
            None => self.check_client(event.conversation_id().as_str(), presented.bearer),
        }
    }

    /// What can be refused before the body is read (so an unauthenticated
    /// client cannot make ingress read and parse a large body): on a route
    /// of a known type, a client key for the conversation in the URL, or for
    /// an outcome the presence of a token (verified once the body is read).
    /// `ty` is `None` for `/v1/events`: then only that some credential came.
    pub fn precheck(
        &self,
        ty: Option<conv_contracts::EventType>,
        conversation: &str,
        presented: Presented<'_>,
    ) -> Result<(), IngestError> {
        let any = presented.bearer.is_some() || presented.callback_token.is_some();
        match ty {
            Some(ty) if matches!(ty.family(), "llm" | "tool" | "timer") => {
                if !self.takes_callbacks() || !any {
                    return Err(IngestError::Forbidden(
                        "a callback needs the effect's callback token (and CONV_CALLBACK_SECRET on ingress)".into(),
                    ));
                }
                Ok(())
            }
            Some(_) => self.check_client(conversation, presented.bearer).map(drop),
            None if !self.is_open() && !any => {
                Err(IngestError::Unauthorized("send an API key as `Authorization: Bearer <key>`".into()))
            }
            None => Ok(()),
        }
    }

    /// Checks only callbacks (for transports whose clients the NATS
    /// permissions already vouch for).
    pub fn check_if_callback(&self, event: &Envelope, presented: Presented<'_>) -> Result<(), IngestError> {
        match callback_target(event.data()) {
            Some(target) => self.check_callback(event.conversation_id(), target, presented),
            None => Ok(()),
        }
    }

    fn check_client(&self, conversation: &str, bearer: Option<&str>) -> Result<Option<usize>, IngestError> {
        self.keys.check(conversation, bearer).map_err(|e| match e {
            KeyError::Unauthorized(m) => IngestError::Unauthorized(m),
            KeyError::Forbidden(m) => IngestError::Forbidden(m),
        })
    }

    fn check_callback(
        &self,
        conversation: &ConversationId,
        target: CallbackTarget<'_>,
        presented: Presented<'_>,
    ) -> Result<(), IngestError> {
        let Some(secret) = &self.callback_secret else {
            return Err(IngestError::Forbidden(
                "callbacks are refused: CONV_CALLBACK_SECRET is not set on ingress".into(),
            ));
        };
        let Some(token) = presented.callback_token.or(presented.bearer) else {
            return Err(IngestError::Forbidden(format!(
                "a callback needs the effect's callback token (`{}` header)",
                trust::CALLBACK_TOKEN_HEADER
            )));
        };
        if trust::verify_callback_token(secret.expose().as_bytes(), conversation, target, token) {
            Ok(())
        } else {
            Err(IngestError::Forbidden("the callback token does not match this effect".into()))
        }
    }
}

/// The effect an outcome reports on; `None` for client inputs.
pub fn callback_target(data: &Payload) -> Option<CallbackTarget<'_>> {
    Some(match data {
        Payload::LlmStarted(p) => CallbackTarget::Llm { step_id: &p.step_id, attempt: p.attempt },
        Payload::LlmDelta(p) => CallbackTarget::Llm { step_id: &p.step_id, attempt: p.attempt },
        Payload::LlmCompleted(p) => CallbackTarget::Llm { step_id: &p.step_id, attempt: p.attempt },
        Payload::LlmFailed(p) => CallbackTarget::Llm { step_id: &p.step_id, attempt: p.attempt },
        Payload::LlmCanceled(p) => CallbackTarget::Llm { step_id: &p.step_id, attempt: p.attempt },
        Payload::ToolStarted(p) => CallbackTarget::Tool { tool_call_id: &p.tool_call_id },
        Payload::ToolProgress(p) => CallbackTarget::Tool { tool_call_id: &p.tool_call_id },
        Payload::ToolCompleted(p) => CallbackTarget::Tool { tool_call_id: &p.tool_call_id },
        Payload::ToolFailed(p) => CallbackTarget::Tool { tool_call_id: &p.tool_call_id },
        Payload::ToolCanceled(p) => CallbackTarget::Tool { tool_call_id: &p.tool_call_id },
        Payload::TimerFired(p) => CallbackTarget::Timer { timer_id: &p.timer_id },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_contracts::payload::{AbortRequested, LlmCompleted};

    const KEY: &str = "k-0123456789abcdef";
    const TEAM: &str = "t-0123456789abcdef";
    const SECRET: &str = "s-0123456789abcdef";

    fn auth() -> Auth {
        Auth::new(&Secret::new(format!("{KEY}, {TEAM}:team-a-")), &Secret::new(SECRET)).expect("valid")
    }

    fn conv(id: &str) -> ConversationId {
        ConversationId::parse(id).expect("valid")
    }

    fn abort(c: &str) -> Envelope {
        Envelope::new("a1", "/t", conv(c), AbortRequested { reason: None }).expect("valid event")
    }

    fn completed(c: &str) -> Envelope {
        let data = LlmCompleted {
            step_id: "r1.s1".into(),
            attempt: 1,
            text: "FORGED".into(),
            tool_calls: vec![],
            finish_reason: None,
        };
        Envelope::new("x", "/t", conv(c), data).expect("valid event")
    }

    fn bearer(b: &str) -> Presented<'_> {
        Presented { bearer: Some(b), callback_token: None }
    }

    #[test]
    fn clients_need_a_key_that_covers_the_conversation() {
        let a = auth();
        assert!(matches!(a.check(&abort("c1"), Presented::default()), Err(IngestError::Unauthorized(_))));
        assert!(matches!(a.check(&abort("c1"), bearer("wrong-key-0123456789")), Err(IngestError::Unauthorized(_))));
        assert!(a.check(&abort("c1"), bearer(KEY)).is_ok());
        assert!(a.check(&abort("team-a-1"), bearer(TEAM)).is_ok());
        assert!(matches!(a.check(&abort("team-b-1"), bearer(TEAM)), Err(IngestError::Forbidden(_))));
    }

    #[test]
    fn callbacks_need_the_effects_token_and_client_keys_are_not_one() {
        let a = auth();
        let c = conv("c1");
        let token = trust::callback_token(SECRET.as_bytes(), &c, CallbackTarget::Llm { step_id: "r1.s1", attempt: 1 });
        assert!(matches!(a.check(&completed("c1"), Presented::default()), Err(IngestError::Forbidden(_))));
        assert!(matches!(a.check(&completed("c1"), bearer(KEY)), Err(IngestError::Forbidden(_))));
        assert!(a.check(&completed("c1"), Presented { bearer: None, callback_token: Some(&token) }).is_ok());
        assert!(a.check(&completed("c1"), bearer(&token)).is_ok());
        // The token of one conversation's step is not another's.
        assert!(matches!(a.check(&completed("c2"), bearer(&token)), Err(IngestError::Forbidden(_))));
        // Over NATS only callbacks are checked.
        assert!(a.check_if_callback(&abort("c1"), Presented::default()).is_ok());
        assert!(a.check_if_callback(&completed("c1"), Presented::default()).is_err());
    }

    #[test]
    fn without_a_secret_callbacks_are_refused_and_without_keys_clients_are_open() {
        let open = Auth::new(&Secret::default(), &Secret::default()).expect("valid");
        assert!(open.is_open() && !open.takes_callbacks());
        assert!(open.check(&abort("c1"), Presented::default()).is_ok());
        assert!(matches!(open.check(&completed("c1"), Presented::default()), Err(IngestError::Forbidden(_))));
    }

    #[test]
    fn bad_keys_are_refused_without_quoting_them() {
        let err = Auth::new(&Secret::new("short"), &Secret::default()).expect_err("too short");
        assert!(!err.0.contains("short") && err.0.contains("entry 1"), "{err}");
        assert!(Auth::new(&Secret::default(), &Secret::new("tiny")).is_err());
    }

    #[test]
    fn credentials_are_read_from_headers() {
        let p = Presented::from_pairs([("Authorization", "Bearer abc"), ("conv-callback-token", " t ")]);
        assert_eq!((p.bearer, p.callback_token), (Some("abc"), Some("t")));
        let p = Presented::from_pairs([("authorization", "Basic abc")]);
        assert_eq!(p.bearer, None);
    }
}

//! Client API keys (`CONV_INGRESS_API_KEYS`): who may post to a
//! conversation at ingress and read it at projections (ADR 0009).
//!
//! Comma-separated entries, each `key` or `key:<conversation-id prefix>`;
//! keys are at least 16 printable ASCII characters. A key is kept only as
//! its SHA-256 digest and compared in constant time; errors never quote one.

use sha2::{Digest, Sha256};

use crate::secret::Secret;

#[derive(Debug, Clone)]
struct ApiKey {
    digest: [u8; 32],
    /// Conversation-id prefix the key is limited to (empty: all).
    prefix: String,
}

/// The configured client keys.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// Why a client was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No key, or not one of ours (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A key for other conversations (403).
    #[error("{0}")]
    Forbidden(String),
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    /// Parses the configured list.
    pub fn new(list: &Secret) -> Result<Self, crate::service::Invalid> {
        let mut keys = Vec::new();
        for (i, entry) in list.expose().split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (key, prefix) = entry.split_once(':').unwrap_or((entry, ""));
            if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "CONV_INGRESS_API_KEYS entry {} is not a usable key: keys are at least 16 printable \
                     ASCII characters, optionally followed by :<conversation-id prefix>",
                    i + 1
                )
                .into());
            }
            keys.push(ApiKey { digest: digest(key.as_bytes()), prefix: prefix.to_owned() });
        }
        Ok(Self { keys })
    }

    /// No keys: anyone who reaches the service may use it (loopback only).
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `bearer` for `conversation`; the index of the key that
    /// allowed it (for per-key limits), `None` when open.
    pub fn check(&self, conversation: &str, bearer: Option<&str>) -> Result<Option<usize>, KeyError> {
        if self.is_open() {
            return Ok(None);
        }
        let Some(bearer) = bearer else {
            return Err(KeyError::Unauthorized("send an API key as `Authorization: Bearer <key>`".into()));
        };
        let presented = digest(bearer.as_bytes());
        // Every key is compared, so the time does not tell which one matched.
        let matched: Vec<(usize, &ApiKey)> =
            self.keys.iter().enumerate().filter(|(_, k)| same(&k.digest, &presented)).collect();
        if matched.is_empty() {
            return Err(KeyError::Unauthorized("the API key is not valid".into()));
        }
        match matched.iter().find(|(_, k)| conversation.starts_with(&k.prefix)) {
            Some((i, _)) => Ok(Some(*i)),
            None => Err(KeyError::Forbidden(format!("this API key does not cover conversation {conversation}"))),
        }
    }
}

impl ApiKeys {
    /// The conversation-id prefixes `bearer` covers (`[""]`: all), for
    /// listing conversations; `None` when open.
    pub fn prefixes(&self, bearer: Option<&str>) -> Result<Option<Vec<String>>, KeyError> {
        if self.is_open() {
            return Ok(None);
        }
        let Some(bearer) = bearer else {
            return Err(KeyError::Unauthorized("send an API key as `Authorization: Bearer <key>`".into()));
        };
        let presented = digest(bearer.as_bytes());
        let prefixes: Vec<String> =
            self.keys.iter().filter(|k| same(&k.digest, &presented)).map(|k| k.prefix.clone()).collect();
        if prefixes.is_empty() {
            return Err(KeyError::Unauthorized("the API key is not valid".into()));
        }
        Ok(Some(prefixes))
    }
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(authorization: &str) -> Option<&str> {
    let value = authorization.trim();
    let scheme = value.get(..7)?;
    scheme.eq_ignore_ascii_case("bearer ").then(|| value[7..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "k-0123456789abcdef";
    const TEAM: &str = "t-0123456789abcdef";

    #[test]
    fn a_key_covers_its_conversations() {
        let keys = ApiKeys::new(&Secret::new(format!("{KEY}, {TEAM}:team-a-"))).expect("valid");
        assert!(matches!(keys.check("c1", None), Err(KeyError::Unauthorized(_))));
        assert!(matches!(keys.check("c1", Some("wrong-key-0123456789")), Err(KeyError::Unauthorized(_))));
        assert_eq!(keys.check("c1", Some(KEY)), Ok(Some(0)));
        assert_eq!(keys.check("team-a-1", Some(TEAM)), Ok(Some(1)));
        assert!(matches!(keys.check("team-b-1", Some(TEAM)), Err(KeyError::Forbidden(_))));
        let open = ApiKeys::new(&Secret::default()).expect("valid");
        assert!(open.is_open());
        assert_eq!(open.check("c1", None), Ok(None));
        assert_eq!(open.prefixes(None), Ok(None));
        assert_eq!(keys.prefixes(Some(KEY)), Ok(Some(vec![String::new()])));
        assert_eq!(keys.prefixes(Some(TEAM)), Ok(Some(vec!["team-a-".to_owned()])));
        assert!(matches!(keys.prefixes(Some("wrong-key-0123456789")), Err(KeyError::Unauthorized(_))));
        assert!(matches!(keys.prefixes(None), Err(KeyError::Unauthorized(_))));
    }

    #[test]
    fn bad_keys_are_refused_without_quoting_them() {
        let err = ApiKeys::new(&Secret::new("short")).expect_err("too short");
        assert!(!err.0.contains("short") && err.0.contains("entry 1"), "{err}");
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bear"), None);
    }
}

//! Secrets in configuration: never printed, never in an error.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// A secret value (password, key, HMAC secret). `Debug` and `Display` show
/// only whether it is set; [`Secret::expose`] is the one way to the value.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(unset)" } else { "Secret(***)" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "(unset)" } else { "***" })
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// `url` with any `user:password@` (or token) replaced by `***@`, for logs
/// and errors. Every URL of a comma-separated list is redacted.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, one),
            };
            // The last `@` ends the credentials, whatever they hold (`/` too).
            let redacted = match rest.rfind('@') {
                Some(at) => format!("***{}", &rest[at..]),
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{redacted}"),
                None => redacted,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(format!("{:?}", Secret::default()), "Secret(unset)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("nats://admin:hunter2@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
        assert_eq!(redact_url("nats://tok@h:1,nats://h:2"), "nats://***@h:1,nats://h:2");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("u:p@host:4222"), "***@host:4222");
        assert_eq!(redact_url("nats://u:pa/ss@h:1"), "nats://***@h:1");
    }
}

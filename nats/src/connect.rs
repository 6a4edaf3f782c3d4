//! Connecting to NATS.

use std::time::Duration;

use serde::Deserialize;

use crate::secret::{Secret, redact_url};

/// Default NATS URL (pinned).
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// How to reach NATS. Env overrides: `NATS_URL` (a comma-separated list of
/// servers is fine), `NATS_USER`, `NATS_PASSWORD`, `NATS_CREDS`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    /// User name (with `password`); empty: none, or what the URL carries.
    pub user: String,
    pub password: Secret,
    /// A NATS credentials file (JWT + nkey seed); empty: none.
    pub creds: String,
    /// Connect timeout of one attempt, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Timeout of JetStream API requests and publish acks, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_owned(),
            user: String::new(),
            password: Secret::default(),
            creds: String::new(),
            connect_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
        }
    }
}

impl NatsConfig {
    pub fn validate(&self) -> Result<(), crate::service::Invalid> {
        if self.url.trim().is_empty() {
            return Err("nats.url must not be empty".into());
        }
        self.servers()?;
        if self.connect_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err("nats timeouts must be positive".into());
        }
        if self.user.is_empty() != self.password.is_empty() {
            return Err("nats.user and nats.password (NATS_USER, NATS_PASSWORD) go together".into());
        }
        if !self.creds.is_empty() && !self.user.is_empty() {
            return Err("set either nats.creds (NATS_CREDS) or nats.user/password, not both".into());
        }
        Ok(())
    }

    /// The servers of `url`: one, or several separated by commas (the NATS
    /// convention, e.g. the three nodes of a cluster); the client connects
    /// to one of them and fails over to the others.
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, crate::service::Invalid> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<async_nats::ServerAddr>().map_err(|e| {
                    format!("nats.url (NATS_URL): {:?} is not a server address: {e}", redact_url(s)).into()
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| if v.is_empty() { Err("nats.url (NATS_URL) names no server".into()) } else { Ok(v) })
    }

    /// The URL for logs and errors: credentials replaced by `***`.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    async fn options(&self, name: &str) -> Result<async_nats::ConnectOptions, ConnectError> {
        let base = if !self.creds.is_empty() {
            async_nats::ConnectOptions::with_credentials_file(&self.creds).await.map_err(|e| {
                ConnectError::config(self, format!("cannot read the credentials file {}: {e}", self.creds))
            })?
        } else if !self.user.is_empty() {
            // Replies to this user's requests come to its own prefix, the
            // one its NATS permissions let it read (nats/config/auth.conf).
            async_nats::ConnectOptions::with_user_and_password(self.user.clone(), self.password.expose().to_owned())
                .custom_inbox_prefix(format!("_INBOX_{}", self.user))
        } else {
            async_nats::ConnectOptions::new()
        };
        Ok(base
            .event_callback(|event| async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    DISCONNECTS.send_modify(|n| *n += 1);
                }
                tracing::info!(message = "NATS connection event.", %event);
            })
            .name(name)
            .connection_timeout(Duration::from_millis(self.connect_timeout_ms))
            .request_timeout(Some(self.request_timeout()))
            .max_reconnects(None))
    }
}

/// Disconnects of this process's NATS connections so far.
static DISCONNECTS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(0).0);

/// Awaits `fut` unless a NATS connection of this process drops meanwhile
/// (`None` then). A request or publish written before a disconnect is never
/// answered after the reconnect; without this, its caller would wait for
/// the whole request timeout before retrying (found by `convctl chaos`: a
/// NATS restart held replies ~3.5 s longer). Only for what is safe to retry.
pub async fn unless_disconnected<F: std::future::IntoFuture>(fut: F) -> Option<F::Output> {
    let mut dropped = DISCONNECTS.subscribe();
    tokio::select! {
        out = fut.into_future() => Some(out),
        _ = dropped.changed() => None,
    }
}

/// Why a connection could not be made (the URL without its credentials).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {detail}")]
pub struct ConnectError {
    pub url: String,
    pub detail: String,
    /// The server refused the credentials (an authorization violation).
    pub refused: bool,
}

impl ConnectError {
    fn new(config: &NatsConfig, source: &async_nats::ConnectError) -> Self {
        // The client's message may quote the URL it was given.
        let detail = source.to_string().replace(&config.url, &config.display_url());
        let refused = matches!(
            source.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation | async_nats::ConnectErrorKind::Authentication
        );
        Self { url: config.display_url(), detail, refused }
    }

    fn config(config: &NatsConfig, detail: String) -> Self {
        Self { url: config.display_url(), detail, refused: false }
    }
}

/// Connects once and fails if NATS does not answer (for CLIs and tests).
pub async fn connect(config: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    let servers = config.servers().map_err(|detail| ConnectError::config(config, detail.0))?;
    config.options(name).await?.connect(servers).await.map_err(|e| ConnectError::new(config, &e))
}

/// Returns at once and keeps trying in the background (for services: they
/// boot while NATS is down and report not-ready until it answers).
pub async fn connect_lazy(config: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    config
        .options(name)
        .await?
        .retry_on_initial_connect()
        .connect(config.servers().map_err(|detail| ConnectError::config(config, detail.0))?)
        .await
        .map_err(|e| ConnectError::new(config, &e))
}

/// `max_payload` of a NATS server configured without one (1 MiB).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The largest message the client may publish: the `max_payload` it
/// negotiated, kept while it reconnects (the server info reads 0 then: a
/// 285-byte message got 413 during a NATS restart, found by `convctl
/// chaos`); the NATS default before any connection.
pub fn max_payload(client: &async_nats::Client) -> usize {
    match client.max_payload() {
        0 => DEFAULT_MAX_PAYLOAD,
        known => known,
    }
}

/// A JetStream context with the configured request timeout.
pub fn jetstream(client: async_nats::Client, config: &NatsConfig) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new().timeout(config.request_timeout()).build(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> NatsConfig {
        NatsConfig { url: url.to_owned(), ..Default::default() }
    }

    #[test]
    fn a_url_may_list_several_servers() {
        assert_eq!(with_url("nats://127.0.0.1:4222").servers().map(|s| s.len()), Ok(1));
        let cluster = with_url("nats://127.0.0.1:4222,nats://127.0.0.1:4223, nats://127.0.0.1:4224");
        assert_eq!(cluster.servers().map(|s| s.len()), Ok(3));
        assert!(cluster.validate().is_ok());
        assert_eq!(with_url("127.0.0.1:4222,127.0.0.1:4223").servers().map(|s| s.len()), Ok(2));
    }

    #[test]
    fn a_bad_server_in_the_list_is_named_without_its_credentials() {
        let err = with_url("nats://127.0.0.1:4222,nats://admin:hunter2@h:notaport").validate().expect_err("refused");
        assert!(err.0.contains("NATS_URL"), "{err}");
        assert!(err.0.contains("***@h:notaport"), "{err}");
        assert!(!err.0.contains("hunter2"), "{err}");
        assert!(with_url(" , ").validate().is_err());
    }
}

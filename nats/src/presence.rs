//! Every service instance announces itself in the `conv_leases` bucket under
//! `svc.<service>.<instance>`: its HTTP address (for `/readyz` and
//! `/metrics`), version and start time, refreshed a few times per lease TTL.
//! The bucket's max age (the lease TTL) removes the key of an instance that
//! died; a clean stop deletes it at once. `convctl readiness` reads the keys
//! to find every running instance and asks each one for `/readyz`, so a
//! service that is down shows as missing rather than as an address that does
//! not answer.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::topology::KV_LEASES;

/// Key prefix of the announcements.
pub const PREFIX: &str = "svc.";

/// What an instance says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub service: String,
    pub instance: String,
    /// Where its HTTP endpoints answer (`host:port`).
    pub addr: String,
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
}

/// The key of an instance's announcement.
pub fn key(service: &str, instance: &str) -> String {
    format!("{PREFIX}{service}.{instance}")
}

/// The address others reach a listener on: `CONV_ADVERTISE_ADDR` when set;
/// else an unspecified host (`0.0.0.0`, `[::]`) becomes this machine's own
/// address as `/etc/hosts` maps its host name (a container's bridge address
/// in Compose, which the host and the other containers reach), or the host
/// name itself.
pub fn advertised(addr: SocketAddr) -> String {
    if let Ok(a) = std::env::var("CONV_ADVERTISE_ADDR")
        && !a.trim().is_empty()
    {
        return a.trim().to_owned();
    }
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    let Some(host) = host else { return format!("127.0.0.1:{}", addr.port()) };
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    match own_address(&hosts, &host) {
        Some(ip) => SocketAddr::new(ip, addr.port()).to_string(),
        None => format!("{host}:{}", addr.port()),
    }
}

/// The non-loopback address `/etc/hosts` gives `host`.
fn own_address(hosts: &str, host: &str) -> Option<std::net::IpAddr> {
    hosts.lines().find_map(|line| {
        let mut words = line.split('#').next()?.split_whitespace();
        let ip: std::net::IpAddr = words.next()?.parse().ok()?;
        (!ip.is_loopback() && words.any(|w| w == host)).then_some(ip)
    })
}

/// Announces `service` at `addr` until `shutdown`, then withdraws. Runs in
/// the background; waits for the bucket (`convctl setup`) and for NATS.
pub fn spawn(
    js: jetstream::Context,
    service: &'static str,
    addr: SocketAddr,
    ttl: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let announcement = Announcement {
        service: service.to_owned(),
        instance: uuid::Uuid::now_v7().simple().to_string(),
        addr: advertised(addr),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let every = (ttl / 4).max(Duration::from_millis(250));
    tokio::spawn(async move {
        let key = key(service, &announcement.instance);
        let value: bytes::Bytes = match serde_json::to_vec(&announcement) {
            Ok(v) => v.into(),
            Err(error) => {
                tracing::error!(message = "Cannot encode the announcement.", %error);
                return;
            }
        };
        let mut bucket = None;
        loop {
            if bucket.is_none() {
                bucket = js.get_key_value(KV_LEASES).await.ok();
            }
            if let Some(kv) = &bucket
                && let Err(error) = kv.put(&key, value.clone()).await
            {
                tracing::debug!(message = "Announcement not refreshed; next round.", %error);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        if let Some(kv) = bucket
            && let Err(error) = kv.delete(&key).await
        {
            tracing::debug!(message = "Announcement not withdrawn; it expires by itself.", %error);
        }
    })
}

/// Why the instances could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("{KV_LEASES}: {0}")]
    Bucket(#[from] jetstream::context::KeyValueError),
    #[error("{KV_LEASES} keys: {0}")]
    Keys(#[from] jetstream::kv::HistoryError),
    #[error("{KV_LEASES} keys: {0}")]
    Key(#[from] jetstream::kv::WatcherError),
    #[error("{key}: {source}")]
    Entry { key: String, source: jetstream::kv::EntryError },
}

/// Every instance announced now.
pub async fn list(js: &jetstream::Context) -> Result<Vec<Announcement>, ListError> {
    let kv = js.get_key_value(KV_LEASES).await?;
    let mut keys = kv.keys().await?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if !key.starts_with(PREFIX) {
            continue;
        }
        match kv.get(&key).await {
            Ok(Some(v)) => match serde_json::from_slice::<Announcement>(&v) {
                Ok(a) => out.push(a),
                Err(error) => tracing::warn!(message = "An unreadable announcement.", key, %error),
            },
            // Expired or withdrawn since the listing.
            Ok(None) => {}
            Err(source) => return Err(ListError::Entry { key, source }),
        }
    }
    out.sort_by(|a, b| (&a.service, &a.started_at, &a.instance).cmp(&(&b.service, &b.started_at, &b.instance)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_addresses() {
        assert_eq!(key("conv-runtime", "0190abc"), "svc.conv-runtime.0190abc");
        assert_eq!(advertised("127.0.0.1:9101".parse().expect("addr")), "127.0.0.1:9101");
        let any = advertised("0.0.0.0:9101".parse().expect("addr"));
        assert!(any.ends_with(":9101") && !any.starts_with("0.0.0.0"), "{any}");
        let hosts = "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n172.18.0.5\t3f2a9c1b7d4e  # the container\n";
        assert_eq!(own_address(hosts, "3f2a9c1b7d4e"), Some("172.18.0.5".parse().expect("ip")));
        assert_eq!(own_address(hosts, "localhost"), None, "loopback is not an address others reach");
        assert_eq!(own_address(hosts, "elsewhere"), None);
    }
}

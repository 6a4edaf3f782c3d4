//! Partition ownership: every partition has one owner at a time, among the
//! instances of one role (the runtime, the projections).
//!
//! Instances announce themselves in the `conv_leases` bucket
//! (`<role>members.<instance>`, refreshed every heartbeat, expiring with the
//! bucket's TTL when an instance dies). Each instance computes the same
//! assignment from the sorted member list (partition `p` belongs to member
//! `p mod n`), takes a lease on each of its partitions (`<role>p.<p>`, created only
//! if absent, renewed with the expected revision) and starts a worker; it
//! stops the workers of partitions that are no longer its own and releases
//! their leases. Leases expire with the bucket TTL too, and the bucket puts
//! a marker when a key ages out: instances watch their role's keys, so the
//! partitions of a killed instance are taken over as soon as its leases
//! expire, not on the next heartbeat.
//!
//! Leases and the pinned-client consumers are not exclusivity on their own:
//! the runtime's snapshot revision and the views' revision-checked writes are
//! the last guard, and a worker that loses it gives its partition up.
//!
//! A worker also gets its [`Lease`]: how long the lease is surely still its
//! own — the send time of the last successful create or renewal plus the
//! bucket TTL less a quarter (the server counts the TTL from its own, later,
//! receipt). Nobody else can take the lease before then, so a worker that
//! checks [`Lease::valid`] before it publishes never writes beside the next
//! owner, even when renewals stall because the bucket is unavailable (a
//! cluster electing the bucket's leader) and nobody tells it that the lease
//! lapsed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The role's ownership metrics (its own names, registered by the service).
#[derive(Debug, Clone)]
pub struct OwnershipMetrics {
    /// Partitions taken or given up.
    pub rebalances: prometheus::IntCounter,
    /// Partitions this instance runs.
    pub owned: prometheus::IntGauge,
}

/// How ownership is coordinated.
#[derive(Debug, Clone)]
pub struct OwnershipConfig {
    pub partitions: u16,
    /// Membership and lease refresh interval (well below the bucket TTL).
    pub heartbeat: Duration,
    /// Key prefix of the role (`""` for the runtime, `"views."` for the
    /// projections): roles share the bucket, not partitions.
    pub role: &'static str,
    /// Time-to-live of the leases (the bucket's max age, `owner_ttl_secs`).
    pub ttl: Duration,
    pub metrics: OwnershipMetrics,
}

impl OwnershipConfig {
    /// The partitions of `topology`, leases refreshed every `heartbeat_ms`
    /// and expiring after its `owner_ttl_secs`.
    pub fn of(
        topology: &crate::TopologyConfig,
        heartbeat_ms: u64,
        role: &'static str,
        metrics: OwnershipMetrics,
    ) -> Self {
        OwnershipConfig {
            partitions: topology.partitions,
            heartbeat: Duration::from_millis(heartbeat_ms),
            ttl: Duration::from_secs(topology.owner_ttl_secs),
            role,
            metrics,
        }
    }
}

/// The instance id a service owns partitions as: the configured one, else a
/// fresh UUID (a restarted process is a new member).
pub fn instance_id(configured: &str) -> String {
    if configured.is_empty() { uuid::Uuid::now_v7().simple().to_string() } else { configured.to_owned() }
}

/// Until when a worker's lease is surely its own (see the module docs).
#[derive(Debug, Clone)]
pub struct Lease(Arc<AtomicU64>);

/// The instant leases count from (milliseconds after it fit an `AtomicU64`).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Lease {
    /// A lease valid until `until`.
    pub fn until(until: Instant) -> Self {
        let lease = Lease(Arc::new(AtomicU64::new(0)));
        lease.extend(until);
        lease
    }

    /// Moves the end of the lease to `until` (never backwards).
    pub fn extend(&self, until: Instant) {
        let ms = u64::try_from(until.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_max(ms, Ordering::SeqCst);
    }

    /// True while nobody else can hold the lease.
    pub fn valid(&self) -> bool {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.0.load(Ordering::SeqCst)
    }
}

impl OwnershipConfig {
    /// How long after sending a create or renewal the lease is surely ours.
    fn sure_for(&self) -> Duration {
        self.ttl.saturating_sub(self.ttl / 4)
    }
}

/// What runs a partition once its lease is taken.
pub trait Partitions: Send + Sync + 'static {
    /// Why a partition worker stopped by itself.
    type Stopped: std::fmt::Display + Send + 'static;
    /// Starts the worker of `partition`; it stops when `stop` fires. It
    /// must not publish once `lease` is no longer valid.
    fn start(&self, partition: u16, stop: CancellationToken, lease: Lease) -> JoinHandle<Result<(), Self::Stopped>>;
}

/// Any function that starts a partition's worker is a [`Partitions`].
impl<F, E> Partitions for F
where
    F: Fn(u16, CancellationToken, Lease) -> JoinHandle<Result<(), E>> + Send + Sync + 'static,
    E: std::fmt::Display + Send + 'static,
{
    type Stopped = E;

    fn start(&self, partition: u16, stop: CancellationToken, lease: Lease) -> JoinHandle<Result<(), E>> {
        self(partition, stop, lease)
    }
}

struct Running<E> {
    stop: CancellationToken,
    lease: Lease,
    task: JoinHandle<Result<(), E>>,
    lease_revision: u64,
}

/// The partitions `me` should own among `members`.
pub fn assignment(partitions: u16, members: &[String], me: &str) -> Vec<u16> {
    let mut sorted: Vec<&String> = members.iter().collect();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return Vec::new();
    }
    (0..partitions).filter(|p| sorted[usize::from(*p) % sorted.len()] == me).collect()
}

fn lease_key(role: &str, p: u16) -> String {
    format!("{role}p.{p}")
}

/// Runs the ownership loop until `shutdown`, then stops every worker and
/// releases every lease.
pub async fn run<P: Partitions>(
    instance: String,
    owners: kv::Store,
    parts: Arc<P>,
    config: OwnershipConfig,
    shutdown: CancellationToken,
) {
    let role = config.role;
    let metrics = &config.metrics;
    let mut running: BTreeMap<u16, Running<P::Stopped>> = BTreeMap::new();
    let mut tick = tokio::time::interval(config.heartbeat);
    // After a stall, one round, not a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let member_key = format!("{role}members.{instance}");
    let mut changes: Option<kv::Watch> = None;
    let mut members: Vec<String> = Vec::new();
    loop {
        if changes.is_none() {
            // Bounded: watching again must not hold up the heartbeat.
            changes = tokio::time::timeout(config.heartbeat, watch(&owners, role)).await.ok().flatten();
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            change = next_change(&mut changes) => match change {
                Some(entry) if wakes(&entry.key, entry.operation, role, &members) => {
                    tracing::debug!(message = "Ownership change seen.", key = %entry.key, operation = ?entry.operation);
                }
                Some(_) => continue,
                None => {
                    changes = None; // watched again on the next round; ticks meanwhile
                    continue;
                }
            },
        }
        // A request lost with a dropped connection is never answered: give
        // up on it well before the client's request timeout, so a NATS
        // restart does not stall the round (a lease not renewed within
        // this has about expired anyway).
        let patience = config.heartbeat * 3;
        // Renew what we run first, all at once: the workers' leases must not
        // wait for the membership calls, nor one another.
        let sent = Instant::now();
        let renewals = running.iter().map(|(p, r)| {
            let owners = &owners;
            let value = Bytes::from(instance.clone());
            async move {
                (*p, tokio::time::timeout(patience, owners.update(lease_key(role, *p), value, r.lease_revision)).await)
            }
        });
        let mut lost = Vec::new();
        for (p, renewed) in futures::future::join_all(renewals).await {
            match renewed {
                Ok(Ok(rev)) => {
                    if let Some(r) = running.get_mut(&p) {
                        r.lease_revision = rev;
                        r.lease.extend(sent + config.sure_for());
                    }
                }
                // The bucket did not answer (a cluster electing its leader):
                // the lease may still be ours. The worker stops publishing
                // when it runs out; a later renewal tells.
                Err(_) => tracing::debug!(message = "Lease renewal timed out.", partition = p),
                Ok(Err(error)) if unavailable(&error) => {
                    tracing::debug!(message = "Lease renewal not answered.", partition = p, %error);
                }
                Ok(Err(error)) => {
                    tracing::warn!(message = "Lease lost.", partition = p, %error);
                    lost.push(p);
                }
            }
        }
        for p in lost {
            if let Some(r) = running.remove(&p) {
                r.stop.cancel();
                if let Ok(Err(stopped)) = r.task.await {
                    tracing::warn!(message = "Partition worker stopped.", partition = p, reason = %stopped);
                }
                metrics.rebalances.inc();
            }
        }
        if let Err(error) = within(patience, owners.put(&member_key, Bytes::from(instance.clone()))).await {
            tracing::warn!(message = "Membership heartbeat failed.", %error);
            continue;
        }
        members = match within(patience, live_members(&owners, role)).await {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(message = "Cannot list members.", %error);
                continue;
            }
        };
        let target = assignment(config.partitions, &members, &instance);

        // Workers that ended by themselves (stale owner, failure).
        let finished: Vec<u16> = running.iter().filter(|(_, r)| r.task.is_finished()).map(|(p, _)| *p).collect();
        for p in finished {
            if let Some(r) = running.remove(&p) {
                match r.task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(stopped)) => {
                        tracing::warn!(message = "Partition worker stopped.", partition = p, reason = %stopped)
                    }
                    Err(join) => tracing::error!(message = "Partition worker panicked.", partition = p, error = %join),
                }
                release(&owners, role, p, r.lease_revision).await;
                metrics.rebalances.inc();
            }
        }
        // Give up what is no longer ours.
        let leaving: Vec<u16> = running.keys().copied().filter(|p| !target.contains(p)).collect();
        for p in leaving {
            if let Some(r) = running.remove(&p) {
                stop(p, r, &owners, role).await;
                metrics.rebalances.inc();
            }
        }
        // Take what is ours and free.
        for p in target {
            if running.contains_key(&p) {
                continue;
            }
            let sent = Instant::now();
            let Ok(created) =
                tokio::time::timeout(patience, owners.create(lease_key(role, p), Bytes::from(instance.clone()))).await
            else {
                // Maybe created, maybe not: if it was, it expires unrenewed and is taken then.
                tracing::warn!(message = "Taking a lease timed out.", partition = p);
                continue;
            };
            match created {
                Ok(lease_revision) => {
                    let stop = shutdown.child_token();
                    let lease = Lease::until(sent + config.sure_for());
                    let task = parts.start(p, stop.clone(), lease.clone());
                    running.insert(p, Running { stop, lease, task, lease_revision });
                    metrics.rebalances.inc();
                    tracing::info!(message = "Partition taken.", partition = p, instance = %instance);
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {} // its owner lets go soon
                Err(error) => tracing::warn!(message = "Cannot take a lease.", partition = p, %error),
            }
        }
        metrics.owned.set(i64::try_from(running.len()).unwrap_or(i64::MAX));
    }
    for (p, r) in std::mem::take(&mut running) {
        stop(p, r, &owners, role).await;
    }
    if let Err(error) = owners.delete(&member_key).await {
        tracing::debug!(message = "Cannot delete the member key; it expires.", %error);
    }
    metrics.owned.set(0);
}

async fn stop<E: std::fmt::Display>(p: u16, r: Running<E>, owners: &kv::Store, role: &str) {
    r.stop.cancel();
    match r.task.await {
        Ok(Ok(())) => {}
        Ok(Err(stopped)) => tracing::warn!(message = "Partition worker stopped.", partition = p, reason = %stopped),
        Err(join) => tracing::error!(message = "Partition worker panicked.", partition = p, error = %join),
    }
    release(owners, role, p, r.lease_revision).await;
}

/// Deletes our lease if it is still ours (same revision).
async fn release(owners: &kv::Store, role: &str, p: u16, revision: u64) {
    if let Err(error) = owners.delete_expect_revision(lease_key(role, p), Some(revision)).await {
        tracing::debug!(message = "Lease not released; it expires.", partition = p, %error);
    }
}

/// True when a KV update failed because the bucket did not answer, not
/// because the key changed.
fn unavailable(error: &kv::UpdateError) -> bool {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    match error.kind() {
        kv::UpdateErrorKind::TimedOut => true,
        kv::UpdateErrorKind::Other => std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<PublishError>())
            .is_some_and(|e| matches!(e.kind(), PublishErrorKind::StreamNotFound | PublishErrorKind::BrokenPipe)),
        _ => false,
    }
}

/// Why a lease-bucket operation did not complete.
#[derive(Debug, thiserror::Error)]
enum Slow<E> {
    #[error("timed out")]
    TimedOut,
    #[error(transparent)]
    Failed(E),
}

/// `fut` given at most `patience`.
async fn within<T, E>(patience: Duration, fut: impl std::future::Future<Output = Result<T, E>>) -> Result<T, Slow<E>> {
    match tokio::time::timeout(patience, fut).await {
        Ok(result) => result.map_err(Slow::Failed),
        Err(_) => Err(Slow::TimedOut),
    }
}

/// Why the members could not be listed.
#[derive(Debug, thiserror::Error)]
enum ListError {
    #[error("listing the lease keys: {0}")]
    Keys(#[from] kv::HistoryError),
    #[error("listing the lease keys: {0}")]
    Key(#[from] kv::WatcherError),
}

/// What a new owner of a partition does to its pinned consumer before it
/// pulls: takes the pin at once (instead of waiting for the old owner's to
/// expire) and resets the consumer to its ack floor, so that what the old
/// owner held unacked is delivered again now, in order, instead of after
/// the ack wait. Only safe under the partition's lease: the old owner is
/// gone or has stopped and handed its messages back. Failures are logged:
/// the pin then expires and the ack wait redelivers, as without this.
pub async fn take_consumer<I>(stream: &async_nats::jetstream::stream::Stream<I>, consumer: &str, group: &str) {
    if let Err(error) = stream.unpin_consumer(consumer, group).await {
        tracing::debug!(message = "Nothing to unpin.", consumer, %error);
    }
    if let Err(error) = stream.reset_consumer(consumer, None).await {
        tracing::warn!(message = "Cannot reset the consumer; held messages come back after the ack wait.", consumer, %error);
    }
}

/// Watches the role's member and lease keys, so that an instance that left
/// (its keys deleted on shutdown, or expired: the bucket places a marker
/// when a key ages out) is noticed at once instead of on the next tick.
async fn watch(owners: &kv::Store, role: &str) -> Option<kv::Watch> {
    match owners.watch_many([format!("{role}members.>"), format!("{role}p.>")]).await {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::warn!(message = "Cannot watch the leases; changes are seen on the heartbeat.", %error);
            None
        }
    }
}

/// The next change, or `None` when the watch ended (pending forever without
/// a watch). Errors (missed heartbeats while NATS restarts) are logged and
/// skipped: the watch's ordered consumer recreates itself.
async fn next_change(changes: &mut Option<kv::Watch>) -> Option<kv::Entry> {
    let Some(w) = changes else { return std::future::pending().await };
    loop {
        match w.next().await {
            Some(Ok(entry)) => return Some(entry),
            Some(Err(error)) => {
                tracing::debug!(message = "Lease watch hiccup.", %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => return None,
        }
    }
}

/// Whether a change calls for a round now: a key deleted or expired, or a
/// member that was not there on the last round. Heartbeats of known members
/// and lease renewals do not.
fn wakes(key: &str, operation: kv::Operation, role: &str, members: &[String]) -> bool {
    match operation {
        kv::Operation::Delete | kv::Operation::Purge => true,
        kv::Operation::Put => key
            .strip_prefix(role)
            .and_then(|k| k.strip_prefix("members."))
            .is_some_and(|id| !members.iter().any(|m| m == id)),
    }
}

async fn live_members(owners: &kv::Store, role: &str) -> Result<Vec<String>, ListError> {
    let prefix = format!("{role}members.");
    let mut keys = owners.keys().await?;
    let mut members = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(id) = key.strip_prefix(prefix.as_str()) {
            members.push(id.to_owned());
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_splits_evenly_and_covers_everything() {
        let members = vec!["b".to_owned(), "a".to_owned()];
        let a = assignment(16, &members, "a");
        let b = assignment(16, &members, "b");
        assert_eq!((a.len(), b.len()), (8, 8));
        let mut all: Vec<u16> = a.iter().chain(b.iter()).copied().collect();
        all.sort();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert_eq!(assignment(16, &["a".to_owned()], "a").len(), 16);
        assert!(assignment(16, &members, "c").is_empty());
    }

    #[test]
    fn only_departures_and_new_members_wake_the_loop() {
        use kv::Operation::{Delete, Purge, Put};
        let members = vec!["a".to_owned(), "b".to_owned()];
        // Expired (marker) or released keys: at once.
        assert!(wakes("members.a", Purge, "", &members));
        assert!(wakes("p.3", Purge, "", &members));
        assert!(wakes("views.p.3", Delete, "views.", &members));
        // A member not seen on the last round.
        assert!(wakes("members.c", Put, "", &members));
        assert!(wakes("views.members.c", Put, "views.", &members));
        // Heartbeats of known members and lease renewals wait for the tick.
        assert!(!wakes("members.a", Put, "", &members));
        assert!(!wakes("p.3", Put, "", &members));
        assert!(!wakes("views.members.b", Put, "views.", &members));
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[test]
    fn a_lease_is_valid_until_its_end_and_only_moves_forward() {
        let lease = Lease::until(Instant::now() + Duration::from_millis(200));
        assert!(lease.valid());
        lease.extend(Instant::now());
        assert!(lease.valid(), "never moved backwards");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!lease.valid(), "lapsed");
        lease.extend(Instant::now() + Duration::from_secs(5));
        assert!(lease.valid(), "renewed");
        let cfg = OwnershipConfig {
            partitions: 1,
            heartbeat: Duration::from_millis(500),
            role: "",
            ttl: Duration::from_secs(2),
            metrics: OwnershipMetrics {
                rebalances: prometheus::IntCounter::new("r", "r").expect("metric"),
                owned: prometheus::IntGauge::new("o", "o").expect("metric"),
            },
        };
        assert_eq!(cfg.sure_for(), Duration::from_millis(1500));
    }
}

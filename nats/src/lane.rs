//! A lane: a thread with a tokio runtime and a NATS connection of its own,
//! for work that must not wait behind a service's bulk traffic.
//!
//! In an abort storm a service's runtime has thousands of tasks to wake
//! (streams winding up, group commits, their publishes and acks) and its
//! main connection carries all their messages. A cancel read there waits
//! behind them. On a lane, the connection's reader and writer (async-nats
//! spawns them where the client connects), the pull tasks of consumers
//! (spawned where `messages()` is called) and the tasks spawned with
//! [`Lane::spawn`] all run on the lane's thread; other runtimes talk to
//! them through channels.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::connect::{ConnectError, NatsConfig};

/// A running lane.
#[derive(Debug)]
pub struct Lane {
    /// The lane's connection (driven on the lane's thread).
    pub client: async_nats::Client,
    handle: Handle,
    stop: CancellationToken,
    /// Taken by [`Lane::stop`].
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A lane dropped without [`Lane::stop`] (a service future dropped, a start
/// that failed later) still ends: its tasks are dropped and its connection
/// closes, without the flush.
impl Drop for Lane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why a lane could not start.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// No thread or runtime (the process is out of threads or memory).
    #[error("cannot start the lane's thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the lane's connection: {source}")]
    Connect {
        #[from]
        source: ConnectError,
    },
    /// The thread ended before it said whether it started.
    #[error("the lane stopped before it was ready")]
    Gone,
}

impl Lane {
    /// Starts a lane named `name` (its thread's name and its connection's).
    /// The connection is made like the services' own (`connect_lazy`: a
    /// server not up yet is retried in the background).
    pub async fn start(nats: &NatsConfig, name: &str) -> Result<Self, LaneError> {
        let (ready, started) = tokio::sync::oneshot::channel::<Result<(async_nats::Client, Handle), LaneError>>();
        let stop = CancellationToken::new();
        let (nats, connection, until) = (nats.clone(), name.to_owned(), stop.clone());
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                match crate::connect::connect_lazy(&nats, &connection).await {
                    Ok(client) => {
                        // Nobody waits any more (the start was dropped): end.
                        if ready.send(Ok((client, Handle::current()))).is_ok() {
                            until.cancelled().await;
                        }
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e.into()));
                    }
                }
            });
            // A DNS lookup of a reconnect in progress must not hold the stop.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
        let (client, handle) = started.await.map_err(|_| LaneError::Gone)??;
        Ok(Self { client, handle, stop, thread: Some(thread) })
    }

    /// Runs `task` on the lane's thread.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }

    /// Where to spawn onto the lane from elsewhere (a handle outlives the
    /// lane: a task spawned after the stop is dropped).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Flushes the connection (2 s at most), then stops the lane: its tasks
    /// are dropped and its thread ends.
    pub async fn stop(mut self) {
        crate::service::flush(&self.client).await;
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lane_runs_its_tasks_on_its_own_thread_and_stops() {
        // No server: the connection is lazy, the lane starts all the same.
        let nats = NatsConfig { url: "nats://127.0.0.1:1".into(), ..NatsConfig::default() };
        let lane = Lane::start(&nats, "conv-test-lane").await.expect("starts");
        let name = lane.spawn(async { std::thread::current().name().map(str::to_owned) }).await.expect("runs");
        assert_eq!(name.as_deref(), Some("conv-test-lane"));
        let pending = lane.spawn(std::future::pending::<()>());
        tokio::time::timeout(Duration::from_secs(5), lane.stop()).await.expect("stops");
        assert!(pending.await.expect_err("dropped at the stop").is_cancelled());
    }

    #[tokio::test]
    async fn a_lane_dropped_without_a_stop_ends_too() {
        let nats = NatsConfig { url: "nats://127.0.0.1:1".into(), ..NatsConfig::default() };
        let lane = Lane::start(&nats, "conv-test-lane-dropped").await.expect("starts");
        let pending = lane.spawn(std::future::pending::<()>());
        drop(lane);
        let ended = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("the lane's tasks end");
        assert!(ended.expect_err("dropped with the lane").is_cancelled());
    }
}

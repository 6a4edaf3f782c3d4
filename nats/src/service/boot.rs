//! Boot (NATS, health, traces, presence), serve, wait for the topology,
//! and stop.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use super::config::{Identity, Options, Settings};
use super::health::Health;

/// A service's NATS connection and health, ready to serve.
#[derive(Debug, Clone)]
pub struct Booted {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub health: Health,
    /// Trace spans go here (records nothing when traces are off).
    pub tracer: conv_telemetry::Tracer,
}

impl Booted {
    /// Before a service stops: sends what the client and the trace
    /// exporter still buffer, for at most 2 s each.
    pub async fn flush(&self) {
        flush(&self.client).await;
        self.tracer.flush(Duration::from_secs(2)).await;
    }
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Telemetry(#[from] conv_telemetry::StartError),
}

/// Connects to NATS (in the background: a service boots while NATS is down
/// and reports not-ready until it answers), sets up health and metrics, and
/// announces the instance ([`crate::presence`]) until `shutdown`.
pub async fn boot<O: Options>(
    id: &Identity,
    settings: &Settings<O>,
    registry: Registry,
    shutdown: &CancellationToken,
) -> Result<Booted, BootError> {
    let client = crate::connect::connect_lazy(&settings.nats, id.name).await?;
    let js = crate::connect::jetstream(client.clone(), &settings.nats);
    let health = Health::new(id.name, client.clone(), &settings.nats, &settings.topology, registry)?;
    let tracer = conv_telemetry::Tracer::start(&settings.service.telemetry, id.name, health.registry())?;
    crate::presence::spawn(
        js.clone(),
        id.name,
        settings.http_addr(),
        Duration::from_secs(settings.topology.owner_ttl_secs.max(1)),
        shutdown.clone(),
    );
    tracing::info!(message = "Booted.", service = id.name, nats = %settings.nats.display_url(), addr = %settings.http_addr());
    Ok(Booted { client, js, health, tracer })
}

/// An error of any kind, kept as the source of a [`ServiceError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a service stopped with an error (the one error type of the four
/// services' `run`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A setting the service refuses to run with (it would be unsafe).
    #[error("{0}")]
    Refused(String),
    /// A part of the service could not start or failed.
    #[error("{what}: {source}")]
    Part {
        what: &'static str,
        #[source]
        source: BoxError,
    },
}

impl ServiceError {
    /// `map_err` for a part of the service that failed.
    pub fn part<E: Into<BoxError>>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::Part { what, source: e.into() }
    }
}

/// A booted service with its HTTP server running: what every service's
/// `run` does before its own work ([`Running::start`]) and after it
/// ([`Running::stop`]).
#[derive(Debug)]
pub struct Running {
    pub booted: Booted,
    server: tokio::task::JoinHandle<Result<(), ServeError>>,
    shutdown: CancellationToken,
    name: &'static str,
}

impl Running {
    /// Boots ([`boot`]) and serves the health endpoints on the configured
    /// address until `shutdown`.
    pub async fn start<O: Options>(
        id: &Identity,
        settings: &Settings<O>,
        registry: Registry,
        shutdown: &CancellationToken,
    ) -> Result<Running, BootError> {
        Ok(Self::start_with(id, settings, registry, shutdown, |_| (Router::new(), ())).await?.0)
    }

    /// [`start`](Self::start), serving the router `api` makes from the
    /// booted service next to the health endpoints; `api`'s other result
    /// (what the service built for its router and needs after it) is
    /// returned with it.
    pub async fn start_with<O: Options, T>(
        id: &Identity,
        settings: &Settings<O>,
        registry: Registry,
        shutdown: &CancellationToken,
        api: impl FnOnce(&Booted) -> (Router, T),
    ) -> Result<(Running, T), BootError> {
        let booted = boot(id, settings, registry, shutdown).await?;
        let (router, made) = api(&booted);
        let router = router.merge(booted.health.router());
        // However the listener ends (it cannot bind, it panicked) the whole
        // service stops: nothing runs without its health endpoints.
        let (addr, limits, stop) = (settings.http_addr(), settings.service.http, shutdown.clone());
        let server = tokio::spawn(async move {
            let _stops_the_service = stop.clone().drop_guard();
            serve(addr, limits, router, stop, None).await
        });
        Ok((Running { booted, server, shutdown: shutdown.clone(), name: id.name }, made))
    }

    /// Stops ([`stop`](Self::stop)) because part `what` of the service
    /// could not start; returns the error the service ends with.
    pub async fn fail<E: Into<BoxError>>(self, what: &'static str, error: E) -> ServiceError {
        let _ = self.stop().await;
        ServiceError::part(what)(error)
    }

    /// Stops: cancels `shutdown` (every task of the service ends), waits
    /// for the HTTP server to drain, flushes NATS and traces.
    pub async fn stop(self) -> Result<(), ServiceError> {
        self.shutdown.cancel();
        let served = joined("HTTP server", self.server).await;
        self.booted.flush().await;
        tracing::info!(message = "Stopped.", service = self.name);
        match served {
            Some(served) => Ok(served?),
            None => Err(ServiceError::Part { what: "HTTP server", source: "the task panicked".into() }),
        }
    }
}

/// Runs `poll` every `period` (the first time at once) until `shutdown`:
/// the background refreshers of a service (a gauge, a backlog reading).
pub async fn every<F, Fut>(period: Duration, shutdown: &CancellationToken, mut poll: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => poll().await,
        }
    }
}

/// Waits for a task of a service; a task that panicked is logged (its
/// `what`) and yields `None`.
pub async fn joined<T>(what: &str, task: tokio::task::JoinHandle<T>) -> Option<T> {
    match task.await {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(message = "A service task failed.", task = what, %error);
            None
        }
    }
}

/// Why an HTTP listener stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Binds the service's address (reporting the actual one through `bound`)
/// and serves `router` with the configured limits ([`crate::http`]) until
/// `shutdown` fires, then drains open requests.
pub async fn serve(
    addr: SocketAddr,
    limits: crate::http::HttpLimits,
    router: Router,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    crate::http::serve(addr, router, limits, shutdown, bound).await
}

/// Tries `attach` once a second until it yields (the topology exists: `convctl
/// setup` ran) or `shutdown` fires (`None`). A service stays up, and not
/// ready, while it waits.
pub async fn wait_for<T, F, Fut>(shutdown: &CancellationToken, mut attach: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            found = attach() => if found.is_some() { return found },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Flushes what the client still buffers, for at most 2 s (a disconnected
/// client would wait forever).
pub async fn flush(client: &async_nats::Client) {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}

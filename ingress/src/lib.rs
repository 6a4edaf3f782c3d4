//! # conv-ingress
//!
//! The entry of conv. Every request goes the same way — normalize → validate
//! → append to `CONV_IN` (deduped by conversation, source and id) → answer 202 with
//! the stream sequence, only after the JetStream ack ([`core`]). Adapters turn
//! transports into that path: [`http`] (the pinned HTTP API plus tool, LLM
//! and timer callbacks) and [`nats_api`] (the same over NATS requests, in
//! `$SRV` discovery).
//!
//! Clients authenticate with API keys, callbacks with per-effect callback
//! tokens ([`auth`]).
//!
//! Nothing malformed is journaled: bad input gets 400/413/415/422 with
//! `{"error": {"code", "message"}}`; while JetStream is unavailable the
//! answer is 503 with `Retry-After`, never a 202.

pub mod auth;
pub mod core;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod nats_api;
pub mod options;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use conv_nats::service::{self, Identity, Settings};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub use crate::core::{Accepted, IngestError, Ingress};
pub use crate::options::IngressOptions;

/// Name, address variable and default address of this service.
pub const IDENTITY: Identity = Identity {
    name: "conv-ingress",
    about: "HTTP and NATS entry of conv: normalize, validate, journal to CONV_IN with dedupe, answer.",
    addr_env: "CONV_INGRESS_ADDR",
    default_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
    options_help: options::HELP,
};

/// Configuration: defaults → `CONV_CONFIG` TOML file → env, validated at start.
pub type Config = Settings<IngressOptions>;

/// Why the service stopped with an error.
pub type Error = service::ServiceError;

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let auth =
        auth::Auth::new(&config.options.api_keys, &config.options.callback_secret).map_err(|e| Error::Refused(e.0))?;
    let addr = config.http_addr();
    if auth.is_open() && !addr.ip().is_loopback() {
        return Err(Error::Refused(format!(
            "refusing to serve on {addr} without client keys: set CONV_INGRESS_API_KEYS, or listen on a loopback address"
        )));
    }
    if !auth.takes_callbacks() {
        tracing::warn!(message = "CONV_CALLBACK_SECRET is not set: LLM, tool and timer callbacks will be refused.");
    }
    let registry = Registry::new();
    let metrics = metrics::Metrics::new(&registry)?;
    let (running, ingress) = service::Running::start_with(&IDENTITY, &config, registry, &shutdown, |booted| {
        let ingress = Ingress {
            js: booted.js.clone(),
            metrics: metrics.clone(),
            options: config.options.clone(),
            auth: std::sync::Arc::new(auth),
            rates: std::sync::Arc::new(guard::RateLimits::new(config.options.rate_per_key, config.options.rate_burst)),
            shedding: std::sync::Arc::new(guard::Shedding::default()),
            tracer: booted.tracer.clone(),
        };
        (http::router(ingress.clone()), ingress)
    })
    .await?;
    let booted = &running.booted;
    let backlog = (config.options.shed_backlog > 0).then(|| {
        tokio::spawn(guard::watch_backlog(
            booted.js.clone(),
            config.topology.partitions,
            config.options.shed_backlog,
            Duration::from_millis(config.options.shed_poll_ms),
            ingress.shedding.clone(),
            shutdown.clone(),
        ))
    });

    let dead_letters =
        tokio::spawn(metrics::count_dead_letters(booted.client.clone(), metrics.clone(), shutdown.clone()));
    let dlq = tokio::spawn(metrics::watch_dlq(
        booted.js.clone(),
        metrics,
        Duration::from_secs(config.options.dlq_poll_secs),
        shutdown.clone(),
    ));
    let nats = config
        .options
        .nats_api
        .then(|| tokio::spawn(nats_api::serve(booted.client.clone(), ingress.clone(), shutdown.clone())));

    // Serve until shutdown (or until the listener fails, which cancels it).
    shutdown.cancelled().await;
    service::joined("DLQ watch", dlq).await;
    service::joined("dead-letter counter", dead_letters).await;
    if let Some(backlog) = backlog {
        service::joined("backlog watch", backlog).await;
    }
    // A NATS API that failed or panicked fails the service, as the HTTP server does.
    let nats_api: Result<(), service::BoxError> = match nats {
        Some(task) => match service::joined("NATS API", task).await {
            Some(served) => served.map_err(Into::into),
            None => Err("the NATS API task panicked".into()),
        },
        None => Ok(()),
    };
    running.stop().await?;
    nats_api.map_err(Error::part("ingress"))
}

//! The edge of a service process: arguments (`--help`, `--version`),
//! logging, signals, and [`main`].

use std::future::Future;

use tokio_util::sync::CancellationToken;

use super::config::{Identity, Invalid, LogFormat, Options, Settings, process_env};

/// Handles `--help` and `--version` of a service binary (services are
/// configured by env and file, not flags). Returns `true` when the process
/// should exit.
pub fn handle_args(id: &Identity, args: impl IntoIterator<Item = String>) -> Result<bool, Invalid> {
    if let Some(arg) = args.into_iter().nth(1) {
        match arg.as_str() {
            "-h" | "--help" => {
                println!(
                    "{name} {version}\n{about}\n\nUsage: {name}\n\nConfigured by environment (and an optional TOML file):\n  \
                     {addr_env:<22} listen address for /healthz /readyz /metrics (default {addr})\n  \
                     NATS_URL               NATS server, or several separated by commas (default {nats})\n  \
                     CONV_CONFIG            TOML file with [service], [nats], [topology], [options] sections\n  \
                     CONV_LOG_FORMAT        pretty | json (default pretty)\n  \
                     CONV_HTTP_HEADER_TIMEOUT_MS  a request head must arrive within this, also between keep-alive requests (default 30000)\n  \
                     CONV_HTTP_MAX_CONNECTIONS    open HTTP connections at most; more are closed at once (default 4096)\n  \
                     CONV_PARTITIONS        CONV_IN partitions (default 16)\n  \
                     CONV_REPLICAS          stream replicas (default 1)\n  \
                     CONV_<KEY>             any other [topology] key, e.g. CONV_MAX_DELIVER, CONV_OWNER_TTL_SECS (README)\n  \
                     RUST_LOG               log filter (default info)\n{options}\nTraces (OpenTelemetry, OTLP/HTTP JSON; README \"Traces\"):\n{otel}\n\nStops gracefully on SIGINT or SIGTERM.",
                    options = id.options_help,
                    otel = conv_telemetry::ENV_HELP,
                    name = id.name,
                    version = env!("CARGO_PKG_VERSION"),
                    about = id.about,
                    addr_env = id.addr_env,
                    addr = id.default_addr,
                    nats = crate::connect::DEFAULT_URL,
                );
                return Ok(true);
            }
            "-V" | "--version" => {
                println!("{} {}", id.name, env!("CARGO_PKG_VERSION"));
                return Ok(true);
            }
            other => {
                return Err(format!("unexpected argument {other:?}; see `{} --help`", id.name).into());
            }
        }
    }
    Ok(false)
}

/// Installs the global tracing subscriber (`RUST_LOG` filter, default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        signalled().await;
        tracing::info!(message = "Shutdown signal received.");
        trigger.cancel();
    });
    token
}

/// Returns on SIGINT or SIGTERM (Ctrl-C elsewhere): the one place that
/// knows which signals stop a conv process (services and `convctl`).
#[cfg(unix)]
pub async fn signalled() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
pub async fn signalled() {
    let _ = tokio::signal::ctrl_c().await;
}

/// The whole `main` of a service binary: `--help`/`--version`, layered
/// config, logging, a multi-threaded runtime, SIGINT/SIGTERM → shutdown
/// token, then `run(settings, shutdown)`. Errors print one line and exit 1
/// (2 for bad configuration or arguments).
pub fn main<O, F, Fut, E>(id: &Identity, run: F) -> std::process::ExitCode
where
    O: Options,
    F: FnOnce(Settings<O>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use std::process::ExitCode;
    match handle_args(id, std::env::args()) {
        Ok(true) => return ExitCode::SUCCESS,
        Ok(false) => {}
        Err(e) => {
            eprintln!("{}: {e}", id.name);
            return ExitCode::from(2);
        }
    }
    let settings = match Settings::<O>::load(id, &process_env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", id.name);
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.service.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", id.name);
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = shutdown_on_signals();
        run(settings, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(message = "Service failed.", error = %e);
            eprintln!("{}: {e}", id.name);
            ExitCode::FAILURE
        }
    }
}

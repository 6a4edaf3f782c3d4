//! # convctl
//!
//! The operator CLI of conv. `main.rs` parses arguments and calls [`run`];
//! every command lives in its own module under [`cmd`] and returns
//! [`Outcome`] (what to print, and the exit code).

pub mod cli;
pub mod cmd;

use cli::{Cli, Command};

/// What a command produced.
#[derive(Debug)]
pub struct Outcome {
    /// Human-readable text (or JSON with `--json`).
    pub output: String,
    /// Process exit code.
    pub code: u8,
}

impl Outcome {
    pub fn ok(output: impl Into<String>) -> Self {
        Self { output: output.into(), code: 0 }
    }
}

/// A source error of any kind (what async-nats returns differs per call).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a command failed (printed as one line, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] conv_nats::connect::ConnectError),
    #[error(transparent)]
    Topology(#[from] conv_nats::topology::Error),
    #[error(transparent)]
    Read(#[from] conv_nats::read::ReadError),
    #[error(transparent)]
    Views(#[from] conv_store::views::ReadError),
    #[error(transparent)]
    Dlq(#[from] conv_nats::dlq::Error),
    #[error(transparent)]
    Trace(#[from] conv_admin::trace::Error),
    #[error(transparent)]
    Config(#[from] conv_nats::service::ConfigError),
    /// What the operator asked for cannot be done as asked.
    #[error("invalid option: {0}")]
    Invalid(String),
    /// A file, a process or the OS failed us.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A JetStream request failed.
    #[error("JetStream: {what}: {source}")]
    JetStream {
        what: String,
        #[source]
        source: BoxError,
    },
    /// A service's HTTP API failed.
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: BoxError,
    },
    /// A run (bench, chaos, soak, send) went wrong on the way.
    #[error("{0}")]
    Failed(String),
}

impl From<conv_contracts::Invalid> for Error {
    fn from(e: conv_contracts::Invalid) -> Self {
        Self::Invalid(e.0)
    }
}

impl Error {
    /// `map_err` for an I/O error, saying what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// `map_err` for a JetStream error, saying what was being done.
    pub fn js<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |source| Self::JetStream { what, source: source.into() }
    }

    /// `map_err` for an HTTP error, saying what was being done.
    pub fn http<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |source| Self::Http { what, source: source.into() }
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<Outcome, Error> {
    let g = &cli.global;
    match cli.command {
        Command::Setup(args) => cmd::setup::run(g, &args).await,
        Command::Checkpoints(topology) => cmd::checkpoints::run(g, &topology).await,
        Command::Readiness(args) => Ok(cmd::readiness::run(g, &args).await),
        Command::Up(topology) => cmd::up::run(g, &topology).await,
        Command::Bench { conversations, turns, aborts, storm } => {
            cmd::bench::run(g, conversations, turns, aborts, storm).await
        }
        Command::Send { conversation, text, timeout_secs } => {
            cmd::send::run(g, &conversation, &text, std::time::Duration::from_secs(timeout_secs)).await
        }
        Command::Dlq(dlq) => cmd::dlq::run(g, &dlq).await,
        Command::Projections(cli::ProjectionsCommand::Rebuild { conversation, .. }) => {
            cmd::projections::rebuild(g, conversation.as_deref()).await
        }
        Command::Projections(cli::ProjectionsCommand::Verify { conversation, settle_secs, .. }) => {
            cmd::projections::verify(g, conversation.as_deref(), std::time::Duration::from_secs(settle_secs)).await
        }
        Command::Chaos(args) => cmd::chaos::run(g, &args).await,
        Command::Soak(args) => cmd::soak::run(g, &args).await,
        Command::Replay { conversation } => cmd::replay::run(g, &conversation).await,
        Command::Trace { target, conversation } => cmd::trace::run(g, &target, conversation.as_deref()).await,
        Command::Events { conversation } => cmd::trace::events(g, &conversation).await,
    }
}

/// Connects for a command: fails fast with the URL in the message.
pub async fn connect(g: &cli::Global) -> Result<async_nats::jetstream::Context, Error> {
    let config = g.nats()?;
    let client = conv_nats::connect(&config, "convctl").await?;
    Ok(conv_nats::jetstream(client, &config))
}

/// Serializes `value` for `--json` output.
pub fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

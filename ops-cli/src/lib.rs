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

/// Why a command failed (printed as one line, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] conv_nats::connect::ConnectError),
    #[error(transparent)]
    Topology(#[from] conv_nats::topology::Error),
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error(transparent)]
    Read(#[from] conv_nats::read::ReadError),
    #[error(transparent)]
    Views(#[from] conv_projections::ReadError),
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<Outcome, Error> {
    let g = &cli.global;
    match cli.command {
        Command::Setup(args) => cmd::setup::run(g, &args).await,
        Command::Checkpoints => cmd::checkpoints::run(g).await,
        Command::Readiness(args) => Ok(cmd::readiness::run(g, &args).await),
        Command::Up => cmd::up::run(g).await,
        Command::Bench { conversations, turns, aborts } => cmd::bench::run(g, conversations, turns, aborts).await,
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

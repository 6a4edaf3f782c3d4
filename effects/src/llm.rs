//! LLM providers behind one streaming interface, with retry, backoff and a
//! stall timeout.
//!
//! * `scripted` — offline and deterministic ([`crate::scripted`]);
//! * `openai` — any OpenAI-compatible Chat Completions endpoint with SSE
//!   streaming and tool calling ([`crate::openai`]).
//!
//! Failures are classified: connect errors, timeouts, 429 and 5xx are
//! transient and retried (before the first chunk) with jittered exponential
//! backoff up to a cap; other 4xx are permanent and fail at once.

use std::pin::Pin;
use std::time::Duration;

use conv_contracts::payload::ContextMessage;
use futures::Stream;

use crate::scripted::{Chunk, Scripted};

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// Worth retrying: connect error, timeout, 429, 5xx.
    #[error("{0}")]
    Transient(String),
    /// Will not succeed as asked: other 4xx, a malformed answer.
    #[error("{0}")]
    Permanent(String),
}

impl LlmError {
    pub fn is_transient(&self) -> bool {
        matches!(self, LlmError::Transient(_))
    }
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, LlmError>> + Send>>;

/// Retry policy of model calls.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Retries after the first attempt.
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A stream that sends nothing for this long fails (transient).
    pub stall_timeout: Duration,
}

/// The configured provider.
#[derive(Debug, Clone)]
pub enum Provider {
    Scripted(Scripted),
    OpenAi(crate::openai::OpenAi),
}

impl Provider {
    /// Starts one streamed answer (one attempt, no retry).
    pub async fn start(&self, context: &[ContextMessage], step_id: &str) -> Result<ChunkStream, LlmError> {
        match self {
            Provider::Scripted(s) => {
                let plan = crate::scripted::plan(context, step_id, s.tokens);
                let delay = s.delay;
                Ok(Box::pin(futures::stream::unfold(plan, move |mut chunks| async move {
                    let next = chunks.next()?;
                    tokio::time::sleep(delay).await;
                    Some((Ok(next), chunks))
                })))
            }
            Provider::OpenAi(o) => o.start(context).await,
        }
    }
}

//! An LLM step's context, read by reference: the directive names the number
//! of entries before its own (`ContextRef`), the runtime stored those
//! entries before publishing it, and effects read them here — newest first,
//! and only as many as the provider's window holds, so a step of a 10 MB
//! conversation reads what the model is sent, not the whole history.

use std::time::Duration;

use conv_contracts::payload::{ContextMessage, ContextRef};
use conv_core::context::{self, Window, WindowError};

use crate::snapshot::{self, Snapshots};

/// Entries read at once, newest first.
const PAGE: usize = 64;
/// How long a missing entry is waited for before the step fails.
const MISSING_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Store(#[from] snapshot::Error),
    #[error("the context entry at place {place} is not stored")]
    Missing { place: usize },
    #[error(transparent)]
    Window(#[from] WindowError),
}

impl ContextError {
    /// True when reading again may succeed (the store was unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, ContextError::Store(snapshot::Error::Store(_)))
    }
}

/// A context as read for a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// Oldest first.
    pub messages: Vec<ContextMessage>,
    /// Older messages left out by the window policy (at least this many).
    pub dropped: usize,
}

/// Reads the context `r` names, within `max_bytes` (see
/// `conv_core::context` for the window policy).
pub async fn read(
    snapshots: &Snapshots,
    conversation: &str,
    r: ContextRef,
    max_bytes: usize,
) -> Result<Context, ContextError> {
    let mut window = Window::new(max_bytes);
    let mut end = r.entries as usize;
    'pages: while end > 0 {
        let start = end.saturating_sub(PAGE);
        let reads = (start..end).rev().map(|place| read_entry(snapshots, conversation, place));
        let page = futures::future::try_join_all(reads).await?;
        for entry in page {
            if let Some(m) = context::message(&entry)
                && !window.offer_older(m)?
            {
                break 'pages;
            }
        }
        end = start;
    }
    let (messages, dropped) = window.finish();
    Ok(Context { messages, dropped })
}

async fn read_entry(
    snapshots: &Snapshots,
    conversation: &str,
    place: usize,
) -> Result<conv_core::state::Entry, ContextError> {
    let deadline = tokio::time::Instant::now() + MISSING_WAIT;
    loop {
        if let Some(e) = snapshots.latest_entry(conversation, place).await? {
            return Ok(e);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ContextError::Missing { place });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

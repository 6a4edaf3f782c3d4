//! # conv-store
//!
//! A conversation's state in JetStream, for every process that needs it:
//! * [`snapshot`]: snapshots of any size — a small revision-checked head in
//!   `conv_snapshots` and one value per entry in `conv_entries`;
//! * [`journal`]: the journal read back (applied markers and the inputs they
//!   name) to restore a state after its snapshot, or to replay it whole;
//! * [`parts`]: values larger than one store value, split (both the
//!   entries and the projections' views use it);
//! * [`context`]: an LLM step's context read by reference from the stored
//!   entries, newest first, within a provider's window;
//! * [`views`]: the projections' timelines in `conv_projections` (a write
//!   costs the same at entry 10 and 10 000), rebuilt from and verified
//!   against the journal.
//!
//! The runtime writes; effects, projections (`GET …/context`) and `convctl`
//! read. The pure parts (state, reducer, codec) are `conv-core`.
pub mod context;
pub mod journal;
pub mod parts;
pub mod snapshot;
pub mod views;

pub use snapshot::{Loaded, Snapshots};

/// The state of a conversation as it is now: its snapshot plus the journal
/// after it (a state with version 0 when the conversation is unknown).
pub async fn current(
    js: &async_nats::jetstream::Context,
    conversation: &conv_contracts::ConversationId,
) -> Result<journal::Rebuilt, CurrentError> {
    let snapshots = Snapshots::open(js).await?;
    let loaded = snapshots.load(conversation.as_str()).await?;
    Ok(journal::rebuild(js, conversation, loaded.snapshot).await?)
}

#[derive(Debug, thiserror::Error)]
pub enum CurrentError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error(transparent)]
    Journal(#[from] journal::Error),
}

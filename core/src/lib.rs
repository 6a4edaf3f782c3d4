//! # conv-core
//!
//! The pure domain of conv, with no I/O, no clock and no async runtime:
//! the per-conversation [`state`], the [`reducer`] that folds inputs into it,
//! the partition [`scheduler`] that picks the next input, the LLM
//! [`context`] projection with its window policy, and the [`snapshot`]
//! codec (a small head plus one stored value per entry), and the
//! [`timeline`] view: the fold of a conversation's output into what a user
//! sees.
//!
//! The runtime service applies inputs with it; `conv-store` persists and
//! restores what it produces; effects build a model's context from stored
//! entries with it; projections and `convctl replay` fold journals with it.
pub mod context;
pub mod reducer;
pub mod scheduler;
pub mod snapshot;
pub mod state;
pub mod timeline;

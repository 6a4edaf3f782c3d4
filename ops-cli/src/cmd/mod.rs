//! One module per command.

pub mod checkpoints;
pub mod dlq;
pub mod readiness;
pub mod setup;

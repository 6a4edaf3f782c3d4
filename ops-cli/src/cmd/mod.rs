//! One module per command.

pub mod checkpoints;
pub mod readiness;
pub mod setup;

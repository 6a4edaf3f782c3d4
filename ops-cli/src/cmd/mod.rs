//! One module per command.

pub mod bench;
pub mod chaos;
pub mod checkpoints;
pub mod dlq;
pub mod projections;
pub mod readiness;
pub mod replay;
pub mod send;
pub mod setup;
pub mod soak;
pub mod trace;
pub mod up;

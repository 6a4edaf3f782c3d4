//! # conv-admin
//!
//! The operator's reads of a running conv — a conversation's cause tree
//! ([`trace`]), where each durable consumer stands ([`checkpoints`]), one
//! launch-readiness verdict ([`readiness`]) — shared by `convctl` and the
//! console's admin pages in projections. Everything reads through the
//! caller's NATS connection, so it sees what that NATS user may see (the
//! `admin` user sees all of it).

pub mod checkpoints;
pub mod readiness;
pub mod trace;

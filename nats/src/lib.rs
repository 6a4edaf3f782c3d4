//! # conv-nats
//!
//! JetStream glue shared by the conv services:
//! [`connect`] (client and JetStream context), [`topology`] (streams,
//! consumers and KV buckets as declared data, applied idempotently with drift
//! reports), [`consume`] (the consume loop with ack discipline), [`headers`]
//! (the NATS binary-mode binding of events), [`service`] (layered config,
//! logging, signals, health and metrics endpoints) and, behind the
//! `test-util` feature, [`test_util`] (a real NATS per test and in-process
//! service handles).

pub mod baseline;
pub mod cluster;
pub mod connect;
pub mod consume;
pub mod dlq;
pub mod headers;
pub mod http;
pub mod journal;
pub mod keys;
pub mod lane;
pub mod metrics;
pub mod ownership;
pub mod presence;
pub mod read;
pub mod secret;
pub mod service;
pub mod topology;

#[cfg(feature = "test-util")]
pub mod test_util;

pub use connect::{NatsConfig, connect, connect_lazy, jetstream};
pub use topology::{Topology, TopologyConfig};

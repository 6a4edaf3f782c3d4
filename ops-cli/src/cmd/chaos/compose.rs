//! The compose stack as a chaos target (`convctl chaos --compose`): the
//! repository's `compose.yaml` (images `conv:local` and `conv-nats:2.15.1`,
//! built offline by `scripts/images.sh`) brought up under a project of its
//! own with made-up secrets and free host ports, plus an override that
//! publishes NATS on loopback (the checks read the journal as `admin`) and
//! sets the scripted reply length. Faults go through Compose: `kill -s
//! SIGKILL` then `start`, `pause`/`unpause` (the cgroup freezer, like
//! SIGSTOP), `stop`/`start` of NATS. A container Docker restarted by itself
//! (its restart count went up) is reported: a service should not die from
//! a fault of another. `down -v` at the end, after saving the logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::stack::{Kind, Settings};
use crate::Error;

/// A compose project started by a chaos run.
#[derive(Debug)]
pub struct Compose {
    /// `docker-compose` or `docker compose`.
    program: Vec<String>,
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    pub ingress: SocketAddr,
    pub projections: SocketAddr,
    /// NATS on loopback, with the admin credentials.
    pub nats: conv_nats::NatsConfig,
    /// The client API key.
    pub api_key: String,
    dir: PathBuf,
    /// Restart counts seen so far, by container id.
    restarts: std::collections::HashMap<String, u64>,
}

fn service(kind: Kind) -> &'static str {
    match kind {
        Kind::Nats => "nats",
        Kind::Ingress => "ingress",
        Kind::Runtime => "runtime",
        Kind::Effects => "effects",
        Kind::Projections => "projections",
    }
}

fn secret() -> Result<String, Error> {
    super::super::up::random_secret()
}

/// `docker-compose`, else `docker compose`.
async fn program() -> Result<Vec<String>, Error> {
    let answers = |cmd: &'static [&'static str]| async move {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if !answers(&["docker", "info"]).await {
        return Err(Error::Invalid("--compose needs Docker, and Docker does not answer (`docker info`)".into()));
    }
    if answers(&["docker-compose", "version"]).await {
        return Ok(vec!["docker-compose".into()]);
    }
    if answers(&["docker", "compose", "version"]).await {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    Err(Error::Invalid("--compose needs docker-compose or `docker compose`".into()))
}

fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(Error::io("no free port"))
}

impl Compose {
    /// Brings the project up from `file` and waits until ingress and
    /// projections answer `/readyz`.
    pub async fn start(dir: &Path, file: &Path, settings: &Settings) -> Result<Compose, Error> {
        if settings.cluster {
            return Err(Error::Invalid("--compose runs one NATS server; use --cluster without --compose".into()));
        }
        if settings.instances != 1 {
            return Err(Error::Invalid("--compose runs one instance of every service: pass --instances 1".into()));
        }
        if !file.exists() {
            return Err(Error::Invalid(format!(
                "{} not found: run from the repository or pass --compose-file",
                file.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(Error::io(dir.display().to_string()))?;
        let program = program().await?;
        let (ingress, projections, nats_port) = (free_port()?, free_port()?, free_port()?);
        let mut effects_env = format!(
            "      CONV_SCRIPTED_TOKENS: \"{}\"\n      CONV_SCRIPTED_TOKEN_DELAY_MS: \"{}\"\n",
            settings.scripted_tokens, settings.scripted_token_delay_ms
        );
        if let Some(url) = &settings.llm_base_url {
            // The provider runs in convctl, on the host.
            let url = url.replace("127.0.0.1", "host.docker.internal");
            effects_env.push_str(&format!(
                "      CONV_LLM_PROVIDER: openai\n      CONV_LLM_BASE_URL: \"{url}\"\n      CONV_LLM_MODEL: chaos\n      \
                 CONV_LLM_STALL_TIMEOUT_MS: \"{}\"\n",
                settings.llm_stall_timeout_ms
            ));
        }
        let overrides = format!(
            "# Written by `convctl chaos --compose`.\nservices:\n  nats:\n    ports: [\"127.0.0.1:{nats_port}:4222\"]\n  \
             effects:\n    extra_hosts: [\"host.docker.internal:host-gateway\"]\n    environment:\n{effects_env}"
        );
        let override_file = dir.join("compose.chaos.yaml");
        std::fs::write(&override_file, overrides).map_err(Error::io(override_file.display().to_string()))?;
        let admin = secret()?;
        let api_key = format!("chaos-{}", secret()?);
        let mut env = vec![
            ("CONV_NATS_ADMIN_PASSWORD".to_owned(), admin.clone()),
            ("CONV_INGRESS_API_KEYS".to_owned(), api_key.clone()),
            ("CONV_CALLBACK_SECRET".to_owned(), secret()?),
            ("CONV_INGRESS_PORT".to_owned(), ingress.to_string()),
            ("CONV_PROJECTIONS_PORT".to_owned(), projections.to_string()),
        ];
        for user in ["INGRESS", "RUNTIME", "EFFECTS", "PROJECTIONS"] {
            env.push((format!("CONV_NATS_{user}_PASSWORD"), secret()?));
        }
        let compose = Compose {
            program,
            project: format!("convchaos{}", std::process::id()),
            files: vec![file.to_path_buf(), override_file],
            env,
            ingress: SocketAddr::from(([127, 0, 0, 1], ingress)),
            projections: SocketAddr::from(([127, 0, 0, 1], projections)),
            nats: conv_nats::NatsConfig {
                url: format!("nats://127.0.0.1:{nats_port}"),
                user: "admin".into(),
                password: conv_nats::secret::Secret::new(admin.clone()),
                ..Default::default()
            },
            api_key,
            dir: dir.to_path_buf(),
            restarts: Default::default(),
        };
        let started = match compose.run(&["up", "-d"]).await {
            Ok(_) => compose.wait_ready(Duration::from_secs(120)).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => Ok(compose),
            // Nothing left running: the logs saved, the project down.
            Err(e) => {
                compose.stop().await;
                Err(e)
            }
        }
    }

    /// Runs `compose <args>` for the project; its output on failure.
    async fn run(&self, args: &[&str]) -> Result<String, Error> {
        let mut command = Command::new(&self.program[0]);
        command.args(&self.program[1..]).arg("-p").arg(&self.project);
        for f in &self.files {
            command.arg("-f").arg(f);
        }
        command.args(args).envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let out = command
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(Error::io(format!("cannot run {}", self.program.join(" "))))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "`{} {}` failed: {}",
                self.program.join(" "),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until ingress and projections answer `/readyz` with 200 (the
    /// other services publish no port; the probes find out whether they work).
    pub async fn wait_ready(&self, within: Duration) -> Result<(), Error> {
        let hint = format!("see `{} -p {} logs`", self.program.join(" "), self.project);
        let targets: Vec<(SocketAddr, String)> = [self.ingress, self.projections]
            .into_iter()
            .map(|addr| (addr, format!("{addr} not ready within {within:?}; {hint}")))
            .collect();
        super::stack::wait_all_ready(&targets, within).await
    }

    /// SIGKILL of the service's container, started again after `down` (by
    /// Docker's restart policy or by `start`; either way not reported as a
    /// service that died by itself).
    pub async fn kill(&mut self, kind: Kind, down: Duration) -> Result<(), Error> {
        self.run(&["kill", "-s", "SIGKILL", service(kind)]).await?;
        tokio::time::sleep(down).await;
        self.run(&["start", service(kind)]).await?;
        self.restarts_of(service(kind)).await.map(drop)
    }

    /// Freezes the service's container for `pause`.
    pub async fn pause(&self, kind: Kind, pause: Duration) -> Result<(), Error> {
        self.run(&["pause", service(kind)]).await?;
        tokio::time::sleep(pause).await;
        self.run(&["unpause", service(kind)]).await.map(drop)
    }

    /// Stops NATS (SIGTERM, 10 s grace), starts it again after `down`.
    pub async fn restart_nats(&self, down: Duration) -> Result<(), Error> {
        self.run(&["stop", "-t", "10", "nats"]).await?;
        tokio::time::sleep(down).await;
        self.run(&["start", "nats"]).await.map(drop)
    }

    /// Containers Docker restarted by themselves since the last look.
    pub async fn revive(&mut self) -> Result<Vec<String>, Error> {
        let mut died = Vec::new();
        for kind in [Kind::Nats, Kind::Ingress, Kind::Runtime, Kind::Effects, Kind::Projections] {
            for (name, count) in self.restarts_of(service(kind)).await? {
                died.push(format!("{name} exited and Docker restarted it ({count} restarts); see compose.log"));
            }
        }
        Ok(died)
    }

    /// Looks at the restart counts of `service`'s containers; those that
    /// went up since the last look, with their names.
    async fn restarts_of(&mut self, service: &str) -> Result<Vec<(String, u64)>, Error> {
        let ids = self.run(&["ps", "-q", service]).await?;
        let mut up = Vec::new();
        for id in ids.split_whitespace() {
            let out = Command::new("docker")
                .args(["inspect", "-f", "{{.RestartCount}} {{.Name}}", id])
                .output()
                .await
                .map_err(Error::io("docker inspect"))?;
            let line = String::from_utf8_lossy(&out.stdout);
            let mut words = line.split_whitespace();
            let count: u64 = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let name = words.next().unwrap_or(id).trim_start_matches('/').to_owned();
            let seen = self.restarts.insert(id.to_owned(), count).unwrap_or(0);
            if count > seen {
                up.push((name, count));
            }
        }
        Ok(up)
    }

    /// Saves the logs in the run's directory, then `down -v`.
    pub async fn stop(self) {
        match self.run(&["logs", "--no-color"]).await {
            Ok(logs) => {
                let path = self.dir.join("compose.log");
                if let Err(error) = std::fs::write(&path, logs) {
                    tracing::warn!(message = "Cannot save the compose logs.", path = %path.display(), %error);
                }
            }
            Err(error) => tracing::warn!(message = "Cannot read the compose logs.", %error),
        }
        if let Err(error) = self.run(&["down", "-v", "--remove-orphans"]).await {
            tracing::warn!(message = "compose down failed.", %error);
        }
    }
}

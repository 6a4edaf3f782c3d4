//! Command-line interface of `convctl`.

use clap::{Args, Parser, Subcommand};

/// convctl — operate a conv deployment: set up JetStream, run the local stack,
/// talk to conversations, inspect and re-drive dead letters, replay and trace.
#[derive(Debug, Parser)]
#[command(name = "convctl", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// NATS server URL, or several separated by commas (the nodes of a cluster).
    #[arg(long, global = true, env = "NATS_URL", default_value = conv_nats::connect::DEFAULT_URL, hide_env_values = true)]
    pub nats_url: String,
    /// NATS user (with --nats-password; the `admin` user of the secured config). Unset, against a local server: .conv/admin.env.
    #[arg(long, global = true, env = "NATS_USER", default_value = "")]
    pub nats_user: String,
    /// NATS password (better from the environment than on the command line).
    #[arg(
        long,
        global = true,
        env = "NATS_PASSWORD",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub nats_password: conv_nats::secret::Secret,
    /// NATS credentials file (JWT + seed) instead of user and password.
    #[arg(long, global = true, env = "NATS_CREDS", default_value = "")]
    pub nats_creds: String,
    /// Print data as JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The deployment's topology, for the commands that declare or check it.
#[derive(Debug, Clone, Default, Args)]
pub struct TopologyArgs {
    /// Number of CONV_IN partitions of the deployment [default: 16, or `partitions` in the [topology] of CONV_CONFIG].
    #[arg(long, env = "CONV_PARTITIONS")]
    pub partitions: Option<u16>,
    /// Replicas of every stream and bucket, 3 on the 3-node cluster [default: 1, or `replicas` in the [topology] of CONV_CONFIG].
    #[arg(long, env = "CONV_REPLICAS")]
    pub replicas: Option<usize>,
}

impl TopologyArgs {
    /// The topology these options describe, validated: the defaults, then
    /// the `[topology]` section of the `CONV_CONFIG` file (the services'
    /// file; its other sections are not read here), then `CONV_<KEY>` from
    /// the environment for every `[topology]` key, then `--partitions` and
    /// `--replicas`.
    pub fn topology(&self) -> Result<conv_nats::TopologyConfig, crate::Error> {
        topology_from(&conv_nats::service::process_env, self.partitions, self.replicas)
    }
}

impl Global {
    /// How to reach NATS, validated. Without credentials, those `convctl
    /// up` left in `.conv/admin.env` (for the server it started here).
    pub fn nats(&self) -> Result<conv_nats::NatsConfig, crate::Error> {
        let (mut user, mut password) = (self.nats_user.clone(), self.nats_password.clone());
        // Only for a server on this machine: never sent anywhere else.
        let local = ["nats://127.0.0.1:", "nats://localhost:", "127.0.0.1:", "localhost:"]
            .iter()
            .any(|p| self.nats_url.starts_with(p) && !self.nats_url.contains(','));
        if local
            && user.is_empty()
            && self.nats_creds.is_empty()
            && let Ok(env) = std::fs::read_to_string(crate::cmd::up::ADMIN_ENV)
        {
            for line in env.lines() {
                match line.split_once('=') {
                    Some(("NATS_USER", v)) => user = v.trim().to_owned(),
                    Some(("NATS_PASSWORD", v)) => password = v.trim().into(),
                    _ => {}
                }
            }
        }
        let cfg = conv_nats::NatsConfig {
            url: self.nats_url.clone(),
            user,
            password,
            creds: self.nats_creds.clone(),
            ..Default::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The NATS URL for messages: credentials replaced by `***`.
    pub fn display_url(&self) -> String {
        conv_nats::secret::redact_url(&self.nats_url)
    }
}

/// The `[topology]` section of a services' config file; other sections are
/// the services' business.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct TopologyFile {
    topology: conv_nats::TopologyConfig,
}

fn topology_from(
    env: conv_nats::service::Env<'_>,
    partitions: Option<u16>,
    replicas: Option<usize>,
) -> Result<conv_nats::TopologyConfig, crate::Error> {
    let mut cfg = conv_nats::service::load_file(env, TopologyFile::default())?.topology;
    cfg.apply_env(env)?;
    if let Some(p) = partitions {
        cfg.partitions = p;
    }
    if let Some(r) = replicas {
        cfg.replicas = r;
    }
    cfg.validate()?;
    Ok(cfg)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update the whole JetStream topology (streams, consumers, KV buckets). Idempotent.
    Setup(SetupArgs),
    /// Each consumer's ack floor, pending and redelivered counts.
    Checkpoints(TopologyArgs),
    /// One launch-readiness report: ready / warning / not_ready (exit 0 / 1 / 2).
    Readiness(ReadinessArgs),
    /// Run the local stack: NATS (started if none answers, one user per service; admin credentials in .conv/admin.env, which other commands here use), setup, every service; Ctrl-C stops all.
    Up(TopologyArgs),
    /// Post a message and print the streamed reply as it arrives; exits when the run ends
    /// (CONV_INGRESS_ADDR, CONV_PROJECTIONS_ADDR; CONV_API_KEY when ingress takes client keys).
    Send {
        /// Conversation id (1–128 chars of [A-Za-z0-9_-]).
        conversation: String,
        /// Message text.
        text: String,
        /// Give up waiting for the end of the run after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Inspect and re-drive dead letters in CONV_DLQ (re-drive is audited in CONV_AUDIT).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Benchmark the whole pipeline (own nats-server, one process of each service) against raw JetStream in the same run.
    Bench {
        /// Conversations running at once.
        #[arg(long, default_value_t = 20)]
        conversations: usize,
        /// Turns per conversation.
        #[arg(long, default_value_t = 5)]
        turns: usize,
        /// Conversations aborted during a tool call (abort latency).
        #[arg(long, default_value_t = 20)]
        aborts: usize,
        /// Abort storm: conversations streaming long replies, all aborted at once (abort → canceled read from the
        /// journal, next to a raw JetStream storm on the same server); 0 skips it.
        #[arg(long, default_value_t = 1000)]
        storm: usize,
    },
    /// Fault-injection run: start a stack of its own (nats-server and every service as processes), talk while
    /// killing, pausing and restarting them on a seeded schedule, then check the journal and the views; exit 1 on any
    /// violation.
    Chaos(ChaosArgs),
    /// Steady load for a long time against a stack of its own (no faults): resident memory of every process,
    /// stream and bucket sizes against their limits, reply latency of the first and the last window; then every
    /// conversation checked from the journal and the views. Exit 1 when memory grew, a store went over a limit,
    /// latency grew or anything was lost.
    Soak(SoakArgs),
    /// Rebuild or verify projection views (folds of CONV_OUT).
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Rebuild a conversation's state from the journal and compare with the live state; exit 1 on mismatch.
    Replay {
        /// Conversation id.
        conversation: String,
    },
    /// The cause tree of a conversation (every root event with its effects, dead letters included), or of one
    /// event (its causes up to the root, its effects down the tree); indexed reads only.
    Trace {
        /// A conversation id, or a CloudEvents event id (ids from ingress start with `<conversation>.`).
        target: String,
        /// The conversation of an event id that does not start with it (a UUID given out without an
        /// Idempotency-Key).
        #[arg(long)]
        conversation: Option<String>,
    },
    /// A conversation's events across CONV_IN, CONV_EFFECT, CONV_APPLIED, CONV_OUT and CONV_AUDIT, with its dead
    /// letters, in time order, each with its id (for `convctl trace <event-id>`).
    Events {
        /// Conversation id.
        conversation: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    /// Report what would change (missing or drifted objects) without changing anything; exit 1 if anything would.
    #[arg(long)]
    pub check: bool,
    /// Wait up to this many seconds for NATS (and JetStream) to answer first, e.g. when started with it.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReadinessArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Consumer backlog (pending + unacked) above which the report warns.
    #[arg(long, env = "CONV_READINESS_MAX_BACKLOG", default_value_t = 10_000)]
    pub max_backlog: u64,
    /// Dead letters above which the report is not_ready (any dead letter warns).
    #[arg(long, env = "CONV_READINESS_MAX_DEAD_LETTERS", default_value_t = 1_000)]
    pub max_dead_letters: u64,
    /// Dead letters added per minute since the previous report above which the report is not_ready.
    #[arg(long, env = "CONV_READINESS_MAX_DLQ_GROWTH_PER_MIN", default_value_t = 10.0)]
    pub max_dlq_growth_per_min: f64,
    /// View lag p99 (journal → view, from the projections instances' metrics) above which the report warns.
    #[arg(long, env = "CONV_READINESS_MAX_VIEW_LAG_SECS", default_value_t = 5.0)]
    pub max_view_lag_secs: f64,
    /// Abort latency p99 in milliseconds (from the effects instances' metrics; the SLO) above which the report warns.
    #[arg(long, env = "CONV_READINESS_MAX_ABORT_P99_MS", default_value_t = 600.0)]
    pub max_abort_p99_ms: f64,
    /// Skip probing the services (every instance announced in conv_leases; without NATS, CONV_*_ADDR).
    #[arg(long)]
    pub no_services: bool,
    /// Print the kept reports (.conv/readiness.jsonl, the last 200, this one included) instead of this one.
    #[arg(long)]
    pub history: bool,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters.
    List,
    /// Show one dead letter with the original event.
    Show {
        /// Dead-letter id (its CONV_DLQ sequence).
        id: u64,
    },
    /// Re-publish dead letters through the normal validated path (fresh message id, audited); exit 1 if any is skipped.
    Redrive {
        /// Dead-letter id to re-drive.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Re-drive every dead letter (progress on stderr).
        #[arg(long)]
        all: bool,
        /// Show what would be re-driven; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Re-drive even when the stored subject names another conversation than the event's ce-subject.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Recompute timeline views from scratch (a fold of CONV_OUT) and store them.
    Rebuild {
        /// Conversation to rebuild.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        conversation: Option<String>,
        /// Rebuild every conversation with output.
        #[arg(long)]
        all: bool,
    },
    /// Compare stored views with the fold of CONV_OUT; print the differences, exit 1 on any.
    Verify {
        /// Conversation to verify.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        conversation: Option<String>,
        /// Verify every conversation with output.
        #[arg(long)]
        all: bool,
        /// How long a view that is behind the journal may take to catch up, in seconds.
        #[arg(long, default_value_t = 5)]
        settle_secs: u64,
    },
}

/// Options of `convctl chaos`.
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Conversations talking at once (each sends a message, waits for the reply, sends the next).
    #[arg(long, default_value_t = 20)]
    pub conversations: usize,
    /// Messages each conversation sends at least (more while faults are still being injected).
    #[arg(long, default_value_t = 3)]
    pub messages: usize,
    /// Faults to inject: rounds of every kind (SIGKILL of each service, SIGSTOP/SIGCONT of runtime, effects and
    /// projections, NATS restart, or on --cluster node and leader kills), each round in a seeded order.
    #[arg(long, default_value_t = 8)]
    pub faults: usize,
    /// Time between faults, in milliseconds.
    #[arg(long, default_value_t = 4000)]
    pub fault_interval_ms: u64,
    /// Seed of the fault order and targets: the same seed gives the same schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Instances of every service [default: 2; 1 with --compose].
    #[arg(long)]
    pub instances: Option<usize>,
    /// A reply that has not come within this many seconds is a violation.
    #[arg(long, default_value_t = 60)]
    pub reply_deadline_secs: u64,
    /// Reply wait p99 above this many seconds is a violation [default: 8; 15 with --cluster: after a node dies, its
    /// streams' followers wait NATS's Raft election timeout, 4–9 s, before they elect a new leader; 12 with
    /// --provider http: its slow answers take 3.4 s instead of 0.8 s and its refusals add retry backoff]. Replies
    /// retried after a visible failure are not counted.
    #[arg(long)]
    pub max_reply_p99_secs: Option<f64>,
    /// Directory for the stack's data and logs (default: a new one under the system temp dir); kept afterwards.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Run on a 3-node NATS cluster (the shipped nats/config/cluster-*.conf on free ports, R3 streams and buckets,
    /// every node in NATS_URL); NATS faults then SIGKILL a random node or the CONV_IN stream leader and restart it.
    #[arg(long)]
    pub cluster: bool,
    /// The model provider: the scripted one, or `http` — an OpenAI-compatible server that convctl runs, slow and
    /// failing on a seeded draw (late first bytes, 503 and 429, connections dropped mid-stream, stalls past the
    /// stall timeout); the clients retry visible failures as a user would.
    #[arg(long, value_enum, default_value_t = ProviderKind::Scripted)]
    pub provider: ProviderKind,
    /// Break the compose stack instead of processes: compose.yaml with the images of scripts/images.sh, under a
    /// project of its own (made-up secrets, free host ports, NATS published on loopback for the checks); faults
    /// through docker-compose (kill -s SIGKILL and start, pause/unpause, stop/start of NATS); `down -v` at the end.
    #[arg(long, conflicts_with = "cluster")]
    pub compose: bool,
    /// The compose file of --compose.
    #[arg(long, default_value = "compose.yaml", requires = "compose")]
    pub compose_file: std::path::PathBuf,
}

/// The model provider of a chaos run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    Scripted,
    Http,
}

/// Options of `convctl soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// How long the load runs, in minutes.
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Conversations talking at once (each sends a message, waits for the reply, sends the next).
    #[arg(long, default_value_t = 16)]
    pub conversations: usize,
    /// Messages per conversation; then it ends and a new one starts in its place.
    #[arg(long, default_value_t = 20)]
    pub turns: usize,
    /// Length of the first and last windows compared, in seconds (at most a third of the run).
    #[arg(long, default_value_t = 300.0)]
    pub window_secs: f64,
    /// Seconds between samples of memory and store sizes.
    #[arg(long, default_value_t = 10)]
    pub sample_secs: u64,
    /// Allowed growth of a service's resident memory from the second window to the last (0.2: 20 %, plus 4 MiB).
    #[arg(long, default_value_t = 0.2)]
    pub max_rss_growth: f64,
    /// Allowed growth of reply latency p50 and p99 from the first window to the last (0.5: 50 %, plus 50 ms).
    #[arg(long, default_value_t = 0.5)]
    pub max_latency_growth: f64,
    /// Tokens of each scripted reply.
    #[arg(long, default_value_t = 40)]
    pub tokens: usize,
    /// Milliseconds between the tokens of a scripted reply.
    #[arg(long, default_value_t = 20)]
    pub token_delay_ms: u64,
    /// Instances of every service.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// A reply that has not come within this many seconds is a violation.
    #[arg(long, default_value_t = 60)]
    pub reply_deadline_secs: u64,
    /// Directory for the stack's data and logs (default: a new one under the system temp dir); kept afterwards.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Run on a 3-node NATS cluster with R3 streams and buckets.
    #[arg(long)]
    pub cluster: bool,
}

impl ChaosArgs {
    /// Instances of every service (see `--instances`).
    pub fn instances(&self) -> usize {
        self.instances.unwrap_or(if self.compose { 1 } else { 2 })
    }

    /// The reply wait p99 bound in seconds (see `--max-reply-p99-secs`).
    pub fn max_reply_p99(&self) -> f64 {
        if let Some(secs) = self.max_reply_p99_secs {
            return secs;
        }
        match (self.cluster, self.provider) {
            (true, _) => 15.0,
            (false, ProviderKind::Http) => 12.0,
            (false, ProviderKind::Scripted) => 8.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_flags_belong_to_the_commands_that_use_them() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        cli.build(); // propagates the global flags to every subcommand
        let takes = |sub: &str, flag: &str| {
            let cmd = cli.find_subcommand(sub).unwrap_or_else(|| panic!("{sub}"));
            cmd.get_arguments().any(|a| a.get_long() == Some(flag))
        };
        for sub in ["setup", "up", "checkpoints", "readiness"] {
            assert!(takes(sub, "partitions") && takes(sub, "replicas"), "{sub} takes --partitions/--replicas");
        }
        for sub in ["send", "replay", "trace", "events", "bench", "dlq"] {
            assert!(!takes(sub, "partitions") && !takes(sub, "replicas"), "{sub} has no --partitions/--replicas");
        }
        assert!(takes("send", "nats-url"), "the connection flags stay global");
    }

    #[test]
    fn topology_layers_file_env_flags() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("service.toml");
        std::fs::write(
            &path,
            "[service]\nlog_format = \"json\"\n[options]\nsnapshot_every = 8\n[topology]\npartitions = 8\nreplicas = 3\ndlq_max_bytes = 5000000\n",
        )
        .expect("write");
        let file = path.display().to_string();
        let vars = |extra: &'static [(&'static str, &'static str)]| {
            let file = file.clone();
            move |k: &str| {
                if k == "CONV_CONFIG" {
                    return Some(file.clone());
                }
                extra.iter().find(|(var, _)| *var == k).map(|(_, v)| (*v).to_owned())
            }
        };
        let t = topology_from(&vars(&[]), None, None).expect("file");
        assert_eq!((t.partitions, t.replicas, t.dlq_max_bytes), (8, 3, 5_000_000));
        let t = topology_from(&vars(&[("CONV_REPLICAS", "1"), ("CONV_DLQ_MAX_BYTES", "-1")]), None, None).expect("env");
        assert_eq!((t.partitions, t.replicas, t.dlq_max_bytes), (8, 1, -1));
        let t = topology_from(&vars(&[("CONV_PARTITIONS", "4")]), Some(2), None).expect("flags");
        assert_eq!(t.partitions, 2);

        std::fs::write(&path, "[topology]\npartitons = 8\n").expect("write");
        let err = topology_from(&vars(&[]), None, None).expect_err("a typo in [topology] is refused");
        assert!(err.to_string().contains("partitons"), "{err}");
        let none = |_: &str| None;
        assert_eq!(topology_from(&none, None, None).expect("defaults"), conv_nats::TopologyConfig::default());
    }
}

//! `convctl chaos`: a repeatable fault-injection run against a real stack it
//! starts itself (one `nats-server`, every service as processes, `--instances`
//! of each). Conversations talk through the HTTP API with the scripted
//! provider while faults land on a seeded schedule — SIGKILL of each service
//! kind (started again a second later, as a supervisor would), SIGSTOP/SIGCONT
//! of the runtime, effects and projections, a NATS restart; with `--cluster`
//! three NATS nodes with R3 streams, where a random node and the `CONV_IN`
//! stream leader are SIGKILLed and restarted instead. After each fault
//! a probe message goes to every partition; the slowest probe's reply is the
//! time to recover. Afterwards the journal and the views are checked (see
//! [`check`]); any violation makes the exit code 1.

pub(crate) mod check;
mod compose;
pub(crate) mod load;
mod provider;
pub(crate) mod stack;
mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use conv_contracts::ConversationId;
use conv_contracts::subject::{DEFAULT_PARTITIONS, partition_of};
use serde::Serialize;

use crate::cli::{ChaosArgs, Global, ProviderKind};
use crate::{Error, Outcome};
use stack::{Kind, Settings, Stack};
use target::Target;

/// What is done to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// SIGKILL, started again after a second.
    Kill,
    /// SIGSTOP for three seconds, then SIGCONT.
    Pause,
    /// SIGTERM to `nats-server`, started again on the same data after a second.
    Restart,
    /// SIGKILL of the cluster node leading `CONV_IN`, started again after a second.
    #[serde(rename = "kill_leader")]
    KillLeader,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Pause => "pause",
            Action::Restart => "restart",
            Action::KillLeader => "kill leader",
        }
    }
}

/// The service faults of every round.
const SERVICE_FAULTS: [(Action, Kind); 7] = [
    (Action::Kill, Kind::Ingress),
    (Action::Kill, Kind::Runtime),
    (Action::Kill, Kind::Effects),
    (Action::Kill, Kind::Projections),
    (Action::Pause, Kind::Runtime),
    (Action::Pause, Kind::Effects),
    (Action::Pause, Kind::Projections),
];

/// The faults of one round, every kind once (rounds repeat in a new order):
/// the service faults and a NATS restart, or on a 3-node cluster a SIGKILL
/// of a random node and one of the stream leader.
fn kinds(cluster: bool) -> Vec<(Action, Kind)> {
    let nats: &[(Action, Kind)] = if cluster {
        &[(Action::Kill, Kind::Nats), (Action::KillLeader, Kind::Nats)]
    } else {
        &[(Action::Restart, Kind::Nats)]
    };
    SERVICE_FAULTS.iter().chain(nats).copied().collect()
}

/// One fault as injected and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub action: Action,
    pub target: Kind,
    /// Which instance of the target (0 for NATS).
    pub instance: usize,
    /// Seconds after the traffic started.
    pub at_secs: f64,
    /// Slowest reply to the probes sent to every partition as the fault
    /// began; `None`: a probe got no reply.
    pub recovery_secs: Option<f64>,
}

/// What a run found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub conversations: usize,
    pub instances: usize,
    /// `processes` (started by convctl) or `compose` (the compose stack).
    pub target: &'static str,
    /// NATS nodes (3: a cluster with R3 streams).
    pub nats_nodes: usize,
    /// Messages accepted (traffic and probes).
    pub messages: usize,
    pub faults: Vec<Fault>,
    /// Reply waits of the traffic's messages (not the probes), those
    /// retried after a visible failure left out.
    pub reply_ms_p50: f64,
    pub reply_ms_p99: f64,
    pub reply_ms_max: f64,
    /// Steps that failed where the user sees it and were retried (`POST
    /// /retry`); only a failing provider may cause them.
    pub retries_after_failures: usize,
    /// What the slow, failing HTTP provider did (`--provider http`).
    pub provider: Option<provider::Counts>,
    pub violations: check::Violations,
    #[serde(rename = "ok")]
    pub passed: bool,
    /// Where the stack's data and logs are.
    pub dir: PathBuf,
    pub seconds: f64,
}

/// splitmix64: a seeded sequence, the same on every machine.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

/// The faults of a run: rounds of every kind, each round shuffled. NATS
/// faults name the node (0 for a single server; a stream leader is found
/// when the fault lands).
fn schedule(seed: u64, faults: usize, instances: usize, cluster: bool) -> Vec<(Action, Kind, usize)> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(faults);
    let nodes = if cluster { conv_nats::cluster::NODES } else { 1 };
    while out.len() < faults {
        let mut round = kinds(cluster);
        for i in (1..round.len()).rev() {
            round.swap(i, rng.below(i + 1));
        }
        for (action, kind) in round {
            if out.len() < faults {
                let instance = rng.below(if kind == Kind::Nats { nodes } else { instances });
                out.push((action, kind, instance));
            }
        }
    }
    out
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// Progress, on stderr so that `--json` output stays one document.
fn say(line: &str) {
    eprintln!("[chaos] {line}");
}

/// A conversation id on `partition`, unique to probe round `round`.
fn probe_id(round: usize, partition: u16) -> String {
    (0usize..)
        .map(|j| format!("chaos-probe-{round}-{j}"))
        .find(|c| ConversationId::parse(c).is_ok_and(|id| partition_of(&id, DEFAULT_PARTITIONS) == partition))
        .unwrap_or_default()
}

pub async fn run(g: &Global, args: &ChaosArgs) -> Result<Outcome, Error> {
    if args.conversations == 0 || args.instances() == 0 || args.messages == 0 {
        return Err(Error::Invalid("--conversations, --messages and --instances must be at least 1".into()));
    }
    let dir =
        args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("conv-chaos-{}", std::process::id())));
    let (llm_base_url, fake) = match args.provider {
        ProviderKind::Scripted => (None, None),
        ProviderKind::Http => {
            let (url, p) = provider::start(args.seed, 40, Duration::from_millis(20), args.compose).await?;
            say(&format!("slow, failing OpenAI-compatible provider at {url}"));
            (Some(url), Some(p))
        }
    };
    let settings = Settings {
        instances: args.instances(),
        scripted_tokens: 40,
        scripted_token_delay_ms: 20,
        cluster: args.cluster,
        llm_base_url,
        llm_stall_timeout_ms: provider::STALL_TIMEOUT_MS,
    };
    let mut stack = if args.compose {
        say(&format!("starting {} (project logs saved in {})", args.compose_file.display(), dir.display()));
        Target::Compose(Box::new(compose::Compose::start(&dir, &args.compose_file, &settings).await?))
    } else {
        let nats = if args.cluster { "a 3-node NATS cluster (R3)" } else { "nats-server" };
        say(&format!("starting {nats} and {} instance(s) of every service in {}", args.instances(), dir.display()));
        Target::Processes(Stack::start(&dir, &settings).await?)
    };
    let started = Instant::now();
    let result = drive(&mut stack, args).await;
    stack.stop().await;
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(p) = fake {
        report.provider = Some(p.counts());
    } else if report.retries_after_failures > 0 {
        report.violations.other.push(format!(
            "{} replies failed with the scripted provider (retried by the clients)",
            report.retries_after_failures
        ));
        report.passed = false;
    }
    report.dir = dir;
    let code = u8::from(!report.passed);
    if g.json {
        return Ok(Outcome { output: crate::to_json(&report), code });
    }
    Ok(Outcome { output: text(&report, args.max_reply_p99()), code })
}

async fn drive(stack: &mut Target, args: &ChaosArgs) -> Result<Report, Error> {
    let client = load::Client::new(stack.addrs(Kind::Ingress), stack.addrs(Kind::Projections), stack.api_key())?;
    let reply_deadline = Duration::from_secs(args.reply_deadline_secs);
    let faults_done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    say(&format!(
        "{} conversations talking; {} faults, one every {} ms (seed {})",
        args.conversations, args.faults, args.fault_interval_ms, args.seed
    ));
    let mut talkers = Vec::new();
    for i in 0..args.conversations {
        let done = faults_done.clone();
        talkers.push(tokio::spawn(load::conversation(
            client.clone(),
            format!("chaos-{}-{i}", args.seed),
            args.messages,
            move || !done.load(Ordering::Relaxed),
            reply_deadline,
        )));
    }

    let mut faults = Vec::new();
    let mut probes = Vec::new();
    let mut other = Vec::new();
    let plan = schedule(args.seed, args.faults, args.instances(), args.cluster);
    for (round, (action, target, mut instance)) in plan.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(args.fault_interval_ms)).await;
        if target == Kind::Nats && stack.nats_nodes() > 1 {
            // Node faults one at a time, as an operator would: the previous
            // one healed first (a cluster that does not heal is a violation).
            let behind = stack.wait_in_sync(Duration::from_secs(30)).await;
            if !behind.is_empty() {
                other.push(format!("cluster not caught up 30 s before a node fault: {}", behind.join(", ")));
            }
            if action == Action::KillLeader {
                instance = stack.in_leader().await.unwrap_or(instance);
            }
        }
        let at_secs = t0.elapsed().as_secs_f64();
        say(&format!("{at_secs:6.1}s  {} {} #{instance}", action.label(), target.name()));
        // A probe to every partition as the fault begins.
        let mut round_probes = Vec::new();
        for p in 0..DEFAULT_PARTITIONS {
            let client = client.clone();
            let conv = probe_id(round, p);
            round_probes.push(tokio::spawn(async move {
                let deadline = Instant::now() + reply_deadline;
                let (turn, problem) = load::turn(&client, &conv, 1, deadline).await;
                (conv, turn, problem)
            }));
        }
        stack.fault(action, target, instance).await?;
        faults.push(Fault { action, target, instance, at_secs, recovery_secs: None });
        probes.push(round_probes);
        other.extend(stack.revive().await?);
    }
    faults_done.store(true, Ordering::Relaxed);
    say("faults done; letting the conversations finish");

    let (mut turns, problems) = load::join(talkers).await?;
    other.extend(problems);
    // A reply that failed where the user sees it and was retried (a failing
    // provider's doing) waited for the provider, not for the system.
    let mut replies: Vec<f64> = turns
        .iter()
        .filter(|t| t.retries.is_empty())
        .filter_map(|t| t.reply)
        .map(|r| r.as_secs_f64() * 1000.0)
        .collect();
    for (fault, round) in faults.iter_mut().zip(probes) {
        let mut slowest = Some(Duration::ZERO);
        for probe in round {
            let (conv, turn, problem) = probe.await.map_err(|e| Error::Failed(format!("a probe failed: {e}")))?;
            let replied = turn.as_ref().and_then(|t| t.reply);
            turns.extend(turn);
            slowest = match (slowest, replied) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            if let Some(p) = problem {
                other.push(format!("{p} (the probe of {:?} {})", fault.action, fault.target.name()));
            } else if replied.is_none() {
                other.push(format!("{conv}: no reply to the probe of {:?} {}", fault.action, fault.target.name()));
            }
        }
        fault.recovery_secs = slowest.map(|d| d.as_secs_f64());
    }
    let accepted = check::sent(&turns);
    other.extend(stack.revive().await?);
    stack.wait_ready(Duration::from_secs(60)).await?;
    let behind = stack.wait_in_sync(Duration::from_secs(60)).await;
    if !behind.is_empty() {
        other.push(format!("cluster not caught up 60 s after the last fault: {}", behind.join(", ")));
    }

    say(&format!("checking {} conversations against the journal", accepted.len()));
    let js = stack.jetstream().await?;
    let mut violations = check::check(&js, &client, &accepted).await?;
    violations.other.extend(other);
    let reply_ms_p99 = pct(&mut replies, 0.99);
    if reply_ms_p99 > args.max_reply_p99() * 1000.0 {
        violations.other.push(format!(
            "reply wait p99 {:.1} s is above {:.1} s",
            reply_ms_p99 / 1000.0,
            args.max_reply_p99()
        ));
    }
    Ok(Report {
        seed: args.seed,
        conversations: args.conversations,
        instances: args.instances(),
        target: if args.compose { "compose" } else { "processes" },
        nats_nodes: stack.nats_nodes(),
        messages: accepted.values().map(|s| s.messages.len()).sum(),
        faults,
        reply_ms_p50: pct(&mut replies, 0.5),
        reply_ms_p99,
        reply_ms_max: pct(&mut replies, 1.0),
        retries_after_failures: turns.iter().map(|t| t.retries.len()).sum(),
        provider: None,
        passed: violations.total() == 0,
        violations,
        dir: PathBuf::new(),
        seconds: 0.0,
    })
}

fn text(r: &Report, max_p99: f64) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "chaos run, seed {}: {} conversations, {} instance(s) of each service ({}), {}, {} messages, {:.0} s\n\n",
        r.seed,
        r.conversations,
        r.instances,
        if r.target == "compose" { "the compose stack" } else { "processes" },
        if r.nats_nodes > 1 { "a 3-node NATS cluster (R3)" } else { "one NATS server" },
        r.messages,
        r.seconds
    ));
    s.push_str("   at  fault                          recovery\n");
    for f in &r.faults {
        let what = format!("{} {} #{}", f.action.label(), f.target.name(), f.instance);
        let rec = f.recovery_secs.map_or_else(|| "NONE".to_owned(), |x| format!("{x:.1} s"));
        s.push_str(&format!("{:5.1}s  {what:<30} {rec:>8}\n", f.at_secs));
    }
    if let Some(p) = &r.provider {
        s.push_str(&format!(
            "\nHTTP provider: {} requests — {} normal, {} slow, {} answered 503, {} answered 429, {} dropped \
             mid-stream, {} stalled; {} visible failures retried by the clients\n",
            p.requests, p.normal, p.slow, p.unavailable, p.throttled, p.dropped, p.stalled, r.retries_after_failures
        ));
    }
    let v = &r.violations;
    s.push_str(&format!(
        "\nreply wait: p50 {:.2} s, p99 {:.2} s (bound {max_p99:.1} s), max {:.2} s\n\n",
        r.reply_ms_p50 / 1000.0,
        r.reply_ms_p99 / 1000.0,
        r.reply_ms_max / 1000.0
    ));
    s.push_str(&v.verdict(r.passed, "nothing lost, nothing twice, every view equal to the journal", &r.dir));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_seeded_and_covers_every_kind_each_round() {
        let a = schedule(7, 16, 2, false);
        assert_eq!(a, schedule(7, 16, 2, false), "same seed, same faults");
        assert_ne!(a, schedule(8, 16, 2, false), "another seed, another order");
        for round in a.chunks(kinds(false).len()) {
            for (action, kind) in kinds(false) {
                assert!(round.iter().any(|(x, k, _)| *x == action && *k == kind), "{action:?} {kind:?} in {round:?}");
            }
        }
        assert!(a.iter().all(|(_, k, i)| *i < 2 && (*k != Kind::Nats || *i == 0)));
        assert_eq!(schedule(1, 3, 1, false).len(), 3);
        let c = schedule(7, 18, 2, true);
        for round in c.chunks(kinds(true).len()) {
            for (action, kind) in kinds(true) {
                assert!(round.iter().any(|(x, k, _)| *x == action && *k == kind), "{action:?} {kind:?} in {round:?}");
            }
        }
        assert!(!c.iter().any(|(a, _, _)| *a == Action::Restart), "nodes are killed, not the whole server restarted");
        assert!(c.iter().all(|(_, k, i)| *k != Kind::Nats || *i < 3));
    }

    #[test]
    fn probes_cover_every_partition() {
        let ids: Vec<String> = (0..DEFAULT_PARTITIONS).map(|p| probe_id(3, p)).collect();
        for (p, id) in ids.iter().enumerate() {
            let conv = ConversationId::parse(id).expect("valid id");
            assert_eq!(usize::from(partition_of(&conv, DEFAULT_PARTITIONS)), p);
        }
    }
}

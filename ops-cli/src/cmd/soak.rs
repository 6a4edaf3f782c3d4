//! `convctl soak`: steady load for a long time against a stack of its own
//! (the same processes `convctl chaos` starts, no faults), watching what only
//! time shows — resident memory of every process, the size of every stream
//! and bucket against its limits, reply latency from the first to the last
//! window. Conversations rotate every `--turns` messages, as real ones end,
//! so the number of conversations grows through the run while each stays
//! short. Afterwards every conversation is checked from the journal and the
//! views like a chaos run. Exit 1 on any violation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Serialize;

use super::chaos::{check, load, pct, stack};
use crate::cli::{Global, SoakArgs};
use crate::{Error, Outcome};

/// Slack on top of the allowed relative memory growth: allocator arenas and
/// caches settle in steps of a few MiB.
const RSS_SLACK_BYTES: u64 = 4 << 20;
/// Slack on top of the allowed relative latency growth.
const LATENCY_SLACK_MS: f64 = 50.0;

/// One look at the stack.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds after the load started.
    pub at_secs: f64,
    /// Resident memory by process (`conv-runtime #0`), bytes.
    pub rss: BTreeMap<String, u64>,
    /// Stream and bucket sizes.
    pub stores: Vec<StoreSize>,
    /// Messages answered so far.
    pub turns: usize,
}

/// The size of a stream (or the stream behind a KV bucket) and its limits.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoreSize {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    /// Subjects (keys of a bucket) holding messages.
    pub subjects: u64,
    /// -1: unlimited.
    pub max_bytes: i64,
    pub max_messages: i64,
    /// Per subject (the history of a bucket); -1: unlimited.
    pub max_messages_per_subject: i64,
    pub max_age_secs: u64,
    /// The oldest sequence still stored: it rises when retention drops
    /// messages.
    #[serde(default)]
    pub first_seq: u64,
}

/// A store at this share of a limit is reported before it drops anything.
const NEAR_LIMIT: f64 = 0.9;

impl StoreSize {
    /// Why it is over (or within 10 % of) a limit, if it is. NATS enforces
    /// the limits by dropping the oldest messages, so "over" shows only as
    /// a store at its limit.
    fn over_limit(&self) -> Option<String> {
        let near = |have: u64, max: i64| max > 0 && have as f64 >= NEAR_LIMIT * max as f64;
        if near(self.bytes, self.max_bytes) {
            return Some(format!(
                "{}: {} bytes, at 90 % or more of its limit {}",
                self.name, self.bytes, self.max_bytes
            ));
        }
        if near(self.messages, self.max_messages) {
            return Some(format!(
                "{}: {} messages, at 90 % or more of its limit {}",
                self.name, self.messages, self.max_messages
            ));
        }
        if self.max_bytes > 0 && self.bytes > self.max_bytes.unsigned_abs() {
            return Some(format!("{}: {} bytes, limit {}", self.name, self.bytes, self.max_bytes));
        }
        if self.max_messages > 0 && self.messages > self.max_messages.unsigned_abs() {
            return Some(format!("{}: {} messages, limit {}", self.name, self.messages, self.max_messages));
        }
        if self.max_messages_per_subject > 0
            && self.messages > self.subjects.saturating_mul(self.max_messages_per_subject.unsigned_abs())
        {
            return Some(format!(
                "{}: {} messages on {} subjects, history {}",
                self.name, self.messages, self.subjects, self.max_messages_per_subject
            ));
        }
        None
    }
}

/// Resident memory of one process: after warm-up and at the end.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Memory {
    pub process: String,
    /// Median over the second window (the first is warm-up).
    pub warm_bytes: u64,
    /// Median over the last window.
    pub last_bytes: u64,
    pub max_bytes: u64,
    /// Only conv services are judged; NATS holds what it stores.
    pub judged: bool,
    pub flat: bool,
}

/// Reply latency and throughput in one window.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Window {
    pub from_secs: f64,
    pub to_secs: f64,
    pub turns: usize,
    pub reply_ms_p50: f64,
    pub reply_ms_p99: f64,
}

/// How a stream or bucket grew over the run.
#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    pub start: StoreSize,
    pub end: StoreSize,
    /// Bytes added per answered message.
    pub bytes_per_turn: f64,
    /// Within its limits at every sample.
    pub within_limits: bool,
}

/// What a soak found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub minutes: f64,
    pub conversations_at_once: usize,
    pub turns_per_conversation: usize,
    pub instances: usize,
    pub nats_nodes: usize,
    /// Conversations talked to, and messages answered.
    pub conversations: usize,
    pub turns: usize,
    pub first: Window,
    pub last: Window,
    pub latency_stable: bool,
    pub memory: Vec<Memory>,
    pub stores: Vec<Growth>,
    pub violations: check::Violations,
    #[serde(rename = "ok")]
    pub passed: bool,
    pub samples: Vec<Sample>,
    pub dir: PathBuf,
}

fn say(line: &str) {
    eprintln!("[soak] {line}");
}

/// Resident set size of `pid` from `/proc/<pid>/status`, bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Every stream of the topology, and the stream of every bucket.
async fn stores(js: &jetstream::Context) -> Result<Vec<StoreSize>, Error> {
    let topology = conv_nats::Topology::declare(&conv_nats::TopologyConfig::default());
    let names: Vec<String> = topology
        .stream_names()
        .map(str::to_owned)
        .chain(topology.kv.iter().map(|b| format!("KV_{}", b.bucket)))
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let mut stream = js.get_stream(&name).await.map_err(Error::js(name.as_str()))?;
        let info = stream.info().await.map_err(Error::js(name.as_str()))?;
        out.push(StoreSize {
            name,
            messages: info.state.messages,
            bytes: info.state.bytes,
            subjects: info.state.subjects_count,
            max_bytes: info.config.max_bytes,
            max_messages: info.config.max_messages,
            max_messages_per_subject: info.config.max_messages_per_subject,
            max_age_secs: info.config.max_age.as_secs(),
            first_seq: info.state.first_sequence,
        });
    }
    Ok(out)
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// Memory of every process: median of the second window (the first is
/// warm-up) against the median of the last; flat when it grew by at most
/// `growth` (relative) plus [`RSS_SLACK_BYTES`].
pub fn memory(samples: &[Sample], window: f64, end: f64, growth: f64) -> Vec<Memory> {
    let mut names: Vec<&String> = samples.iter().flat_map(|s| s.rss.keys()).collect();
    names.sort();
    names.dedup();
    let series = |name: &str, from: f64, to: f64| -> Vec<u64> {
        samples
            .iter()
            .filter(|s| s.at_secs >= from && s.at_secs < to)
            .filter_map(|s| s.rss.get(name).copied())
            .collect()
    };
    names
        .into_iter()
        .filter_map(|name| {
            let warm = median(series(name, window, 2.0 * window))?;
            let last = median(series(name, end - window, f64::INFINITY))?;
            let max = series(name, 0.0, f64::INFINITY).into_iter().max().unwrap_or(0);
            let judged = !name.starts_with("nats-server");
            let allowed = (warm as f64 * (1.0 + growth)) as u64 + RSS_SLACK_BYTES;
            Some(Memory {
                process: name.clone(),
                warm_bytes: warm,
                last_bytes: last,
                max_bytes: max,
                judged,
                flat: last <= allowed,
            })
        })
        .collect()
}

/// Reply latency of the turns started in `[from, to)` seconds after `t0`.
pub fn window(turns: &[load::Turn], t0: Instant, from: f64, to: f64) -> Window {
    let mut ms: Vec<f64> = turns
        .iter()
        .filter(|t| {
            let at = t.started.saturating_duration_since(t0).as_secs_f64();
            at >= from && at < to
        })
        .filter_map(|t| t.reply.map(|d| d.as_secs_f64() * 1000.0))
        .collect();
    Window {
        from_secs: from,
        to_secs: to,
        turns: ms.len(),
        reply_ms_p50: pct(&mut ms, 0.5),
        reply_ms_p99: pct(&mut ms, 0.99),
    }
}

/// The last window is as fast as the first: p50 and p99 grew by at most
/// `growth` (relative) plus [`LATENCY_SLACK_MS`].
pub fn stable(first: &Window, last: &Window, growth: f64) -> bool {
    let ok = |a: f64, b: f64| b <= a * (1.0 + growth) + LATENCY_SLACK_MS;
    first.turns > 0
        && last.turns > 0
        && ok(first.reply_ms_p50, last.reply_ms_p50)
        && ok(first.reply_ms_p99, last.reply_ms_p99)
}

/// How each store grew from the first to the last sample, and whether it
/// stayed within its limits at every sample.
pub fn growth(samples: &[Sample], problems: &mut Vec<String>) -> Vec<Growth> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else { return Vec::new() };
    let turns = last.turns.saturating_sub(first.turns).max(1) as f64;
    first
        .stores
        .iter()
        .filter_map(|start| {
            let end = last.stores.iter().find(|s| s.name == start.name)?.clone();
            let mut within = true;
            for s in samples.iter().flat_map(|s| s.stores.iter().filter(|x| x.name == start.name)) {
                if let Some(why) = s.over_limit() {
                    within = false;
                    problems.push(why);
                    break;
                }
            }
            // A journal that lost its oldest messages during the run: retention
            // (age or size) dropped history that replay and rebuilds need.
            if start.name.starts_with("CONV_") && end.first_seq > start.first_seq.max(1) {
                within = false;
                problems.push(format!(
                    "{}: retention dropped messages during the run (first sequence {} → {})",
                    start.name, start.first_seq, end.first_seq
                ));
            }
            Some(Growth {
                bytes_per_turn: (end.bytes as f64 - start.bytes as f64) / turns,
                start: start.clone(),
                end,
                within_limits: within,
            })
        })
        .collect()
}

pub async fn run(g: &Global, args: &SoakArgs) -> Result<Outcome, Error> {
    if args.conversations == 0 || args.turns == 0 || args.instances == 0 || args.minutes <= 0.0 {
        return Err(Error::Invalid("--minutes, --conversations, --turns and --instances must be above 0".into()));
    }
    let dir =
        args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("conv-soak-{}", std::process::id())));
    let settings = stack::Settings {
        instances: args.instances,
        scripted_tokens: args.tokens,
        scripted_token_delay_ms: args.token_delay_ms,
        cluster: args.cluster,
        llm_base_url: None,
        llm_stall_timeout_ms: 30_000,
    };
    say(&format!("starting NATS and {} instance(s) of every service in {}", args.instances, dir.display()));
    let mut stack = stack::Stack::start(&dir, &settings).await?;
    let result = drive(&mut stack, args).await;
    stack.stop().await;
    let mut report = result?;
    report.dir = dir;
    let code = u8::from(!report.passed);
    if g.json {
        return Ok(Outcome { output: crate::to_json(&report), code });
    }
    Ok(Outcome { output: text(&report, args), code })
}

async fn drive(stack: &mut stack::Stack, args: &SoakArgs) -> Result<Report, Error> {
    use stack::Kind;
    let client = load::Client::new(stack.addrs(Kind::Ingress), stack.addrs(Kind::Projections), None)?;
    let js = stack::jetstream(&stack.nats_url).await?;
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let end = duration.as_secs_f64();
    // Windows of `--window-secs`, at most a third of the run each.
    let window_secs = args.window_secs.min(end / 3.0);
    let reply_deadline = Duration::from_secs(args.reply_deadline_secs);
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    say(&format!(
        "{} conversations at once, a new one every {} messages, for {:.1} min; windows of {:.0} s",
        args.conversations, args.turns, args.minutes, window_secs
    ));
    let run_id = std::process::id();
    let mut talkers = Vec::new();
    for worker in 0..args.conversations {
        let (client, answered, stop) = (client.clone(), answered.clone(), stop.clone());
        let turns_each = args.turns;
        talkers.push(tokio::spawn(async move {
            let (mut turns, mut problems) = (Vec::new(), Vec::new());
            'conversations: for generation in 0usize.. {
                let conv = format!("soak-{run_id}-{worker}-{generation}");
                for n in 1..=turns_each {
                    if stop.load(Ordering::Relaxed) {
                        break 'conversations;
                    }
                    let (turn, problem) = load::turn(&client, &conv, n, Instant::now() + reply_deadline).await;
                    if turn.as_ref().is_some_and(|t| t.reply.is_some()) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    turns.extend(turn);
                    if let Some(p) = problem {
                        // The next conversation; the check counts this one.
                        problems.push(p);
                        continue 'conversations;
                    }
                }
            }
            (turns, problems)
        }));
    }

    let mut samples = Vec::new();
    let mut other = Vec::new();
    let every = Duration::from_secs(args.sample_secs.max(1));
    let mut next_report = 60.0;
    loop {
        let at_secs = t0.elapsed().as_secs_f64();
        let rss = stack.processes().into_iter().filter_map(|(name, pid)| Some((name, rss(pid)?))).collect();
        match stores(&js).await {
            Ok(stores) => samples.push(Sample { at_secs, rss, stores, turns: answered.load(Ordering::Relaxed) }),
            Err(e) => other.push(format!("sample at {at_secs:.0} s: {e}")),
        }
        other.extend(stack.revive()?);
        if at_secs >= next_report {
            next_report += 60.0;
            say(&progress(samples.last(), at_secs));
        }
        if at_secs >= end {
            break;
        }
        tokio::time::sleep(every.min(duration.saturating_sub(t0.elapsed()))).await;
    }
    stop.store(true, Ordering::Relaxed);
    say("load done; letting the last messages finish");

    let (turns, problems) = load::join(talkers).await?;
    other.extend(problems);
    let first = window(&turns, t0, 0.0, window_secs);
    let last = window(&turns, t0, end - window_secs, f64::INFINITY);
    let latency_stable = stable(&first, &last, args.max_latency_growth);
    if !latency_stable {
        other.push(format!(
            "reply latency grew: p50 {:.0} → {:.0} ms, p99 {:.0} → {:.0} ms",
            first.reply_ms_p50, last.reply_ms_p50, first.reply_ms_p99, last.reply_ms_p99
        ));
    }
    let memory = memory(&samples, window_secs, end, args.max_rss_growth);
    for m in memory.iter().filter(|m| m.judged && !m.flat) {
        other.push(format!(
            "{}: resident memory grew from {:.1} to {:.1} MiB",
            m.process,
            mib(m.warm_bytes),
            mib(m.last_bytes)
        ));
    }
    let stores = growth(&samples, &mut other);

    let accepted = check::sent(&turns);
    let retried: usize = turns.iter().map(|t| t.retries.len()).sum();
    if retried > 0 {
        other.push(format!("{retried} replies failed with the scripted provider (retried by the clients)"));
    }
    say(&format!("checking {} conversations against the journal", accepted.len()));
    let mut violations = check::check(&js, &client, &accepted).await?;
    violations.other.extend(other);
    Ok(Report {
        minutes: args.minutes,
        conversations_at_once: args.conversations,
        turns_per_conversation: args.turns,
        instances: args.instances,
        nats_nodes: stack.nats_nodes(),
        conversations: accepted.len(),
        turns: turns.len(),
        first,
        last,
        latency_stable,
        memory,
        stores,
        passed: violations.total() == 0,
        violations,
        samples,
        dir: PathBuf::new(),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// A line a minute on stderr: messages so far, memory of each service.
fn progress(sample: Option<&Sample>, at_secs: f64) -> String {
    let Some(s) = sample else { return format!("{at_secs:5.0} s") };
    let memory: Vec<String> = s
        .rss
        .iter()
        .map(|(name, bytes)| format!("{} {:.0} MiB", name.trim_start_matches("conv-"), mib(*bytes)))
        .collect();
    format!("{at_secs:5.0} s  {} messages answered; {}", s.turns, memory.join(", "))
}

fn text(r: &Report, args: &SoakArgs) -> String {
    let mut s = format!(
        "soak: {:.1} min, {} conversations at once ({} messages each, then a new one), {} instance(s) of each \
         service, {}; {} messages in {} conversations\n\n",
        r.minutes,
        r.conversations_at_once,
        r.turns_per_conversation,
        r.instances,
        if r.nats_nodes > 1 { "a 3-node NATS cluster (R3)" } else { "one NATS server" },
        r.turns,
        r.conversations,
    );
    s.push_str("reply latency        from     to   messages   p50 ms   p99 ms\n");
    for (name, w) in [("first window", &r.first), ("last window", &r.last)] {
        s.push_str(&format!(
            "  {name:<16} {:>6.0} {:>6.0} {:>10} {:>8.0} {:>8.0}\n",
            w.from_secs,
            w.to_secs.min(r.minutes * 60.0),
            w.turns,
            w.reply_ms_p50,
            w.reply_ms_p99
        ));
    }
    s.push_str(&format!(
        "  {} (allowed growth {:.0} % + {LATENCY_SLACK_MS} ms)\n\n",
        if r.latency_stable { "stable" } else { "NOT STABLE" },
        args.max_latency_growth * 100.0
    ));
    s.push_str("resident memory      warm MiB   last MiB    max MiB\n");
    for m in &r.memory {
        let verdict = match (m.judged, m.flat) {
            (false, _) => "(not judged)",
            (true, true) => "flat",
            (true, false) => "GREW",
        };
        s.push_str(&format!(
            "  {:<22} {:>8.1} {:>10.1} {:>10.1}   {verdict}\n",
            m.process,
            mib(m.warm_bytes),
            mib(m.last_bytes),
            mib(m.max_bytes)
        ));
    }
    s.push_str(&format!(
        "  (warm: median of the second window; allowed growth {:.0} % + 4 MiB)\n\n",
        args.max_rss_growth * 100.0
    ));
    s.push_str("stream / bucket        messages       MiB   bytes/message answered   limit\n");
    for g in &r.stores {
        let limit = match (g.end.max_bytes, g.end.max_messages_per_subject, g.end.max_age_secs) {
            (b, _, _) if b > 0 => format!("{:.0} MiB", mib(b.unsigned_abs())),
            (_, h, _) if h > 0 && g.end.name.starts_with("KV_") => format!("history {h}"),
            (_, _, a) if a > 0 => format!("age {} h", a / 3600),
            _ => "none".to_owned(),
        };
        s.push_str(&format!(
            "  {:<20} {:>10} {:>9.1} {:>24.0}   {limit}{}\n",
            g.end.name,
            g.end.messages,
            mib(g.end.bytes),
            g.bytes_per_turn,
            if g.within_limits { "" } else { "  OVER" }
        ));
    }
    s.push('\n');
    let held = "memory flat, stores within limits, latency stable, nothing lost";
    s.push_str(&r.violations.verdict(r.passed, held, &r.dir));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, rss: &[(&str, u64)], turns: usize, stores: Vec<StoreSize>) -> Sample {
        Sample { at_secs: at, rss: rss.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(), stores, turns }
    }

    fn store(name: &str, messages: u64, bytes: u64, subjects: u64, max_bytes: i64, history: i64) -> StoreSize {
        StoreSize {
            name: name.into(),
            messages,
            bytes,
            subjects,
            max_bytes,
            max_messages: -1,
            max_messages_per_subject: history,
            max_age_secs: 0,
            first_seq: 1,
        }
    }

    #[test]
    fn memory_is_judged_from_the_second_window_to_the_last() {
        const M: u64 = 1 << 20;
        // Warm-up in the first window (0–10 s) does not count.
        let samples: Vec<Sample> = (0..30)
            .map(|i| {
                let t = f64::from(i);
                let grows = if i < 10 { 10 * M } else { 20 * M + 2 * u64::from(i as u32) * M };
                sample(
                    t,
                    &[
                        ("conv-runtime #0", if i < 10 { u64::from(i as u32) * M } else { 30 * M }),
                        ("conv-effects #0", grows),
                        ("nats-server", grows),
                    ],
                    0,
                    vec![],
                )
            })
            .collect();
        let m = memory(&samples, 10.0, 30.0, 0.2);
        let by = |n: &str| m.iter().find(|x| x.process == n).cloned().expect(n);
        let runtime = by("conv-runtime #0");
        assert_eq!((runtime.warm_bytes, runtime.last_bytes, runtime.flat), (30 * M, 30 * M, true));
        let effects = by("conv-effects #0");
        assert_eq!((effects.warm_bytes, effects.last_bytes), (50 * M, 70 * M));
        assert!(!effects.flat, "70 MiB is more than 50 MiB + 20 % + 4 MiB");
        assert!(effects.judged);
        assert!(!by("nats-server").judged, "NATS holds what it stores");
        assert_eq!(effects.max_bytes, 78 * M);
    }

    #[test]
    fn latency_windows_and_stability() {
        let t0 = Instant::now();
        let turn = |at: u64, ms: u64| load::Turn {
            conversation: "c".into(),
            event_id: "e".into(),
            started: t0 + Duration::from_secs(at),
            reply: Some(Duration::from_millis(ms)),
            retries: Vec::new(),
        };
        let mut turns: Vec<load::Turn> = (0..100).map(|i| turn(i % 10, 100 + i)).collect();
        turns.extend((0..100).map(|i| turn(50 + i % 10, 120 + i)));
        turns.push(load::Turn { reply: None, ..turn(55, 0) });
        let first = window(&turns, t0, 0.0, 10.0);
        let last = window(&turns, t0, 50.0, f64::INFINITY);
        assert_eq!((first.turns, last.turns), (100, 100), "a turn without a reply has no latency");
        assert_eq!((first.reply_ms_p50, first.reply_ms_p99), (150.0, 198.0));
        assert!(stable(&first, &last, 0.5));
        let slow = Window { reply_ms_p99: 400.0, ..last };
        assert!(!stable(&first, &slow, 0.5), "p99 doubled");
        assert!(!stable(&first, &Window { turns: 0, ..last }, 0.5), "no traffic at the end is not stable");
    }

    #[test]
    fn stores_over_a_limit_or_their_history_are_found() {
        let samples = vec![
            sample(0.0, &[], 0, vec![store("CONV_OUT", 10, 1000, 2, -1, -1), store("KV_leases", 4, 400, 4, -1, 1)]),
            sample(
                10.0,
                &[],
                100,
                vec![store("CONV_OUT", 110, 21_000, 20, -1, -1), store("KV_leases", 4, 400, 4, -1, 1)],
            ),
        ];
        let mut problems = Vec::new();
        let g = growth(&samples, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(g[0].bytes_per_turn, 200.0);
        assert!(g.iter().all(|g| g.within_limits));

        let samples = vec![
            sample(0.0, &[], 0, vec![store("CONV_DLQ", 1, 100, 1, 1000, -1), store("KV_leases", 4, 400, 4, -1, 1)]),
            sample(10.0, &[], 5, vec![store("CONV_DLQ", 20, 2000, 1, 1000, -1), store("KV_leases", 9, 900, 4, -1, 1)]),
        ];
        let g = growth(&samples, &mut problems);
        assert!(g.iter().all(|g| !g.within_limits), "{g:?}");
        assert_eq!(problems.len(), 2, "{problems:?}");

        // Near a limit (NATS never lets a store exceed it), and a journal
        // whose oldest messages were dropped during the run.
        let mut problems = Vec::new();
        let near = store("CONV_DLQ", 9, 950, 1, 1000, -1);
        let dropped = StoreSize { first_seq: 40, ..store("CONV_IN", 100, 1000, 10, -1, -1) };
        let samples = vec![
            sample(0.0, &[], 0, vec![store("CONV_DLQ", 1, 100, 1, 1000, -1), store("CONV_IN", 50, 500, 10, -1, -1)]),
            sample(10.0, &[], 5, vec![near, dropped]),
        ];
        let g = growth(&samples, &mut problems);
        assert!(g.iter().all(|g| !g.within_limits), "{g:?}");
        assert!(problems.iter().any(|p| p.contains("90 %")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("first sequence 1 → 40")), "{problems:?}");
    }
}

//! One launch-readiness report (`convctl readiness`, the console's
//! readiness page) from NATS, the topology,
//! consumer pressure, the DLQ and every running service instance's own
//! `/readyz`. Instances are found where they announce themselves
//! (`conv_nats::presence`: `svc.<service>.<instance>` in `conv_leases`, gone
//! within the lease TTL after an instance dies), so a service kind with no
//! instance is `not_ready`, as is an instance that does not answer ready.
//! The previous report ([`Kept`]) sets the window over which DLQ growth
//! and latencies are judged.

use std::time::Duration;

use conv_contracts::subject::STREAM_DLQ;
use conv_nats::topology::{self, Action, Topology};
use serde::Serialize;

/// Bounds of the verdict; the defaults are production's.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Consumer backlog (pending + unacked) above which the report warns.
    pub max_backlog: u64,
    /// Dead letters above which the report is not_ready (any dead letter warns).
    pub max_dead_letters: u64,
    /// Dead letters added per minute since the previous report above which the report is not_ready.
    pub max_dlq_growth_per_min: f64,
    /// View lag p99 above which the report warns.
    pub max_view_lag_secs: f64,
    /// Abort latency p99 in milliseconds above which the report warns.
    pub max_abort_p99_ms: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_backlog: 10_000,
            max_dead_letters: 1_000,
            max_dlq_growth_per_min: 10.0,
            max_view_lag_secs: 5.0,
            max_abort_p99_ms: 600.0,
        }
    }
}

/// Overall verdict; exit code 0 / 1 / 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ready,
    Warning,
    NotReady,
}

impl Status {
    pub fn code(self) -> u8 {
        match self {
            Status::Ready => 0,
            Status::Warning => 1,
            Status::NotReady => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Status::Ready => "ready",
            Status::Warning => "warning",
            Status::NotReady => "not_ready",
        }
    }
}

/// One check behind the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: Status,
    pub checks: Vec<Check>,
    /// Entries in `CONV_DLQ` (`None`: not known).
    pub dead_letters: Option<u64>,
    /// The judged histograms, summed over the instances (kept for the next
    /// report's window).
    #[serde(skip)]
    pub histograms: Histograms,
}

pub fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status, detail: detail.into() }
}

/// The services probed, with their pinned address variables and defaults.
const SERVICES: [(&str, &str, &str); 4] = [
    ("conv-ingress", "CONV_INGRESS_ADDR", "127.0.0.1:8080"),
    ("conv-runtime", "CONV_RUNTIME_ADDR", "127.0.0.1:9101"),
    ("conv-effects", "CONV_EFFECTS_ADDR", "127.0.0.1:9102"),
    ("conv-projections", "CONV_PROJECTIONS_ADDR", "127.0.0.1:8081"),
];

/// Builds the report. Never fails: an unreachable part is a failed check.
/// `nats` is the connection with the topology it should find, or the check
/// that says why there is none; `url` names it in the report; without
/// `probe_services` the instances are not probed.
pub async fn report(
    nats: Result<(&async_nats::jetstream::Context, &conv_nats::TopologyConfig), Check>,
    url: &str,
    thresholds: &Thresholds,
    probe_services: bool,
    previous: Option<&Kept>,
) -> Report {
    let mut checks = Vec::new();
    let mut dead_letters = None;
    let mut histograms = Histograms::new();
    let js = match nats {
        Err(failed) => {
            checks.push(failed);
            None
        }
        Ok((js, cfg)) => {
            checks.push(check("nats", Status::Ready, format!("connected to {url}")));
            dead_letters = nats_checks(js, &Topology::declare(cfg), thresholds, previous, &mut checks).await;
            Some(js)
        }
    };
    if probe_services {
        histograms = service_checks(js, &mut checks).await;
        latency_checks(&histograms, previous, thresholds, &mut checks);
    }
    let status = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ready);
    Report { status, checks, dead_letters, histograms }
}

/// Checks NATS, the topology, the DLQ and the consumers; the number of dead
/// letters, when known.
async fn nats_checks(
    js: &async_nats::jetstream::Context,
    topo: &Topology,
    thresholds: &Thresholds,
    previous: Option<&Kept>,
    checks: &mut Vec<Check>,
) -> Option<u64> {
    let mut dead_letters = None;
    match js.query_account().await {
        Ok(account) => checks.push(check(
            "jetstream",
            Status::Ready,
            format!("{} streams, {} consumers", account.streams, account.consumers),
        )),
        Err(e) => {
            checks.push(check("jetstream", Status::NotReady, e.to_string()));
            return None;
        }
    }
    match topology::check(js, topo).await {
        Ok(r) if r.is_unchanged() => checks.push(check("topology", Status::Ready, r.to_string())),
        Ok(r) => {
            // Missing pieces stop the service; drifted ones only warn.
            let (action, status, what, hint) = if r.count(Action::Missing) > 0 {
                (Action::Missing, Status::NotReady, "missing", "run `convctl setup`")
            } else {
                (Action::Drifted, Status::Warning, "drifted", "see `convctl setup --check`")
            };
            let names: Vec<&str> = r.changes.iter().filter(|c| c.action == action).map(|c| c.name.as_str()).collect();
            checks.push(check("topology", status, format!("{what}: {} ({hint})", names.join(", "))));
        }
        Err(e) => checks.push(check("topology", Status::NotReady, e.to_string())),
    }
    // A missing CONV_DLQ is already reported by the topology check.
    if let Ok(mut dlq) = js.get_stream(STREAM_DLQ).await {
        match dlq.info().await {
            Ok(info) => {
                let n = info.state.messages;
                dead_letters = Some(n);
                checks.push(dlq_check(n, previous, thresholds, chrono::Utc::now()));
            }
            Err(e) => checks.push(check("dlq", Status::NotReady, e.to_string())),
        }
    }
    if let Ok(points) = crate::checkpoints::collect(js, topo).await {
        let mut busiest: Vec<_> = points.iter().filter(|c| c.exists).collect();
        busiest.sort_by_key(|c| std::cmp::Reverse(c.pending + c.ack_pending as u64));
        let backlog: u64 = points.iter().map(|c| c.pending + c.ack_pending as u64).sum();
        let status = if busiest.iter().any(|c| c.pending + c.ack_pending as u64 > thresholds.max_backlog) {
            Status::Warning
        } else {
            Status::Ready
        };
        let detail = match busiest.first() {
            Some(top) if backlog > 0 => format!(
                "backlog {backlog} in total; largest {}/{} with {} pending, {} unacked",
                top.stream, top.consumer, top.pending, top.ack_pending
            ),
            _ => "no backlog".to_owned(),
        };
        checks.push(check("consumers", status, detail));
    }
    dead_letters
}

/// Dead letters: none is ready, some is a warning (someone should look:
/// `convctl dlq list`), more than `max_dead_letters` or growing faster than
/// `max_dlq_growth_per_min` since the previous report is not ready.
fn dlq_check(n: u64, previous: Option<&Kept>, thresholds: &Thresholds, now: chrono::DateTime<chrono::Utc>) -> Check {
    let growth = previous.and_then(|p| {
        let before = p.dead_letters?;
        let then = chrono::DateTime::parse_from_rfc3339(&p.time).ok()?;
        let minutes = (now - then.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 60_000.0;
        // A window under a minute counts as a minute: a few dead letters
        // right after the previous report are not a storm.
        (n > before && minutes > 0.0).then(|| (n - before, (n - before) as f64 / minutes.max(1.0), p.time.clone()))
    });
    match growth {
        Some((added, rate, since)) if rate > thresholds.max_dlq_growth_per_min => check(
            "dlq",
            Status::NotReady,
            format!("{n} dead letters, {added} more since {since} ({rate:.1}/min; `convctl dlq list`)"),
        ),
        _ if n > thresholds.max_dead_letters => check(
            "dlq",
            Status::NotReady,
            format!("{n} dead letters, more than {} (`convctl dlq list`)", thresholds.max_dead_letters),
        ),
        _ if n > 0 => check("dlq", Status::Warning, format!("{n} dead letters (`convctl dlq list`)")),
        _ => check("dlq", Status::Ready, "no dead letters"),
    }
}

/// Probes every instance; returns the judged histograms of those that
/// answered, summed.
async fn service_checks(js: Option<&async_nats::jetstream::Context>, checks: &mut Vec<Check>) -> Histograms {
    let mut histograms = Histograms::new();
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(2)).build() {
        Ok(c) => c,
        Err(e) => {
            checks.push(check("services", Status::NotReady, format!("cannot build an HTTP client: {e}")));
            return histograms;
        }
    };
    let announced = match js {
        Some(js) => conv_nats::presence::list(js).await.map_err(|e| format!("cannot list instances: {e}")),
        None => Err("NATS does not answer".to_owned()),
    };
    let announced = match announced {
        Ok(a) => a,
        Err(why) => {
            // Without the announcements, the configured addresses.
            for (name, var, default) in SERVICES {
                let addr = std::env::var(var).unwrap_or_else(|_| default.to_owned());
                let c = match probe(&client, &addr).await {
                    Ok(()) => check(name, Status::Ready, format!("ready at {addr} ({why}; probed {var})")),
                    Err(e) => {
                        check(name, Status::NotReady, format!("{e} at {addr} ({why}; set {var} if it runs elsewhere)"))
                    }
                };
                checks.push(c);
            }
            return histograms;
        }
    };
    for (name, _, _) in SERVICES {
        let instances: Vec<_> = announced.iter().filter(|a| a.service == name).collect();
        if instances.is_empty() {
            checks.push(check(name, Status::NotReady, "no instance running (none announced in conv_leases)"));
            continue;
        }
        for a in instances {
            // UUIDs (32 hex digits) by their last 8; other ids whole.
            let short = if a.instance.is_ascii() && a.instance.len() > 12 {
                &a.instance[a.instance.len() - 8..]
            } else {
                a.instance.as_str()
            };
            let c = match probe(&client, &a.addr).await {
                Ok(()) => {
                    if let Some(text) = scrape(&client, &a.addr).await {
                        for (key, metric) in JUDGED {
                            add(histograms.entry(key.to_owned()).or_default(), &buckets(&text, metric, ""));
                        }
                    }
                    check(
                        format!("{name} {short}"),
                        Status::Ready,
                        format!("ready at {} (up since {})", a.addr, a.started_at),
                    )
                }
                Err(e) => check(format!("{name} {short}"), Status::NotReady, format!("{e} at {}", a.addr)),
            };
            checks.push(c);
        }
    }
    histograms
}

/// Histogram buckets: `le` as the exposition format writes it (`"0.5"`,
/// `"+Inf"`) → cumulative count.
pub type Buckets = Vec<(String, u64)>;
/// Judged histograms by key.
pub type Histograms = std::collections::BTreeMap<String, Buckets>;

/// The histograms readiness judges: (key, metric).
const JUDGED: [(&str, &str); 2] =
    [("view_lag", "conv_projections_view_lag_seconds"), ("abort_latency", "conv_effects_abort_latency_seconds")];

/// `GET /metrics` (`None` when it does not answer).
async fn scrape(client: &reqwest::Client, addr: &str) -> Option<String> {
    let r = client.get(format!("http://{addr}/metrics")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

/// The buckets of histogram `metric` in a `/metrics` text, summed over its
/// series whose labels hold `label` (e.g. `priority="P0"`; `""`: all).
pub fn buckets(text: &str, metric: &str, label: &str) -> Buckets {
    let prefix = format!("{metric}_bucket{{");
    let mut out: Buckets = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&prefix) && l.contains(label)) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else { continue };
        add(&mut out, &[(le.to_owned(), count as u64)]);
    }
    out
}

fn le(s: &str) -> f64 {
    if s == "+Inf" { f64::INFINITY } else { s.parse().unwrap_or(f64::INFINITY) }
}

/// Adds `more` into `into`, bucket by bucket.
fn add(into: &mut Buckets, more: &[(String, u64)]) {
    for (l, n) in more {
        match into.iter_mut().find(|(x, _)| x == l) {
            Some((_, c)) => *c += n,
            None => into.push((l.clone(), *n)),
        }
    }
    into.sort_by(|a, b| le(&a.0).total_cmp(&le(&b.0)));
}

/// `now − before`, bucket by bucket; `None` when a count went down (an
/// instance restarted, or one went away) or the buckets differ.
fn since(now: &Buckets, before: &Buckets) -> Option<Buckets> {
    if now.len() != before.len() {
        return None;
    }
    now.iter().zip(before).map(|((l, n), (m, b))| (l == m && n >= b).then(|| (l.clone(), n - b))).collect()
}

/// The bucket bound under which `q` of the observations fall, and how many
/// observations there are (`None`: none).
pub fn quantile(b: &Buckets, q: f64) -> Option<(f64, u64)> {
    let total = b.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    b.iter().find(|(_, c)| *c >= want).map(|(l, _)| (le(l), total))
}

/// View lag and abort latency from the services' histograms, over the
/// window since the previous report when the counts allow it (else since
/// the instances started): above the threshold is a warning.
fn latency_checks(now: &Histograms, previous: Option<&Kept>, thresholds: &Thresholds, checks: &mut Vec<Check>) {
    let judged = [
        ("view_lag", "view lag", "journal → view", thresholds.max_view_lag_secs),
        (
            "abort_latency",
            "abort latency",
            "abort accepted → effect told to stop",
            thresholds.max_abort_p99_ms / 1000.0,
        ),
    ];
    for (key, name, what, max) in judged {
        let Some(current) = now.get(key) else { continue };
        let window = previous.and_then(|p| Some((since(current, p.histograms.get(key)?)?, p.time.clone())));
        let (b, over) = match &window {
            Some((b, t)) => (b, format!("since {t}")),
            None => (current, "since the instances started".to_owned()),
        };
        let c = match quantile(b, 0.99) {
            None => check(name, Status::Ready, format!("no samples {over}")),
            Some((p99, n)) => {
                let shown = if p99.is_finite() {
                    format!("≤ {:.0} ms", p99 * 1000.0)
                } else {
                    "above every bucket".to_owned()
                };
                let status = if p99 > max { Status::Warning } else { Status::Ready };
                check(name, status, format!("p99 {shown} ({what}, {n} samples {over}; bound {:.0} ms)", max * 1000.0))
            }
        };
        checks.push(c);
    }
}

/// How an instance failed its probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ProbeError {
    #[error("not answering")]
    NotAnswering,
    /// `/readyz` answered `status` with these failing checks.
    #[error("not ready ({status}: {})", failing.join("; "))]
    NotReady { status: reqwest::StatusCode, failing: Vec<String> },
}

/// `GET /readyz`.
async fn probe(client: &reqwest::Client, addr: &str) -> Result<(), ProbeError> {
    match client.get(format!("http://{addr}/readyz")).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let failing: Vec<String> = body["checks"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter(|c| c["ok"] == false)
                        .map(|c| {
                            format!("{}: {}", c["name"].as_str().unwrap_or("?"), c["detail"].as_str().unwrap_or(""))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Err(ProbeError::NotReady { status, failing })
        }
        Err(_) => Err(ProbeError::NotAnswering),
    }
}

/// One kept report.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Kept {
    pub time: String,
    pub status: Status,
    /// `name: detail` of every check that was not ready.
    pub problems: Vec<String>,
    /// Dead letters at the time (for the growth rate).
    pub dead_letters: Option<u64>,
    /// The NATS it looked at (growth is measured against a report of the same).
    #[serde(default)]
    pub nats: String,
    /// The judged histograms at the time.
    #[serde(default)]
    pub histograms: Histograms,
}

impl Kept {
    /// What is kept of `report`, made now against `nats`.
    pub fn of(report: &Report, nats: &str) -> Kept {
        Kept {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            status: report.status,
            problems: report
                .checks
                .iter()
                .filter(|c| c.status != Status::Ready)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect(),
            dead_letters: report.dead_letters,
            nats: nats.to_owned(),
            histograms: report.histograms.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Thresholds {
        Thresholds::default()
    }

    #[test]
    fn dead_letters_warn_and_a_fast_growing_dlq_is_not_ready() {
        let now = chrono::Utc::now();
        let at = |minutes_ago: i64, n: u64| Kept {
            time: (now - chrono::Duration::minutes(minutes_ago)).to_rfc3339(),
            status: Status::Ready,
            problems: vec![],
            dead_letters: Some(n),
            nats: String::new(),
            histograms: Histograms::new(),
        };
        assert_eq!(dlq_check(0, None, &args(), now).status, Status::Ready);
        assert_eq!(dlq_check(1, None, &args(), now).status, Status::Warning, "one garbage message: look, not down");
        assert_eq!(dlq_check(1_001, None, &args(), now).status, Status::NotReady);
        assert_eq!(dlq_check(25, Some(&at(10, 5)), &args(), now).status, Status::Warning, "2 a minute");
        let fast = dlq_check(305, Some(&at(10, 5)), &args(), now);
        assert_eq!(fast.status, Status::NotReady, "30 a minute");
        assert!(fast.detail.contains("300 more"), "{}", fast.detail);
        assert_eq!(dlq_check(5, Some(&at(1, 50)), &args(), now).status, Status::Warning, "shrinking is fine");
        let seconds_ago = Kept { time: (now - chrono::Duration::seconds(2)).to_rfc3339(), ..at(0, 0) };
        assert_eq!(dlq_check(1, Some(&seconds_ago), &args(), now).status, Status::Warning, "one, just now");
        assert_eq!(dlq_check(11, Some(&seconds_ago), &args(), now).status, Status::NotReady, "eleven, just now");
    }

    #[test]
    fn latency_is_judged_from_the_histograms_over_the_window() {
        let text = "# HELP x\nconv_projections_view_lag_seconds_bucket{le=\"0.1\"} 90\n\
                    conv_projections_view_lag_seconds_bucket{le=\"1\"} 99\n\
                    conv_projections_view_lag_seconds_bucket{le=\"10\"} 100\n\
                    conv_projections_view_lag_seconds_bucket{le=\"+Inf\"} 100\n\
                    conv_projections_view_lag_seconds_sum 12\n";
        let mut two = buckets(text, "conv_projections_view_lag_seconds", "");
        add(&mut two, &buckets(text, "conv_projections_view_lag_seconds", ""));
        assert_eq!(two[0], ("0.1".to_owned(), 180));
        assert_eq!(two.last(), Some(&("+Inf".to_owned(), 200)));
        assert_eq!(quantile(&two, 0.99), Some((1.0, 200)));
        assert_eq!(quantile(&two, 0.5), Some((0.1, 200)));

        let now: Histograms = [("view_lag".to_owned(), two.clone())].into();
        let mut checks = Vec::new();
        latency_checks(&now, None, &args(), &mut checks);
        assert_eq!(checks[0].status, Status::Ready, "{:?}", checks[0]);
        assert!(checks[0].detail.contains("since the instances started"), "{:?}", checks[0]);

        // Since the previous report, every new sample was slow.
        let before = Kept {
            time: "t0".into(),
            status: Status::Ready,
            problems: vec![],
            dead_letters: None,
            nats: String::new(),
            histograms: [(
                "view_lag".to_owned(),
                vec![("0.1".to_owned(), 180), ("1".to_owned(), 190), ("10".to_owned(), 190), ("+Inf".to_owned(), 190)],
            )]
            .into(),
        };
        let mut checks = Vec::new();
        latency_checks(&now, Some(&before), &args(), &mut checks);
        assert_eq!(checks[0].status, Status::Warning, "{:?}", checks[0]);
        assert!(checks[0].detail.contains("10 samples since t0"), "{:?}", checks[0]);
        // A restarted instance (counts went down): judged since start again.
        let restarted = Kept { histograms: [("view_lag".to_owned(), vec![("0.1".to_owned(), 999)])].into(), ..before };
        let mut checks = Vec::new();
        latency_checks(&now, Some(&restarted), &args(), &mut checks);
        assert!(checks[0].detail.contains("since the instances started"), "{:?}", checks[0]);
    }
}

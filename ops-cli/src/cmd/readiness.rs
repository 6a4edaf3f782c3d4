//! `convctl readiness`: one launch-readiness report from NATS, the topology,
//! consumer pressure, the DLQ and the services' own `/readyz`.

use std::time::Duration;

use conv_contracts::subject::STREAM_DLQ;
use conv_nats::topology::{self, Action, Topology};
use serde::Serialize;

use crate::Outcome;
use crate::cli::{Global, ReadinessArgs};

/// Overall verdict; exit code 0 / 1 / 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
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

    fn label(self) -> &'static str {
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
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
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
pub async fn report(g: &Global, args: &ReadinessArgs) -> Report {
    let mut checks = Vec::new();
    match (g.topology(), crate::connect(g).await) {
        (Err(e), _) => checks.push(check("options", Status::NotReady, e.to_string())),
        (_, Err(e)) => checks.push(check("nats", Status::NotReady, e.to_string())),
        (Ok(cfg), Ok(js)) => {
            checks.push(check("nats", Status::Ready, format!("connected to {}", g.display_url())));
            nats_checks(&js, &Topology::declare(&cfg), args, &mut checks).await;
        }
    }
    if !args.no_services {
        service_checks(&mut checks).await;
    }
    let status = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ready);
    Report { status, checks }
}

async fn nats_checks(
    js: &async_nats::jetstream::Context,
    topo: &Topology,
    args: &ReadinessArgs,
    checks: &mut Vec<Check>,
) {
    match js.query_account().await {
        Ok(account) => checks.push(check(
            "jetstream",
            Status::Ready,
            format!("{} streams, {} consumers", account.streams, account.consumers),
        )),
        Err(e) => {
            checks.push(check("jetstream", Status::NotReady, e.to_string()));
            return;
        }
    }
    match topology::check(js, topo).await {
        Ok(r) if r.is_unchanged() => checks.push(check("topology", Status::Ready, r.to_string())),
        Ok(r) if r.count(Action::Missing) > 0 => {
            let missing: Vec<&str> =
                r.changes.iter().filter(|c| c.action == Action::Missing).map(|c| c.name.as_str()).collect();
            checks.push(check(
                "topology",
                Status::NotReady,
                format!("missing: {} (run `convctl setup`)", missing.join(", ")),
            ));
        }
        Ok(r) => {
            let drifted: Vec<&str> =
                r.changes.iter().filter(|c| c.action == Action::Drifted).map(|c| c.name.as_str()).collect();
            checks.push(check(
                "topology",
                Status::Warning,
                format!("drifted: {} (see `convctl setup --check`)", drifted.join(", ")),
            ));
        }
        Err(e) => checks.push(check("topology", Status::NotReady, e.to_string())),
    }
    // A missing CONV_DLQ is already reported by the topology check.
    if let Ok(mut dlq) = js.get_stream(STREAM_DLQ).await {
        match dlq.info().await {
            Ok(info) => {
                let n = info.state.messages;
                let status = match n {
                    0 => Status::Ready,
                    n if n > args.max_dead_letters => Status::NotReady,
                    _ => Status::Warning,
                };
                let detail = if n == 0 {
                    "no dead letters".to_owned()
                } else {
                    format!("{n} dead letters (`convctl dlq list`)")
                };
                checks.push(check("dlq", status, detail));
            }
            Err(e) => checks.push(check("dlq", Status::NotReady, e.to_string())),
        }
    }
    if let Ok(points) = super::checkpoints::collect(js, topo).await {
        let mut busiest: Vec<_> = points.iter().filter(|c| c.exists).collect();
        busiest.sort_by_key(|c| std::cmp::Reverse(c.pending + c.ack_pending as u64));
        let backlog: u64 = points.iter().map(|c| c.pending + c.ack_pending as u64).sum();
        let status = if busiest.iter().any(|c| c.pending + c.ack_pending as u64 > args.max_backlog) {
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
}

async fn service_checks(checks: &mut Vec<Check>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(2)).build() {
        Ok(c) => c,
        Err(e) => {
            checks.push(check("services", Status::Warning, format!("cannot build an HTTP client: {e}")));
            return;
        }
    };
    for (name, var, default) in SERVICES {
        let addr = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        let url = format!("http://{addr}/readyz");
        let c = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => check(name, Status::Ready, format!("ready at {addr}")),
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                check(name, Status::Warning, format!("not ready at {addr} ({status}): {body}"))
            }
            Err(_) => check(name, Status::Warning, format!("not answering at {addr} (set {var} if it runs elsewhere)")),
        };
        checks.push(c);
    }
}

pub async fn run(g: &Global, args: &ReadinessArgs) -> Outcome {
    let report = report(g, args).await;
    let output = if g.json {
        crate::to_json(&report)
    } else {
        let mut text = String::new();
        for c in &report.checks {
            text.push_str(&format!("{:<9} {:<17} {}\n", c.status.label(), c.name, c.detail));
        }
        text.push_str(report.status.label());
        text
    };
    Outcome { output, code: report.status.code() }
}

//! `convctl readiness`: prints `conv_admin::readiness::report` (see there)
//! and keeps each report (`.conv/readiness.jsonl`, the last 200) for
//! `--history` and as the window of the next one.

use conv_admin::readiness::{self, Kept, Status, Thresholds};

use crate::Outcome;
use crate::cli::{Global, ReadinessArgs};

/// Reports kept for `--history`.
const KEPT: usize = 200;

fn history_file() -> std::path::PathBuf {
    std::path::Path::new(".conv").join("readiness.jsonl")
}

fn read_history(path: &std::path::Path) -> Vec<Kept> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// Appends `kept`, keeping the last [`KEPT`]; a report that cannot be kept
/// is only logged.
fn keep(path: &std::path::Path, kept: &Kept) {
    let mut all = read_history(path);
    all.push(kept.clone());
    let start = all.len().saturating_sub(KEPT);
    let text: String = all[start..].iter().filter_map(|k| serde_json::to_string(k).ok()).map(|l| l + "\n").collect();
    let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(path, text));
    if let Err(error) = written {
        tracing::warn!(message = "Cannot keep the readiness report.", path = %path.display(), %error);
    }
}

pub async fn run(g: &Global, args: &ReadinessArgs) -> Outcome {
    let path = history_file();
    let history = read_history(&path);
    let nats = g.display_url();
    let previous = history.iter().rev().find(|k| k.nats == nats);
    let thresholds = Thresholds {
        max_backlog: args.max_backlog,
        max_dead_letters: args.max_dead_letters,
        max_dlq_growth_per_min: args.max_dlq_growth_per_min,
        max_view_lag_secs: args.max_view_lag_secs,
        max_abort_p99_ms: args.max_abort_p99_ms,
    };
    // One connection serves the NATS checks and the instance listing.
    let connected = match (args.topology.topology(), crate::connect(g).await) {
        (Err(e), _) => Err(readiness::check("options", Status::NotReady, e.to_string())),
        (_, Err(e)) => Err(readiness::check("nats", Status::NotReady, e.to_string())),
        (Ok(cfg), Ok(js)) => Ok((js, cfg)),
    };
    let report = match &connected {
        Ok((js, cfg)) => readiness::report(Ok((js, cfg)), &nats, &thresholds, !args.no_services, previous).await,
        Err(failed) => readiness::report(Err(failed.clone()), &nats, &thresholds, !args.no_services, previous).await,
    };
    let kept = Kept::of(&report, &nats);
    keep(&path, &kept);
    let code = report.status.code();
    if args.history {
        let mut all = history;
        all.push(kept);
        let output = if g.json {
            crate::to_json(&all)
        } else {
            let mut text =
                format!("the last {} of {} kept reports ({}):\n", all.len().min(20), all.len(), path.display());
            for k in all.iter().skip(all.len().saturating_sub(20)) {
                text.push_str(&format!("{:<24} {:<9} {}\n", k.time, k.status.label(), k.problems.join("; ")));
            }
            text.trim_end().to_owned()
        };
        return Outcome { output, code };
    }
    let output = if g.json {
        crate::to_json(&report)
    } else {
        let mut text = String::new();
        for c in &report.checks {
            text.push_str(&format!("{:<9} {:<26} {}\n", c.status.label(), c.name, c.detail));
        }
        text.push_str(report.status.label());
        text
    };
    Outcome { output, code }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conv_admin::readiness::Histograms;

    #[test]
    fn history_keeps_the_last_reports() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(".conv/readiness.jsonl");
        for i in 0..(KEPT + 5) {
            keep(
                &path,
                &Kept {
                    time: i.to_string(),
                    status: Status::Ready,
                    problems: vec![],
                    dead_letters: None,
                    nats: String::new(),
                    histograms: Histograms::new(),
                },
            );
        }
        let kept = read_history(&path);
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept.last().map(|k| k.time.as_str()), Some("204"));
    }
}

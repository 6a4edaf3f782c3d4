//! `convctl dlq list | show <id> | redrive (<id> | --all) [--dry-run]`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use conv_nats::dlq::{self, DeadLetter, Redriven};
use serde::Serialize;

use crate::cli::{DlqCommand, Global};
use crate::{Error, Outcome};

/// Time allowed for each republish to be acknowledged.
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(g: &Global, command: &DlqCommand) -> Result<Outcome, Error> {
    let js = crate::connect(g).await?;
    match command {
        DlqCommand::List => list(g, &js).await,
        DlqCommand::Show { id } => show(g, &js, *id).await,
        DlqCommand::Redrive { id: Some(id), dry_run, force, .. } => redrive_one(g, &js, *id, *dry_run, *force).await,
        DlqCommand::Redrive { id: None, dry_run, force, .. } => redrive_all(g, &js, *dry_run, *force).await,
    }
}

fn cause_label(d: &DeadLetter) -> &'static str {
    match d.cause {
        dlq::Cause::MaxDeliveries => "max_deliveries",
        dlq::Cause::Terminated => "terminated",
        dlq::Cause::StraySubject => "stray_subject",
        dlq::Cause::Other => "other",
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > max { format!("{}…", flat.chars().take(max - 1).collect::<String>()) } else { flat }
}

async fn list(g: &Global, js: &async_nats::jetstream::Context) -> Result<Outcome, Error> {
    let letters = dlq::list(js).await?;
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&letters)));
    }
    if letters.is_empty() {
        return Ok(Outcome::ok("no dead letters"));
    }
    let mut text = format!(
        "{:>6}  {:<24}  {:<14}  {:<28}  {:<30}  {:<16}  {}\n",
        "ID", "TIME", "CAUSE", "FROM", "TYPE", "CONVERSATION", "REASON"
    );
    for d in &letters {
        let from = match (&d.stream, &d.consumer, &d.original) {
            (Some(s), Some(c), Some(o)) => format!("{s}#{} ({c})", o.seq),
            (Some(s), Some(c), None) => format!("{s} ({c})"),
            (_, _, Some(o)) => o.subject.clone(),
            _ => "-".into(),
        };
        let original = d.original.as_ref();
        let reason = d.reason.clone().or_else(|| d.original_error.clone().map(|e| format!("original gone: {e}")));
        text.push_str(&format!(
            "{:>6}  {:<24}  {:<14}  {:<28}  {:<30}  {:<16}  {}\n",
            d.id,
            d.time,
            cause_label(d),
            one_line(&from, 28),
            one_line(original.and_then(|o| o.event_type.as_deref()).unwrap_or("-"), 30),
            one_line(original.and_then(|o| o.conversation_id.as_deref()).unwrap_or("-"), 16),
            one_line(reason.as_deref().unwrap_or("-"), 80),
        ));
    }
    text.push_str(&format!("{} dead letters", letters.len()));
    Ok(Outcome::ok(text))
}

async fn show(g: &Global, js: &async_nats::jetstream::Context, id: u64) -> Result<Outcome, Error> {
    let d = dlq::get(js, id).await?;
    let verdict = dlq::validate_original(&d, conv_contracts::Limits::default());
    if g.json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            dead_letter: &'a DeadLetter,
            redrivable: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            not_redrivable_because: Option<String>,
        }
        let shown = Shown {
            dead_letter: &d,
            redrivable: verdict.is_ok(),
            not_redrivable_because: verdict.as_ref().err().map(ToString::to_string),
        };
        return Ok(Outcome::ok(crate::to_json(&shown)));
    }
    let mut text = format!("dead letter {}\n  time:        {}\n  cause:       {}\n", d.id, d.time, cause_label(&d));
    if let (Some(s), Some(c)) = (&d.stream, &d.consumer) {
        text.push_str(&format!("  consumer:    {s}/{c}\n"));
    }
    if let Some(n) = d.deliveries {
        text.push_str(&format!("  deliveries:  {n}\n"));
    }
    if let Some(r) = &d.reason {
        text.push_str(&format!("  reason:      {r}\n"));
    }
    match &d.original {
        Some(o) => {
            text.push_str(&format!("  original:    {}#{} on {}\n", o.stream, o.seq, o.subject));
            for (k, v) in &o.headers {
                text.push_str(&format!("    {k}: {v}\n"));
            }
            text.push_str(&format!("    payload: {}\n", one_line(&o.payload, 2000)));
        }
        None => text.push_str(&format!(
            "  original:    no longer stored ({})\n",
            d.original_error.as_deref().unwrap_or("unknown")
        )),
    }
    match verdict {
        Ok(e) => text.push_str(&format!("  redrive:     would republish {} to {}", e.id(), e.nats_subject())),
        Err(e) => text.push_str(&format!("  redrive:     not possible: {e}")),
    }
    Ok(Outcome::ok(text))
}

fn describe(r: &Redriven) -> String {
    match (r.dry_run, r.stream_seq, r.duplicate) {
        (true, _, _) => format!("would re-drive {} ({}) to {}", r.id, r.event_id, r.subject),
        (false, Some(seq), false) => format!("re-drove {} ({}) to {} as #{seq}", r.id, r.event_id, r.subject),
        (false, Some(seq), true) => format!("re-drove {} ({}): already republished as #{seq}", r.id, r.event_id),
        (false, None, _) => format!("re-drove {} ({})", r.id, r.event_id),
    }
}

async fn redrive_one(
    g: &Global,
    js: &async_nats::jetstream::Context,
    id: u64,
    dry_run: bool,
    force: bool,
) -> Result<Outcome, Error> {
    let r = dlq::redrive(js, id, dry_run, force, APPEND_TIMEOUT).await?;
    Ok(Outcome::ok(if g.json { crate::to_json(&r) } else { describe(&r) }))
}

/// Draws `[#####     ] n/total` on stderr when it is a terminal.
struct Progress {
    total: usize,
    on: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self { total, on: std::io::stderr().is_terminal() && total > 0 }
    }

    fn draw(&self, done: usize, label: &str) {
        if !self.on {
            return;
        }
        let width = 30;
        let filled = done * width / self.total.max(1);
        let mut err = std::io::stderr();
        let _ =
            write!(err, "\r[{}{}] {done}/{} {label}   ", "#".repeat(filled), " ".repeat(width - filled), self.total);
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.on {
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[derive(Debug, Serialize)]
struct Summary {
    redriven: Vec<Redriven>,
    failed: Vec<Failure>,
    dry_run: bool,
}

#[derive(Debug, Serialize)]
struct Failure {
    id: u64,
    error: String,
}

async fn redrive_all(
    g: &Global,
    js: &async_nats::jetstream::Context,
    dry_run: bool,
    force: bool,
) -> Result<Outcome, Error> {
    let letters = dlq::list(js).await?;
    let progress = Progress::new(letters.len());
    let mut summary = Summary { redriven: Vec::new(), failed: Vec::new(), dry_run };
    for (i, d) in letters.iter().enumerate() {
        progress.draw(i, if dry_run { "checking" } else { "re-driving" });
        match dlq::redrive(js, d.id, dry_run, force, APPEND_TIMEOUT).await {
            Ok(r) => summary.redriven.push(r),
            Err(e) => summary.failed.push(Failure { id: d.id, error: e.to_string() }),
        }
    }
    progress.draw(letters.len(), "done");
    progress.finish();
    let code = u8::from(!summary.failed.is_empty());
    if g.json {
        return Ok(Outcome { output: crate::to_json(&summary), code });
    }
    let mut text = String::new();
    for r in &summary.redriven {
        text.push_str(&describe(r));
        text.push('\n');
    }
    for f in &summary.failed {
        text.push_str(&format!("skipped {}: {}\n", f.id, f.error));
    }
    let verb = if dry_run { "would re-drive" } else { "re-drove" };
    text.push_str(&format!("{verb} {}, skipped {}", summary.redriven.len(), summary.failed.len()));
    Ok(Outcome { output: text, code })
}

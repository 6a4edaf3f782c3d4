//! `convctl trace <conversation>|<event-id>` and `convctl events
//! <conversation>`: prints what `conv_admin::trace` reads (see there).

use conv_admin::trace::{self, MAX_NODES, Node};
use conv_contracts::ConversationId;

use crate::cli::Global;
use crate::{Error, Outcome};

fn line(n: &Node) -> String {
    format!("{} {} ({}#{})", n.ty, n.id, n.stream, n.seq)
}

fn print(n: &Node, depth: usize, out: &mut String) {
    out.push_str(&format!("{}{}\n", "  ".repeat(depth), line(n)));
    for e in &n.effects {
        print(e, depth + 1, out);
    }
}

pub async fn run(g: &Global, arg: &str, conversation: Option<&str>) -> Result<Outcome, Error> {
    let target = trace::target(arg, conversation)?;
    let js = crate::connect(g).await?;
    let t = trace::trace(&js, &target).await?;
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&t)));
    }
    let mut out = format!("conversation {} ({} events)\n", t.conversation_id, t.events);
    if let Some(b) = &t.branch {
        out.push_str("causes:\n");
        if let Some(ext) = &b.external_cause {
            out.push_str(&format!("  (external) {ext}\n"));
        }
        for c in &b.causes {
            out.push_str(&format!("  {}\n", line(c)));
        }
        if b.causes.is_empty() && b.external_cause.is_none() {
            out.push_str("  (none: this is a root event)\n");
        }
        out.push_str("event and effects:\n");
        print(&b.event, 1, &mut out);
    }
    for root in &t.roots {
        print(root, 0, &mut out);
    }
    if t.truncated {
        out.push_str(&format!("… more than {MAX_NODES} events; see --json or `convctl events`\n"));
    }
    Ok(Outcome::ok(out.trim_end()))
}

pub async fn events(g: &Global, conversation: &str) -> Result<Outcome, Error> {
    let conv = ConversationId::parse(conversation)
        .map_err(|e| Error::Invalid(format!("conversation id {conversation:?}: {e}")))?;
    let js = crate::connect(g).await?;
    let rows = trace::events(&js, &conv).await?;
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&rows)));
    }
    let width = rows.iter().map(|r| r.ty.len()).max().unwrap_or(4).max(4);
    let at = rows.iter().map(|r| format!("{}#{}", r.stream, r.seq).len()).max().unwrap_or(6).max(6);
    let mut out = format!("{:<30}  {:<at$}  {:<width$}  ID  (CAUSE)\n", "TIME", "STREAM", "TYPE");
    for r in &rows {
        let place = format!("{}#{}", r.stream, r.seq);
        let cause = r.causation_id.as_deref().map(|c| format!("  ({c})")).unwrap_or_default();
        out.push_str(&format!(
            "{:<30}  {place:<at$}  {:<width$}  {}{cause}\n",
            r.time.as_deref().unwrap_or("-"),
            r.ty,
            r.id
        ));
    }
    Ok(Outcome::ok(out.trim_end()))
}

//! `convctl projections rebuild (<conversation> | --all)`: recompute timeline
//! views from `CONV_OUT` (the views are a fold of it) and store them.

use conv_contracts::ConversationId;
use serde::Serialize;

use crate::cli::Global;
use crate::{Error, Outcome};

#[derive(Debug, Serialize)]
struct Rebuilt {
    conversation_id: String,
    events: usize,
    entries: usize,
    run_status: conv_contracts::payload::RunStatus,
}

pub async fn rebuild(g: &Global, conversation: Option<&str>) -> Result<Outcome, Error> {
    let js = crate::connect(g).await?;
    let targets = match conversation {
        Some(c) => vec![ConversationId::parse(c).map_err(|e| Error::Invalid(format!("conversation id {c:?}: {e}")))?],
        None => conv_projections::conversations(&js).await.map_err(Error::JetStream)?,
    };
    let mut done = Vec::new();
    for conv in targets {
        let (view, events) = conv_projections::rebuild(&js, &conv).await.map_err(Error::JetStream)?;
        done.push(Rebuilt {
            conversation_id: conv.to_string(),
            events,
            entries: view.entries.len(),
            run_status: view.run_status,
        });
    }
    if g.json {
        return Ok(Outcome::ok(crate::to_json(&done)));
    }
    let mut text: String = done
        .iter()
        .map(|r| {
            format!("{}: {} events → {} entries, run {:?}\n", r.conversation_id, r.events, r.entries, r.run_status)
        })
        .collect();
    text.push_str(&format!("rebuilt {} views", done.len()));
    Ok(Outcome::ok(text))
}

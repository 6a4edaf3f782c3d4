//! `convctl projections rebuild (<conversation> | --all)`: recompute timeline
//! views from `CONV_OUT` (the views are a fold of it) and store them.
//! `convctl projections verify (<conversation> | --all)`: compare every stored
//! view with that fold; print the differences and exit 1 on any.

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

async fn targets(
    js: &async_nats::jetstream::Context,
    conversation: Option<&str>,
) -> Result<Vec<ConversationId>, Error> {
    Ok(match conversation {
        Some(c) => vec![ConversationId::parse(c).map_err(|e| Error::Invalid(format!("conversation id {c:?}: {e}")))?],
        None => conv_store::views::conversations(js).await?,
    })
}

pub async fn verify(g: &Global, conversation: Option<&str>, settle: std::time::Duration) -> Result<Outcome, Error> {
    let js = crate::connect(g).await?;
    let targets = targets(&js, conversation).await?;
    let mut all = Vec::new();
    for conv in &targets {
        all.push(conv_store::views::verify(&js, conv, settle).await?);
    }
    if let (Some(one), Some(v)) = (conversation, all.first())
        && v.view_position == 0
        && v.journal_position == 0
    {
        return Err(Error::Failed(format!("conversation {one:?} has no output in CONV_OUT and no stored view")));
    }
    let differing = all.iter().filter(|v| !v.ok()).count();
    let code = u8::from(differing > 0);
    if g.json {
        let body = serde_json::json!({
            "conversations": all.len(),
            "differing": differing,
            "match": differing == 0,
            "views": all,
        });
        return Ok(Outcome { output: crate::to_json(&body), code });
    }
    let mut text = String::new();
    for v in &all {
        if v.ok() {
            text.push_str(&format!("{}: ok (position {})\n", v.conversation_id, v.view_position));
        } else {
            text.push_str(&format!(
                "{}: DIFFERS (view at position {}, journal at {})\n",
                v.conversation_id, v.view_position, v.journal_position
            ));
            for d in &v.differences {
                text.push_str(&format!("  - {d}\n"));
            }
        }
    }
    text.push_str(&format!("{} views checked, {differing} differ from the journal", all.len()));
    Ok(Outcome { output: text, code })
}

pub async fn rebuild(g: &Global, conversation: Option<&str>) -> Result<Outcome, Error> {
    let js = crate::connect(g).await?;
    let targets = targets(&js, conversation).await?;
    let mut done = Vec::new();
    for conv in targets {
        let (view, events) = conv_store::views::rebuild(&js, &conv).await?;
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

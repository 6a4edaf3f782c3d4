//! `convctl replay <conversation>`: rebuild a conversation's state from the
//! journal alone (applied markers in applied order, the inputs they name) and
//! compare it with the live state (the runtime's snapshot plus the journal
//! tail after it). Never calls a model or a tool: their results are inputs.

use conv_contracts::ConversationId;
use conv_store::{Snapshots, journal};
use serde::Serialize;

use crate::cli::Global;
use crate::{Error, Outcome};

#[derive(Debug, Serialize)]
pub struct Report {
    pub conversation_id: String,
    /// Inputs replayed.
    pub events: u64,
    /// Hash of the live state: the runtime's snapshot plus the journal tail
    /// (the last recorded marker hash when there is no snapshot yet).
    pub live_hash: String,
    pub replay_hash: String,
    #[serde(rename = "match")]
    pub matches: bool,
    /// Markers whose recorded state hash differs from the replayed one.
    pub mismatched_markers: Vec<u64>,
    /// Version of the stored snapshot, if any.
    pub snapshot_version: Option<u64>,
}

pub async fn report(g: &Global, conversation: &str) -> Result<Report, Error> {
    let conv = ConversationId::parse(conversation)
        .map_err(|e| Error::Invalid(format!("conversation id {conversation:?}: {e}")))?;
    let js = crate::connect(g).await?;
    report_on(&js, &conv).await
}

/// [`report`] on an open connection.
pub async fn report_on(js: &async_nats::jetstream::Context, conv: &ConversationId) -> Result<Report, Error> {
    let (js, conv) = (js.clone(), conv.clone());
    let replayed = journal::rebuild(&js, &conv, None).await.map_err(Error::js("the journal"))?;
    if replayed.applied == 0 {
        return Err(Error::Failed(format!(
            "no applied events for conversation {conv} (unknown, or nothing applied yet)"
        )));
    }
    let replay_hash = replayed.snapshot.state.hash();
    let snapshots = Snapshots::open(&js).await.map_err(Error::js("the snapshots bucket"))?;
    let stored = snapshots.load(conv.as_str()).await.map_err(Error::js("the stored snapshot"))?.snapshot;
    let snapshot_version = stored.as_ref().map(|s| s.state.version);
    // The live state: the stored snapshot plus the journal after it. Its
    // chain must equal the replayed chain, and its whole content too.
    let (live_hash, same_content) = match stored {
        Some(snapshot) => {
            let live = journal::rebuild(&js, &conv, Some(snapshot))
                .await
                .map_err(Error::js("the journal after the snapshot"))?
                .snapshot
                .state;
            (live.hash(), live.digest() == replayed.snapshot.state.digest())
        }
        None => (replayed.recorded_hash.clone().unwrap_or_default(), true),
    };
    Ok(Report {
        conversation_id: conv.to_string(),
        events: replayed.applied,
        matches: live_hash == replay_hash && same_content && replayed.mismatches.is_empty(),
        live_hash,
        replay_hash,
        mismatched_markers: replayed.mismatches,
        snapshot_version,
    })
}

pub async fn run(g: &Global, conversation: &str) -> Result<Outcome, Error> {
    let r = report(g, conversation).await?;
    let code = u8::from(!r.matches);
    let output = if g.json {
        crate::to_json(&r)
    } else {
        format!(
            "conversation {}\n  events replayed: {}\n  live hash:       {}\n  replay hash:     {}\n  snapshot:        {}\n{}",
            r.conversation_id,
            r.events,
            r.live_hash,
            r.replay_hash,
            r.snapshot_version.map(|v| format!("version {v}")).unwrap_or_else(|| "none yet".into()),
            if r.matches { "match".to_owned() } else { format!("MISMATCH (markers {:?})", r.mismatched_markers) }
        )
    };
    Ok(Outcome { output, code })
}

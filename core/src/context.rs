//! The LLM-context projection: what the model is sent, and the window policy
//! that fits it into a provider's limit.
//!
//! The context is a function of the conversation's entries alone: failed and
//! rejected entries and streaming ones are left out; an aborted tool call
//! keeps its canceled result, so no call is ever left unanswered; an
//! assistant entry with neither text nor tool calls is left out.
//!
//! **Window policy** ([`Window`]): a provider takes at most `max_bytes` of
//! context (message text plus tool-call arguments). Messages are taken
//! newest first until the next one would not fit; the oldest are dropped,
//! whole. A `tool` result whose assistant call was dropped is dropped too,
//! so the model never sees an answer to a call it cannot see. Nothing is
//! summarized. If the newest message alone does not fit, the step fails
//! with [`WindowError::NewestTooLarge`] — visible in the timeline, never a
//! truncated message.

use conv_contracts::payload::{ContextMessage, EntryRole, EntryStatus};

use crate::state::{Entry, State};

/// The context message an entry contributes, if any.
pub fn message(e: &Entry) -> Option<ContextMessage> {
    if matches!(e.status, EntryStatus::Streaming | EntryStatus::Failed) && e.role != EntryRole::Tool {
        return None;
    }
    if e.role == EntryRole::Assistant && e.text.is_empty() && e.tool_calls.is_empty() {
        return None;
    }
    Some(ContextMessage {
        role: match e.role {
            EntryRole::User => "user",
            EntryRole::Assistant => "assistant",
            EntryRole::Tool => "tool",
            EntryRole::System => "system",
        }
        .to_owned(),
        content: e.text.clone(),
        tool_call_id: e.tool_call_id.clone(),
        tool_calls: e.tool_calls.clone(),
    })
}

/// The whole context of these entries, oldest first.
pub fn messages(entries: &[Entry]) -> Vec<ContextMessage> {
    entries.iter().filter_map(message).collect()
}

/// The whole context of a state (what `GET …/context` serves).
pub fn of(state: &State) -> Vec<ContextMessage> {
    messages(&state.entries)
}

/// What a message counts against the window: its text and its tool calls'
/// names and arguments, in bytes.
pub fn size(m: &ContextMessage) -> usize {
    m.content.len() + m.tool_calls.iter().map(|c| c.name.len() + c.args.to_string().len()).sum::<usize>()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error(
        "the newest context message is {size} bytes; the provider's window holds {max} (CONV_LLM_MAX_CONTEXT_BYTES)"
    )]
    NewestTooLarge { size: usize, max: usize },
}

/// Builds a context newest first under a byte budget (see the module docs).
#[derive(Debug, Clone)]
pub struct Window {
    max_bytes: usize,
    used: usize,
    /// Newest first.
    kept: Vec<ContextMessage>,
    dropped: usize,
    full: bool,
}

impl Window {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes, used: 0, kept: Vec::new(), dropped: 0, full: false }
    }

    /// Offers the next older message. Returns false once the window is full
    /// (the caller can stop reading older entries).
    pub fn offer_older(&mut self, m: ContextMessage) -> Result<bool, WindowError> {
        if self.full {
            self.dropped += 1;
            return Ok(false);
        }
        let size = size(&m);
        if self.kept.is_empty() && size > self.max_bytes {
            return Err(WindowError::NewestTooLarge { size, max: self.max_bytes });
        }
        if self.used + size > self.max_bytes {
            self.full = true;
            self.dropped += 1;
            return Ok(false);
        }
        self.used += size;
        self.kept.push(m);
        Ok(true)
    }

    /// True once an older message did not fit.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// The context, oldest first, and how many messages were dropped (at
    /// least; the caller may have stopped offering once it was full).
    pub fn finish(mut self) -> (Vec<ContextMessage>, usize) {
        self.kept.reverse();
        if self.full {
            // Drop tool results at the front whose call was dropped.
            let orphans = self.kept.iter().take_while(|m| m.role == "tool").count();
            self.kept.drain(..orphans);
            self.dropped += orphans;
        }
        (self.kept, self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, text: &str) -> ContextMessage {
        ContextMessage { role: role.into(), content: text.into(), tool_call_id: None, tool_calls: Vec::new() }
    }

    fn window(max: usize, newest_first: &[ContextMessage]) -> Result<(Vec<String>, usize), WindowError> {
        let mut w = Window::new(max);
        for m in newest_first {
            if !w.offer_older(m.clone())? {
                break;
            }
        }
        let (kept, dropped) = w.finish();
        Ok((kept.into_iter().map(|m| m.content).collect(), dropped))
    }

    #[test]
    fn everything_fits() {
        let r = window(100, &[msg("assistant", "b"), msg("user", "a")]).unwrap();
        assert_eq!(r, (vec!["a".to_owned(), "b".to_owned()], 0));
    }

    #[test]
    fn oldest_are_dropped_whole() {
        let r = window(10, &[msg("user", "cccc"), msg("assistant", "bbbb"), msg("user", "aaaa")]).unwrap();
        assert_eq!(r.0, vec!["bbbb".to_owned(), "cccc".to_owned()]);
        assert!(r.1 >= 1);
    }

    #[test]
    fn tool_results_without_their_call_are_dropped() {
        let r = window(
            9,
            &[
                msg("assistant", "done"),
                msg("tool", "r2"),
                msg("tool", "r1"),
                msg("assistant", "calling"),
                msg("user", "q"),
            ],
        )
        .unwrap();
        assert_eq!(r.0, vec!["done".to_owned()]);
    }

    #[test]
    fn a_newest_message_over_the_window_is_an_error() {
        assert_eq!(window(3, &[msg("user", "abcd")]), Err(WindowError::NewestTooLarge { size: 4, max: 3 }));
    }
}

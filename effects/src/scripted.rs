//! The `scripted` LLM provider: offline and deterministic. It answers with
//! `tokens` tokens, one every `delay`; a last user message of the form
//! `/tool NAME {json-args}` makes it call tool NAME with those args first,
//! and answer with the tool's result once it is in the context.

use std::time::Duration;

use conv_contracts::payload::{ContextMessage, ToolCall};
use serde_json::Value;

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Text(String),
    ToolCall(ToolCall),
}

/// The scripted provider's settings.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub tokens: usize,
    pub delay: Duration,
}

/// What the scripted model does for a context: the chunks of its answer.
pub fn plan(context: &[ContextMessage], step_id: &str, tokens: usize) -> Vec<Chunk> {
    let last = context.last();
    if let Some(note) = last.filter(|m| m.role == "system") {
        return words(&format!("Noted: {}.", note.content), tokens.max(1));
    }
    if let Some(tool) = last.filter(|m| m.role == "tool") {
        let name = context
            .iter()
            .rev()
            .flat_map(|m| m.tool_calls.iter())
            .find(|c| Some(c.id.as_str()) == tool.tool_call_id.as_deref())
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "the tool".into());
        return words(&format!("{name} returned {}", tool.content), tokens.max(1));
    }
    let user = context.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str()).unwrap_or("");
    if let Some(rest) = user.trim().strip_prefix("/tool ") {
        let (name, args) = rest.trim().split_once(char::is_whitespace).unwrap_or((rest.trim(), "{}"));
        let args: Value = serde_json::from_str(args.trim()).unwrap_or_else(|_| Value::String(args.trim().to_owned()));
        return vec![Chunk::ToolCall(ToolCall { id: format!("{step_id}.call1"), name: name.to_owned(), args })];
    }
    let seed = if user.is_empty() { "hello" } else { user };
    words(&format!("You said: {seed}."), tokens)
}

/// `n` tokens that start with `text`'s words and continue with numbered filler.
fn words(text: &str, n: usize) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = text.split_whitespace().take(n).map(|w| Chunk::Text(format!("{w} "))).collect();
    let mut i = 0;
    while out.len() < n {
        i += 1;
        out.push(Chunk::Text(format!("token{i} ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ContextMessage {
        ContextMessage { role: role.into(), content: content.into(), tool_call_id: None, tool_calls: vec![] }
    }

    #[test]
    fn answers_with_the_configured_number_of_tokens() {
        let plan = plan(&[msg("user", "hi there")], "r1.s1", 24);
        assert_eq!(plan.len(), 24);
        assert_eq!(plan[0], Chunk::Text("You ".into()));
    }

    #[test]
    fn tool_round_trip() {
        let first = plan(&[msg("user", r#"/tool echo {"x": 1}"#)], "r1.s1", 24);
        let Chunk::ToolCall(call) = &first[0] else { panic!("{first:?}") };
        assert_eq!((call.name.as_str(), call.args.clone()), ("echo", serde_json::json!({"x": 1})));
        let mut assistant = msg("assistant", "");
        assistant.tool_calls = vec![call.clone()];
        let mut tool = msg("tool", r#"{"x":1}"#);
        tool.tool_call_id = Some(call.id.clone());
        let second = plan(&[msg("user", "/tool echo {}"), assistant, tool], "r1.s2", 4);
        assert_eq!(second[0], Chunk::Text("echo ".into()));
    }
}

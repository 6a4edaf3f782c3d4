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

/// The chunks of a scripted answer, made as they are streamed: an answer
/// of 100 000 tokens costs no more memory than one of 24 (a thousand such
/// streams made up front took seconds of CPU and gigabytes in the abort
/// storm of `convctl bench`).
pub type Plan = Box<dyn Iterator<Item = Chunk> + Send>;

/// What the scripted model does for a context: the chunks of its answer.
pub fn plan(context: &[ContextMessage], step_id: &str, tokens: usize) -> Plan {
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
        let call = ToolCall { id: format!("{step_id}.call1"), name: name.to_owned(), args };
        return Box::new(std::iter::once(Chunk::ToolCall(call)));
    }
    let seed = if user.is_empty() { "hello" } else { user };
    words(&format!("You said: {seed}."), tokens)
}

/// `n` tokens that start with `text`'s words and continue with numbered filler.
fn words(text: &str, n: usize) -> Plan {
    let text: Vec<Chunk> = text.split_whitespace().take(n).map(|w| Chunk::Text(format!("{w} "))).collect();
    let filler = (1..).map(|i| Chunk::Text(format!("token{i} ")));
    Box::new(text.into_iter().chain(filler).take(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ContextMessage {
        ContextMessage { role: role.into(), content: content.into(), tool_call_id: None, tool_calls: vec![] }
    }

    #[test]
    fn answers_with_the_configured_number_of_tokens() {
        let plan: Vec<Chunk> = plan(&[msg("user", "hi there")], "r1.s1", 24).collect();
        assert_eq!(plan.len(), 24);
        assert_eq!(plan[0], Chunk::Text("You ".into()));
        assert_eq!(plan[3], Chunk::Text("there. ".into()));
        assert_eq!(plan[4], Chunk::Text("token1 ".into()), "the words, then numbered filler");
        assert_eq!(plan[23], Chunk::Text("token20 ".into()));
        let short: Vec<Chunk> = super::plan(&[msg("user", "one two three")], "r1.s1", 2).collect();
        assert_eq!(short, [Chunk::Text("You ".into()), Chunk::Text("said: ".into())]);
    }

    #[test]
    fn tool_round_trip() {
        let first: Vec<Chunk> = plan(&[msg("user", r#"/tool echo {"x": 1}"#)], "r1.s1", 24).collect();
        let Chunk::ToolCall(call) = &first[0] else { panic!("{first:?}") };
        assert_eq!((call.name.as_str(), call.args.clone()), ("echo", serde_json::json!({"x": 1})));
        let mut assistant = msg("assistant", "");
        assistant.tool_calls = vec![call.clone()];
        let mut tool = msg("tool", r#"{"x":1}"#);
        tool.tool_call_id = Some(call.id.clone());
        let second: Vec<Chunk> = plan(&[msg("user", "/tool echo {}"), assistant, tool], "r1.s2", 4).collect();
        assert_eq!(second[0], Chunk::Text("echo ".into()));
    }
}

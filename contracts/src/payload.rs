//! Payload (`data`) types, one per event type.
//!
//! Readers ignore fields they do not know, so adding an optional field is a
//! compatible change (see [`crate::version`]). Required fields are checked by
//! serde (presence, JSON type) and by [`Payload::check`] (non-empty strings and
//! similar rules serde cannot express).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::EventType;

/// Who wrote a user-side message. The contract admits only `user` today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    User,
}

/// Role of a timeline entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryRole {
    User,
    Assistant,
    Tool,
    System,
}

/// Final status of a timeline entry (`streaming` is the state before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryStatus {
    Streaming,
    Completed,
    Stopped,
    Aborted,
    Failed,
}

/// Status of a conversation's current run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Idle,
    Running,
    Stopped,
    Aborted,
    Failed,
}

/// How in-flight effects are canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelMode {
    /// Cancel everything; the run ends `aborted`.
    Abort,
    /// Stop generation; the partial answer is kept and the run ends `stopped`.
    Stop,
}

/// Outcome of a tool call as shown to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolOutcome {
    Completed,
    Failed,
    Canceled,
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub args: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageReceived {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<MessageRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AbortRequested {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StopRequested {}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RetryRequested {}

/// What a new message does while a run is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusyPolicy {
    /// Queue it; a new run starts when the current one ends (default).
    #[default]
    Enqueue,
    /// Stop the current run (partial answer kept) and start a new one.
    Interrupt,
    /// Refuse it: it is recorded as a failed entry.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySet {
    pub on_message_while_running: BusyPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolStarted {
    pub tool_call_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolProgress {
    pub tool_call_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCompleted {
    pub tool_call_id: String,
    #[serde(default)]
    pub result: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolFailed {
    pub tool_call_id: String,
    pub error: String,
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCanceled {
    pub tool_call_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmStarted {
    pub step_id: String,
    #[serde(default = "one")]
    pub attempt: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmDelta {
    pub step_id: String,
    /// Which attempt of the step produced this (retries start a new attempt);
    /// lets the reducer drop output of an attempt it already gave up on.
    #[serde(default = "one")]
    pub attempt: u32,
    /// Position of this delta within the step, from 0; lets readers drop repeats.
    pub seq: u64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmCompleted {
    pub step_id: String,
    /// Which attempt of the step produced this (retries start a new attempt);
    /// lets the reducer drop output of an attempt it already gave up on.
    #[serde(default = "one")]
    pub attempt: u32,
    /// The whole answer text of the step: exactly the step's deltas joined.
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmFailed {
    pub step_id: String,
    /// Which attempt of the step produced this (retries start a new attempt);
    /// lets the reducer drop output of an attempt it already gave up on.
    #[serde(default = "one")]
    pub attempt: u32,
    pub error: String,
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmCanceled {
    pub step_id: String,
    /// Which attempt of the step produced this (retries start a new attempt);
    /// lets the reducer drop output of an attempt it already gave up on.
    #[serde(default = "one")]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerFired {
    pub timer_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmRequested {
    pub run_id: String,
    pub step_id: String,
    #[serde(default = "one")]
    pub attempt: u32,
    /// The timeline entry this step streams into (live-lane deltas name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    /// The model's context, by reference: the LLM-context projection of the
    /// conversation's first `entries` entries, as the runtime stored them
    /// (`conv-store`) before it published this directive. Effects read it
    /// (newest first, as much as the provider's window holds); nothing of
    /// the history travels in the directive, whatever its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_ref: Option<ContextRef>,
    /// The context inline: only in directives journaled before
    /// `context_ref` existed (never emitted now; effects still read it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<ContextMessage>,
}

/// Where an LLM step's context is: entries `0..entries` of the conversation
/// at state `version` (the number of inputs applied when it was requested).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextRef {
    pub entries: u64,
    pub version: u64,
}

/// The effect id of one attempt of an LLM step (what a cancel names):
/// `<step_id>.a<attempt>`, which is also the id of the timeline entry the
/// attempt streams into.
pub fn llm_effect_id(step_id: &str, attempt: u32) -> String {
    format!("{step_id}.a{attempt}")
}

/// One message of the model's context, in the provider's role/content form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// For `tool` messages: the call answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `assistant` messages: the tools it asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolRequested {
    pub run_id: String,
    pub step_id: String,
    pub tool_call_id: String,
    pub name: String,
    #[serde(default)]
    pub args: Value,
}

/// The tool name that schedules a timer (`{"ms": n}`): the runtime answers
/// the call itself and emits `conv.effect.timer.scheduled`.
pub const TIMER_TOOL: &str = "timer";

/// The longest delay a `sleep` or `timer` tool call may ask for: 24 hours.
pub const MAX_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerScheduled {
    pub timer_id: String,
    /// Delay from the moment the directive is executed; the reducer has no clock.
    pub delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerCancelRequested {
    pub timer_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequested {
    pub mode: CancelMode,
    /// Ids of the effects to cancel: LLM step attempts ([`llm_effect_id`];
    /// a retry of the same step is a new attempt, never hit by an earlier
    /// cancel) and tool call ids.
    pub effect_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// `id` of the applied input (also this marker's `causationid`).
    pub input_id: String,
    pub input_type: String,
    /// Stream sequence of the input in `CONV_IN`.
    pub input_seq: u64,
    /// Position of this input in the conversation's applied order, from 1.
    pub applied_index: u64,
    pub state_version: u64,
    pub state_hash: String,
    /// The reducer rules the conversation runs under (`conv_core::state::RULES`;
    /// absent in markers of versions before rules existed: 1). A replay
    /// from scratch starts with the rules of the first marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutMessageAppended {
    pub entry_id: String,
    pub role: EntryRole,
    #[serde(default)]
    pub text: String,
    pub status: EntryStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutMessageDelta {
    pub entry_id: String,
    pub seq: u64,
    pub text: String,
    /// Byte offset of `text` within the entry's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Tells a stream reader to cut an entry's text back to `offset` bytes: the
/// live text it had beyond that point was not what the model's final answer
/// says (an effects worker died mid-reply and the answer was resumed).
/// Only on the client stream (SSE), never journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutMessageReset {
    pub entry_id: String,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutMessageFinished {
    pub entry_id: String,
    pub status: EntryStatus,
    /// The entry's final text.
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutRunStatus {
    pub run_id: String,
    pub status: RunStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutToolCalled {
    pub tool_call_id: String,
    pub name: String,
    #[serde(default)]
    pub args: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutToolResult {
    pub tool_call_id: String,
    pub outcome: ToolOutcome,
    #[serde(default)]
    pub result: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqRedriven {
    /// Sequence of the dead letter in `CONV_DLQ`.
    pub dlq_seq: u64,
    pub original_stream: String,
    pub original_seq: u64,
    pub original_subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_event_id: Option<String>,
    /// The fresh `Nats-Msg-Id` the original was republished with.
    pub redrive_msg_id: String,
}

macro_rules! payloads {
    ($($variant:ident),+ $(,)?) => {
        /// Typed `data` of an event; the variant determines the event type, so
        /// type and data can never disagree.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Payload {
            $($variant($variant),)+
        }

        impl Payload {
            pub fn event_type(&self) -> EventType {
                match self { $(Payload::$variant(_) => EventType::$variant,)+ }
            }

            /// Decodes the JSON `data` of an event of type `ty`.
            pub fn from_json(ty: EventType, data: Value) -> Result<Payload, PayloadError> {
                let payload = match ty {
                    $(EventType::$variant => Payload::$variant(serde_json::from_value(data)?),)+
                };
                payload.check()?;
                Ok(payload)
            }

            /// The JSON `data` of this payload.
            pub fn to_json(&self) -> Value {
                let encoded = match self {
                    $(Payload::$variant(p) => serde_json::to_value(p),)+
                };
                // Serializing these plain structs (string keys, no floats) cannot fail.
                encoded.unwrap_or(Value::Null)
            }
        }

        $(impl From<$variant> for Payload {
            fn from(p: $variant) -> Payload { Payload::$variant(p) }
        })+
    };
}

payloads! {
    MessageReceived, AbortRequested, StopRequested, RetryRequested, PolicySet,
    ToolStarted, ToolProgress, ToolCompleted, ToolFailed, ToolCanceled,
    LlmStarted, LlmDelta, LlmCompleted, LlmFailed, LlmCanceled, TimerFired,
    LlmRequested, ToolRequested, TimerScheduled, TimerCancelRequested, CancelRequested,
    Applied,
    OutMessageAppended, OutMessageDelta, OutMessageReset, OutMessageFinished, OutRunStatus, OutToolCalled, OutToolResult,
    DlqRedriven,
}

/// Why `data` is not the payload of its type.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not the shape of the type (a missing or mistyped field).
    #[error("{0}")]
    Shape(#[from] serde_json::Error),
    /// A rule serde cannot express.
    #[error(transparent)]
    Invalid(#[from] crate::Invalid),
}

fn non_empty(field: &str, value: &str) -> Result<(), crate::Invalid> {
    if value.trim().is_empty() { Err(format!("field `{field}` must not be empty").into()) } else { Ok(()) }
}

impl Payload {
    /// Rules serde cannot express. Returns a message naming the field.
    pub fn check(&self) -> Result<(), crate::Invalid> {
        match self {
            Payload::MessageReceived(p) => non_empty("text", &p.text),
            Payload::AbortRequested(_)
            | Payload::StopRequested(_)
            | Payload::RetryRequested(_)
            | Payload::PolicySet(_) => Ok(()),
            Payload::ToolStarted(ToolStarted { tool_call_id })
            | Payload::ToolProgress(ToolProgress { tool_call_id, .. })
            | Payload::ToolCompleted(ToolCompleted { tool_call_id, .. })
            | Payload::ToolCanceled(ToolCanceled { tool_call_id, .. })
            | Payload::OutToolResult(OutToolResult { tool_call_id, .. }) => non_empty("tool_call_id", tool_call_id),
            Payload::ToolFailed(p) => non_empty("tool_call_id", &p.tool_call_id).and(non_empty("error", &p.error)),
            Payload::LlmStarted(LlmStarted { step_id, .. })
            | Payload::LlmCanceled(LlmCanceled { step_id, .. })
            | Payload::LlmDelta(LlmDelta { step_id, .. }) => non_empty("step_id", step_id),
            Payload::LlmCompleted(p) => {
                non_empty("step_id", &p.step_id)?;
                for call in &p.tool_calls {
                    non_empty("tool_calls[].id", &call.id)?;
                    non_empty("tool_calls[].name", &call.name)?;
                }
                Ok(())
            }
            Payload::LlmFailed(p) => non_empty("step_id", &p.step_id).and(non_empty("error", &p.error)),
            Payload::TimerFired(TimerFired { timer_id })
            | Payload::TimerScheduled(TimerScheduled { timer_id, .. })
            | Payload::TimerCancelRequested(TimerCancelRequested { timer_id }) => non_empty("timer_id", timer_id),
            Payload::LlmRequested(p) => non_empty("run_id", &p.run_id).and(non_empty("step_id", &p.step_id)),
            Payload::ToolRequested(p) => non_empty("run_id", &p.run_id)
                .and(non_empty("step_id", &p.step_id))
                .and(non_empty("tool_call_id", &p.tool_call_id))
                .and(non_empty("name", &p.name)),
            Payload::CancelRequested(_) => Ok(()),
            Payload::Applied(p) => non_empty("input_id", &p.input_id)
                .and(non_empty("input_type", &p.input_type))
                .and(non_empty("state_hash", &p.state_hash)),
            Payload::OutMessageAppended(OutMessageAppended { entry_id, .. })
            | Payload::OutMessageDelta(OutMessageDelta { entry_id, .. })
            | Payload::OutMessageReset(OutMessageReset { entry_id, .. })
            | Payload::OutMessageFinished(OutMessageFinished { entry_id, .. }) => non_empty("entry_id", entry_id),
            Payload::OutRunStatus(p) => non_empty("run_id", &p.run_id),
            Payload::OutToolCalled(p) => non_empty("tool_call_id", &p.tool_call_id).and(non_empty("name", &p.name)),
            Payload::DlqRedriven(p) => non_empty("original_stream", &p.original_stream)
                .and(non_empty("original_subject", &p.original_subject))
                .and(non_empty("redrive_msg_id", &p.redrive_msg_id)),
        }
    }
}

impl Payload {
    /// A key that names this event uniquely within its conversation when the
    /// payload itself identifies it (a tool call's completion, a delta's
    /// position in a step attempt, a timer firing), so producers that retry
    /// derive the same event id and JetStream dedupes the repeat. `None` for
    /// events that are distinct each time they are sent (messages, progress).
    pub fn natural_key(&self) -> Option<String> {
        Some(match self {
            Payload::ToolStarted(p) => format!("tool.{}.started", p.tool_call_id),
            Payload::ToolCompleted(p) => format!("tool.{}.completed", p.tool_call_id),
            Payload::ToolFailed(p) => format!("tool.{}.failed", p.tool_call_id),
            Payload::ToolCanceled(p) => format!("tool.{}.canceled", p.tool_call_id),
            Payload::LlmStarted(p) => format!("llm.{}.{}.started", p.step_id, p.attempt),
            Payload::LlmDelta(p) => format!("llm.{}.{}.delta.{}", p.step_id, p.attempt, p.seq),
            Payload::LlmCompleted(p) => format!("llm.{}.{}.completed", p.step_id, p.attempt),
            Payload::LlmFailed(p) => format!("llm.{}.{}.failed", p.step_id, p.attempt),
            Payload::LlmCanceled(p) => format!("llm.{}.{}.canceled", p.step_id, p.attempt),
            Payload::TimerFired(p) => format!("timer.{}.fired", p.timer_id),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_needs_text() {
        let err = Payload::from_json(EventType::MessageReceived, json!({})).unwrap_err();
        assert!(err.to_string().contains("text"), "{err}");
        let err = Payload::from_json(EventType::MessageReceived, json!({"text": "  "})).unwrap_err();
        assert!(err.to_string().contains("text"), "{err}");
        let err = Payload::from_json(EventType::MessageReceived, json!({"text": 5})).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        let err =
            Payload::from_json(EventType::MessageReceived, json!({"text": "hi", "role": "assistant"})).unwrap_err();
        assert!(err.to_string().contains("assistant"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let p = Payload::from_json(EventType::MessageReceived, json!({"text": "hi", "v2_field": [1, 2]}));
        assert_eq!(
            p.ok(),
            Some(Payload::MessageReceived(MessageReceived {
                text: "hi".into(),
                role: None,
                channel: None,
                sender: None
            }))
        );
    }

    #[test]
    fn empty_control_payloads() {
        assert!(Payload::from_json(EventType::StopRequested, json!({})).is_ok());
        assert!(Payload::from_json(EventType::AbortRequested, json!({"reason": "user"})).is_ok());
        assert_eq!(Payload::from(StopRequested {}).to_json(), json!({}));
    }
}

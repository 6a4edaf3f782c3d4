//! The type taxonomy: every event type conv knows, its family, stream and priority.
//!
//! A type is `conv.<kind>.<family>.<name>`; its NATS subject is
//! `conv.<kind>.<family>.<conversation_id>` (see [`crate::subject`]).

use std::fmt;
use std::str::FromStr;

/// Scheduling class of an event type.
///
/// `P0` control-plane interrupts, `P1` state-critical, `P2` state-informative,
/// `P3` high-volume low-criticality. Lower number = more urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    P0,
    P1,
    P2,
    P3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::P0, Priority::P1, Priority::P2, Priority::P3];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::P0 => "P0",
            Priority::P1 => "P1",
            Priority::P2 => "P2",
            Priority::P3 => "P3",
        }
    }

    /// 0 for P0 … 3 for P3.
    pub fn rank(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The second token of a type and subject: which journal stream holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `conv.in.*` → stream `CONV_IN`: everything that enters a conversation.
    In,
    /// `conv.effect.*` → `CONV_EFFECT`: directives for effect workers.
    Effect,
    /// `conv.applied.*` → `CONV_APPLIED`: one marker per applied input.
    Applied,
    /// `conv.out.*` → `CONV_OUT`: what clients and channels see.
    Out,
    /// `conv.audit.*` → `CONV_AUDIT`: operator actions.
    Audit,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::In, Kind::Effect, Kind::Applied, Kind::Out, Kind::Audit];

    pub fn token(self) -> &'static str {
        match self {
            Kind::In => "in",
            Kind::Effect => "effect",
            Kind::Applied => "applied",
            Kind::Out => "out",
            Kind::Audit => "audit",
        }
    }

    pub fn from_token(token: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.token() == token)
    }

    /// The pinned JetStream stream name that journals this kind.
    pub fn stream(self) -> &'static str {
        match self {
            Kind::In => crate::subject::STREAM_IN,
            Kind::Effect => crate::subject::STREAM_EFFECT,
            Kind::Applied => crate::subject::STREAM_APPLIED,
            Kind::Out => crate::subject::STREAM_OUT,
            Kind::Audit => crate::subject::STREAM_AUDIT,
        }
    }
}

macro_rules! event_types {
    ($( $(#[$doc:meta])* $variant:ident => ($name:literal, $kind:ident, $family:literal, $prio:ident) ),+ $(,)?) => {
        /// Every event type of the contract.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $( $(#[$doc])* $variant, )+
        }

        impl EventType {
            /// All types, in declaration order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant),+];

            /// The CloudEvents `type` string.
            pub fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $name,)+ }
            }

            pub fn kind(self) -> Kind {
                match self { $(EventType::$variant => Kind::$kind,)+ }
            }

            /// Third token of the type: the family (`message`, `control`, `llm`, …).
            pub fn family(self) -> &'static str {
                match self { $(EventType::$variant => $family,)+ }
            }

            pub fn priority(self) -> Priority {
                match self { $(EventType::$variant => Priority::$prio,)+ }
            }
        }
    };
}

event_types! {
    // ---- conv.in: inputs to a conversation (CONV_IN) ----
    /// A user or channel message.
    MessageReceived => ("conv.in.message.received", In, "message", P1),
    /// Cancel all in-flight work of the conversation.
    AbortRequested => ("conv.in.control.abort_requested", In, "control", P0),
    /// Stop generation, keep the partial answer.
    StopRequested => ("conv.in.control.stop_requested", In, "control", P0),
    /// Re-run the last failed or stopped step.
    RetryRequested => ("conv.in.control.retry_requested", In, "control", P1),
    /// Sets what a new message does while a run is active.
    PolicySet => ("conv.in.control.policy_set", In, "control", P1),
    ToolStarted => ("conv.in.tool.started", In, "tool", P2),
    ToolProgress => ("conv.in.tool.progress", In, "tool", P3),
    ToolCompleted => ("conv.in.tool.completed", In, "tool", P1),
    ToolFailed => ("conv.in.tool.failed", In, "tool", P1),
    ToolCanceled => ("conv.in.tool.canceled", In, "tool", P1),
    LlmStarted => ("conv.in.llm.started", In, "llm", P2),
    /// Coalesced token deltas of a streaming reply.
    LlmDelta => ("conv.in.llm.delta", In, "llm", P3),
    LlmCompleted => ("conv.in.llm.completed", In, "llm", P1),
    LlmFailed => ("conv.in.llm.failed", In, "llm", P1),
    LlmCanceled => ("conv.in.llm.canceled", In, "llm", P1),
    TimerFired => ("conv.in.timer.fired", In, "timer", P2),

    // ---- conv.effect: directives emitted by the reducer (CONV_EFFECT) ----
    LlmRequested => ("conv.effect.llm.requested", Effect, "llm", P1),
    ToolRequested => ("conv.effect.tool.requested", Effect, "tool", P1),
    TimerScheduled => ("conv.effect.timer.scheduled", Effect, "timer", P2),
    TimerCancelRequested => ("conv.effect.timer.cancel_requested", Effect, "timer", P0),
    /// Cancel in-flight effects (abort or stop).
    CancelRequested => ("conv.effect.cancel.requested", Effect, "cancel", P0),

    // ---- conv.applied: what the runtime applied, in order (CONV_APPLIED) ----
    Applied => ("conv.applied.marker.recorded", Applied, "marker", P1),

    // ---- conv.out: the client-facing output (CONV_OUT) ----
    OutMessageAppended => ("conv.out.message.appended", Out, "message", P1),
    OutMessageDelta => ("conv.out.message.delta", Out, "message", P3),
    /// Client stream only (never journaled): cut an entry's live text back.
    OutMessageReset => ("conv.out.message.reset", Out, "message", P3),
    OutMessageFinished => ("conv.out.message.finished", Out, "message", P1),
    OutRunStatus => ("conv.out.run.status_changed", Out, "run", P1),
    OutToolCalled => ("conv.out.tool.called", Out, "tool", P2),
    OutToolResult => ("conv.out.tool.result", Out, "tool", P2),

    // ---- conv.audit: operator actions (CONV_AUDIT) ----
    DlqRedriven => ("conv.audit.dlq.redriven", Audit, "dlq", P2),
}

/// A `type` string that names no known event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownType(pub String);

impl FromStr for EventType {
    type Err = UnknownType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL.iter().copied().find(|t| t.as_str() == s).ok_or_else(|| UnknownType(s.to_owned()))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_taxonomy() {
        for t in EventType::ALL {
            let tokens: Vec<&str> = t.as_str().split('.').collect();
            assert_eq!(tokens.len(), 4, "{t}");
            assert_eq!(tokens[0], "conv");
            assert_eq!(tokens[1], t.kind().token(), "{t}");
            assert_eq!(tokens[2], t.family(), "{t}");
            assert_eq!(t.as_str().parse::<EventType>(), Ok(*t));
        }
    }

    #[test]
    fn pinned_priorities() {
        assert_eq!(EventType::AbortRequested.priority(), Priority::P0);
        assert_eq!(EventType::StopRequested.priority(), Priority::P0);
        assert_eq!(EventType::MessageReceived.priority(), Priority::P1);
        assert_eq!(EventType::RetryRequested.priority(), Priority::P1);
        assert_eq!(EventType::ToolCompleted.priority(), Priority::P1);
        assert_eq!(EventType::ToolFailed.priority(), Priority::P1);
        assert_eq!(EventType::TimerFired.priority(), Priority::P2);
        assert_eq!(EventType::LlmDelta.priority(), Priority::P3);
        assert!(Priority::P0 < Priority::P3);
    }

    #[test]
    fn unknown_types_are_refused() {
        assert_eq!("conv.in.message.nope".parse::<EventType>(), Err(UnknownType("conv.in.message.nope".into())));
    }
}

//! The pure reducer: `apply(&mut state, event) -> emitted`, in place: the
//! cost of an input does not depend on the length of the conversation.
//!
//! No clock, no randomness, no I/O. Every id it makes comes from its input:
//! run ids from a counter in the state, emitted event ids from the input id
//! and the position in the output ([`conv_contracts::id::derived_id`]), emitted `time` is the
//! input's. The same journal in the same applied order therefore always
//! gives the same states, the same hashes and the same emitted events.
//!
//! Semantics:
//! * a message starts a run (an LLM step) when idle; while a run is active it
//!   is queued (`enqueue`, default), interrupts the run (`interrupt`) or is
//!   recorded as failed (`reject`), per `conv.in.control.policy_set`;
//! * LLM deltas stream into the step's assistant entry; `completed` carries the
//!   whole text and may ask for tools; when every tool of the step has a
//!   result the next step starts;
//! * **abort** cancels every in-flight effect (LLM steps, tools, timers), marks
//!   the streaming entry `aborted` with its partial text, gives every open tool
//!   call a canceled result (the transcript never has a dangling call) and the
//!   run ends `aborted`;
//! * **stop** does the same for generation but the run ends `stopped` and can be
//!   retried; **retry** re-runs the last failed or stopped step as a new attempt.
//! * Output of a step or tool that is no longer in flight (a late delta after
//!   an abort, an old attempt) is ignored.

use conv_contracts::payload::*;
use conv_contracts::{Envelope, Payload};
use serde_json::{Value, json};

use crate::state::{Entry, LlmStep, RetryPoint, Run, State, ToolInFlight};

/// The tool name that schedules a timer (`{"ms": n}`) instead of calling a tool.
pub use conv_contracts::payload::TIMER_TOOL;

/// CloudEvents `source` of everything the runtime emits.
pub const SOURCE: &str = "/conv/runtime";

/// The result of applying one input (the state is changed in place).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Directives (`conv.effect.*`) and output (`conv.out.*`), in order.
    pub emitted: Vec<Envelope>,
    /// The input was applied before (same id): nothing changed.
    pub duplicate: bool,
}

struct Ctx<'a> {
    input: &'a Envelope,
    out: Vec<Envelope>,
}

impl Ctx<'_> {
    fn emit(&mut self, state: &mut State, data: impl Into<Payload>) {
        let data = data.into();
        let position = match data.event_type().kind() {
            conv_contracts::Kind::Out => {
                state.pointers.outputs += 1;
                Some(state.pointers.outputs)
            }
            _ => {
                state.pointers.directives += 1;
                None
            }
        };
        let mut event = Envelope::derived(self.input, self.out.len(), SOURCE, data);
        // Output carries its position in the conversation's output, so views
        // fold it in this order whatever order they receive it in.
        if let Some(p) = position {
            event = event.with_position(p);
        }
        self.out.push(event);
    }
}

/// Applies one input event to the state, in place. A repeat (an input id
/// among the recent ones) changes nothing.
pub fn apply(state: &mut State, input: &Envelope) -> Applied {
    if state.has_applied(input.id()) {
        return Applied { emitted: Vec::new(), duplicate: true };
    }
    let s = state;
    s.version += 1;
    s.remember(input.id());
    let mut cx = Ctx { input, out: Vec::new() };
    match input.data() {
        Payload::MessageReceived(m) => message(s, &mut cx, m),
        Payload::AbortRequested(a) => end_run(s, &mut cx, CancelMode::Abort, a.reason.clone()),
        Payload::StopRequested(_) => end_run(s, &mut cx, CancelMode::Stop, None),
        Payload::RetryRequested(_) => retry(s, &mut cx),
        Payload::PolicySet(p) => s.policy = p.on_message_while_running,
        Payload::LlmDelta(d) => delta(s, &mut cx, d),
        Payload::LlmCompleted(c) => completed(s, &mut cx, c),
        Payload::LlmFailed(f) => step_failed(s, &mut cx, &f.step_id, f.attempt, &f.error),
        Payload::LlmCanceled(c) => step_failed(s, &mut cx, &c.step_id, c.attempt, "canceled by the provider side"),
        Payload::ToolCompleted(t) => tool_result(s, &mut cx, &t.tool_call_id, ToolOutcome::Completed, t.result.clone()),
        Payload::ToolFailed(t) => {
            tool_result(s, &mut cx, &t.tool_call_id, ToolOutcome::Failed, json!({"error": t.error}))
        }
        Payload::ToolCanceled(t) => tool_result(
            s,
            &mut cx,
            &t.tool_call_id,
            ToolOutcome::Canceled,
            json!({"canceled": true, "reason": t.reason}),
        ),
        Payload::TimerFired(t) => timer_fired(s, &mut cx, &t.timer_id),
        // Informative inputs: recorded (version, dedupe) but change nothing else.
        Payload::LlmStarted(_) | Payload::ToolStarted(_) | Payload::ToolProgress(_) => {}
        // Not inputs: ingress and validation keep these out of CONV_IN.
        _ => {}
    }
    s.extend_chain(input.id(), input.event_type().as_str(), &cx.out);
    Applied { emitted: cx.out, duplicate: false }
}

fn message(s: &mut State, cx: &mut Ctx<'_>, m: &MessageReceived) {
    s.user_entries += 1;
    let entry_id = match s.rules {
        1 => format!("u{}", s.version),
        _ => format!("u{}", s.user_entries),
    };
    s.push_entry(Entry {
        id: entry_id.clone(),
        role: EntryRole::User,
        text: m.text.clone(),
        status: EntryStatus::Completed,
        tool_call_id: None,
        tool_calls: Vec::new(),
    });
    if s.run_status != RunStatus::Running {
        cx.emit(s, appended(&entry_id, EntryRole::User, &m.text, EntryStatus::Completed));
        start_run(s, cx);
        return;
    }
    match s.policy {
        BusyPolicy::Enqueue => {
            cx.emit(s, appended(&entry_id, EntryRole::User, &m.text, EntryStatus::Completed));
            s.queued.push(entry_id);
        }
        BusyPolicy::Interrupt => {
            cx.emit(s, appended(&entry_id, EntryRole::User, &m.text, EntryStatus::Completed));
            end_run(s, cx, CancelMode::Stop, Some("interrupted by a new message".into()));
            s.retry = None;
            start_run(s, cx);
        }
        BusyPolicy::Reject => {
            if let Some(e) = s.entry_mut(&entry_id) {
                e.status = EntryStatus::Failed;
            }
            cx.emit(s, appended(&entry_id, EntryRole::User, &m.text, EntryStatus::Failed));
        }
    }
}

/// A timer this conversation scheduled fired: say so, and let the model
/// react (now if idle, after the current run otherwise). Unknown or canceled
/// timers are ignored.
fn timer_fired(s: &mut State, cx: &mut Ctx<'_>, timer_id: &str) {
    if s.timers.remove(timer_id).is_none() {
        return;
    }
    let entry_id = format!("timer.{timer_id}");
    let text = format!("timer {timer_id} fired");
    s.push_entry(Entry {
        id: entry_id.clone(),
        role: EntryRole::System,
        text: text.clone(),
        status: EntryStatus::Completed,
        tool_call_id: None,
        tool_calls: Vec::new(),
    });
    cx.emit(s, appended(&entry_id, EntryRole::System, &text, EntryStatus::Completed));
    if s.run_status == RunStatus::Running {
        s.queued.push(entry_id);
    } else {
        start_run(s, cx);
    }
}

fn appended(entry_id: &str, role: EntryRole, text: &str, status: EntryStatus) -> OutMessageAppended {
    OutMessageAppended { entry_id: entry_id.to_owned(), role, text: text.to_owned(), status }
}

fn start_run(s: &mut State, cx: &mut Ctx<'_>) {
    s.runs += 1;
    let run_id = format!("r{}", s.runs);
    s.run = Some(Run { run_id: run_id.clone(), step_no: 0 });
    s.run_status = RunStatus::Running;
    s.queued.clear();
    s.retry = None;
    cx.emit(s, OutRunStatus { run_id, status: RunStatus::Running });
    start_step(s, cx, 1);
}

/// Starts step `step_no + 1` (attempt 1) or, for a retry, the same step again.
fn start_step(s: &mut State, cx: &mut Ctx<'_>, attempt: u32) {
    let Some(run) = s.run.as_mut() else { return };
    if attempt == 1 {
        run.step_no += 1;
    }
    let run_id = run.run_id.clone();
    let step_id = format!("{run_id}.s{}", run.step_no);
    let entry_id = llm_effect_id(&step_id, attempt);
    s.push_entry(Entry {
        id: entry_id.clone(),
        role: EntryRole::Assistant,
        text: String::new(),
        status: EntryStatus::Streaming,
        tool_call_id: None,
        tool_calls: Vec::new(),
    });
    s.llm.insert(step_id.clone(), LlmStep { run_id: run_id.clone(), attempt, entry_id: entry_id.clone(), next_seq: 0 });
    // By reference: the entries before the one this step streams into.
    let context_ref = Some(ContextRef { entries: (s.entries.len() - 1) as u64, version: s.version });
    cx.emit(
        s,
        LlmRequested { run_id, step_id, attempt, entry_id: Some(entry_id.clone()), context_ref, context: Vec::new() },
    );
    cx.emit(s, appended(&entry_id, EntryRole::Assistant, "", EntryStatus::Streaming));
}

fn in_flight(s: &State, step_id: &str, attempt: u32) -> Option<LlmStep> {
    s.llm.get(step_id).filter(|st| st.attempt == attempt).cloned()
}

fn delta(s: &mut State, cx: &mut Ctx<'_>, d: &LlmDelta) {
    let Some(step) = in_flight(s, &d.step_id, d.attempt) else { return };
    if d.seq < step.next_seq {
        return; // a repeat
    }
    if let Some(st) = s.llm.get_mut(&d.step_id) {
        st.next_seq = d.seq + 1;
    }
    let mut offset = 0;
    if let Some(e) = s.entry_mut(&step.entry_id) {
        offset = e.text.len() as u64;
        e.text.push_str(&d.text);
    }
    cx.emit(s, OutMessageDelta { entry_id: step.entry_id, seq: d.seq, text: d.text.clone(), offset: Some(offset) });
}

fn completed(s: &mut State, cx: &mut Ctx<'_>, c: &LlmCompleted) {
    let Some(step) = in_flight(s, &c.step_id, c.attempt) else { return };
    s.llm.remove(&c.step_id);
    let text = match s.entry_mut(&step.entry_id) {
        Some(e) => {
            if !c.text.is_empty() {
                e.text = c.text.clone();
            }
            e.status = EntryStatus::Completed;
            e.tool_calls = c.tool_calls.clone();
            e.text.clone()
        }
        None => c.text.clone(),
    };
    cx.emit(s, OutMessageFinished { entry_id: step.entry_id.clone(), status: EntryStatus::Completed, text });
    if c.tool_calls.is_empty() {
        s.run_status = RunStatus::Idle;
        if let Some(run) = &s.run {
            let run_id = run.run_id.clone();
            cx.emit(s, OutRunStatus { run_id, status: RunStatus::Idle });
        }
        if !s.queued.is_empty() {
            start_run(s, cx);
        }
        return;
    }
    let mut timers_only = true;
    for call in &c.tool_calls {
        cx.emit(s, OutToolCalled { tool_call_id: call.id.clone(), name: call.name.clone(), args: call.args.clone() });
        if call.name == TIMER_TOOL {
            // A timer is a directive of its own; the call is answered at once.
            let delay_ms = call.args.get("ms").and_then(Value::as_u64).unwrap_or(1000);
            if delay_ms > MAX_DELAY_MS {
                let error = format!("timer: `ms` must be at most {MAX_DELAY_MS} (24 h), got {delay_ms}");
                record_tool_result(s, cx, &call.id, ToolOutcome::Failed, json!({"error": error}));
                continue;
            }
            s.timers.insert(call.id.clone(), delay_ms);
            cx.emit(s, TimerScheduled { timer_id: call.id.clone(), delay_ms });
            record_tool_result(
                s,
                cx,
                &call.id,
                ToolOutcome::Completed,
                json!({"timer_id": call.id, "scheduled_in_ms": delay_ms}),
            );
            continue;
        }
        timers_only = false;
        s.tools.insert(
            call.id.clone(),
            ToolInFlight {
                run_id: step.run_id.clone(),
                step_id: c.step_id.clone(),
                name: call.name.clone(),
                args: call.args.clone(),
            },
        );
        cx.emit(
            s,
            ToolRequested {
                run_id: step.run_id.clone(),
                step_id: c.step_id.clone(),
                tool_call_id: call.id.clone(),
                name: call.name.clone(),
                args: call.args.clone(),
            },
        );
    }
    if timers_only && s.run_status == RunStatus::Running {
        start_step(s, cx, 1);
    }
}

fn step_failed(s: &mut State, cx: &mut Ctx<'_>, step_id: &str, attempt: u32, error: &str) {
    let Some(step) = in_flight(s, step_id, attempt) else { return };
    s.llm.remove(step_id);
    let text = match s.entry_mut(&step.entry_id) {
        Some(e) => {
            e.status = EntryStatus::Failed;
            e.text.clone()
        }
        None => String::new(),
    };
    cx.emit(s, OutMessageFinished { entry_id: step.entry_id.clone(), status: EntryStatus::Failed, text });
    cancel_tools(s, cx, "the step failed");
    let step_no = s.run.as_ref().map(|r| r.step_no).unwrap_or(1);
    s.retry = Some(RetryPoint { run_id: step.run_id.clone(), step_no, attempt });
    s.run_status = RunStatus::Failed;
    s.queued.clear();
    cx.emit(
        s,
        OutMessageAppended {
            entry_id: format!("{}.error", step.entry_id),
            role: EntryRole::System,
            text: format!("the model call failed: {error}"),
            status: EntryStatus::Failed,
        },
    );
    cx.emit(s, OutRunStatus { run_id: step.run_id, status: RunStatus::Failed });
}

fn tool_result(s: &mut State, cx: &mut Ctx<'_>, tool_call_id: &str, outcome: ToolOutcome, result: Value) {
    let Some(tool) = s.tools.remove(tool_call_id) else { return };
    record_tool_result(s, cx, tool_call_id, outcome, result);
    let step_done = !s.tools.values().any(|t| t.step_id == tool.step_id);
    if step_done && s.run_status == RunStatus::Running {
        start_step(s, cx, 1);
    }
}

fn record_tool_result(s: &mut State, cx: &mut Ctx<'_>, tool_call_id: &str, outcome: ToolOutcome, result: Value) {
    let status = match outcome {
        ToolOutcome::Completed => EntryStatus::Completed,
        ToolOutcome::Failed => EntryStatus::Failed,
        ToolOutcome::Canceled => EntryStatus::Aborted,
    };
    s.push_entry(Entry {
        id: format!("tool.{tool_call_id}"),
        role: EntryRole::Tool,
        text: result.to_string(),
        status,
        tool_call_id: Some(tool_call_id.to_owned()),
        tool_calls: Vec::new(),
    });
    cx.emit(s, OutToolResult { tool_call_id: tool_call_id.to_owned(), outcome, result });
}

/// Every open tool call gets a canceled result, so none is left dangling.
fn cancel_tools(s: &mut State, cx: &mut Ctx<'_>, reason: &str) -> Vec<String> {
    let ids: Vec<String> = s.tools.keys().cloned().collect();
    for id in &ids {
        s.tools.remove(id);
        record_tool_result(s, cx, id, ToolOutcome::Canceled, json!({"canceled": true, "reason": reason}));
    }
    ids
}

/// The effects an abort or stop cancels: every LLM step attempt and tool
/// call in flight.
fn in_flight_effects(s: &State) -> Vec<String> {
    let mut ids: Vec<String> = s.llm.iter().map(|(id, step)| llm_effect_id(id, step.attempt)).collect();
    ids.extend(s.tools.keys().cloned());
    ids
}

/// What applying `input` to `s` will cancel, known before it is applied:
/// for an abort or stop of a running conversation, the mode and the effect
/// ids its `cancel.requested` directive will name (the same computation).
/// The runtime sends this ahead as a cancel hint (`conv_contracts::live`).
pub fn cancel_targets(s: &State, input: &Envelope) -> Option<(CancelMode, Vec<String>)> {
    let mode = cancel_mode(input)?;
    if s.has_applied(input.id()) {
        return None;
    }
    let ids = cancelable(s);
    (!ids.is_empty()).then_some((mode, ids))
}

/// The cancel mode of an abort or stop input; `None` for anything else.
pub fn cancel_mode(input: &Envelope) -> Option<CancelMode> {
    match input.data() {
        Payload::AbortRequested(_) => Some(CancelMode::Abort),
        Payload::StopRequested(_) => Some(CancelMode::Stop),
        _ => None,
    }
}

/// The effect ids an abort or stop applied to `s` now would cancel (empty
/// when no run is in progress): the runtime keeps this per conversation so
/// that a hint needs no state of its own.
pub fn cancelable(s: &State) -> Vec<String> {
    if s.run_status != RunStatus::Running {
        return Vec::new();
    }
    in_flight_effects(s)
}

/// Abort or stop: cancel what is in flight and end the run.
fn end_run(s: &mut State, cx: &mut Ctx<'_>, mode: CancelMode, reason: Option<String>) {
    if mode == CancelMode::Abort {
        // Pending timers are in-flight work too, run or no run.
        let timers: Vec<String> = s.timers.keys().cloned().collect();
        for timer_id in timers {
            s.timers.remove(&timer_id);
            cx.emit(s, TimerCancelRequested { timer_id });
        }
    }
    if s.run_status != RunStatus::Running {
        return;
    }
    let (entry_status, run_status, why) = match mode {
        CancelMode::Abort => (EntryStatus::Aborted, RunStatus::Aborted, "aborted"),
        CancelMode::Stop => (EntryStatus::Stopped, RunStatus::Stopped, "stopped"),
    };
    let effect_ids = in_flight_effects(s);
    if !effect_ids.is_empty() {
        cx.emit(s, CancelRequested { mode, effect_ids, reason: reason.clone() });
    }
    let steps: Vec<(String, LlmStep)> = std::mem::take(&mut s.llm).into_iter().collect();
    let mut retry = None;
    for (_, step) in steps {
        let text = match s.entry_mut(&step.entry_id) {
            Some(e) => {
                e.status = entry_status;
                e.text.clone()
            }
            None => String::new(),
        };
        cx.emit(s, OutMessageFinished { entry_id: step.entry_id.clone(), status: entry_status, text });
        let step_no = s.run.as_ref().map(|r| r.step_no).unwrap_or(1);
        retry = Some(RetryPoint { run_id: step.run_id, step_no, attempt: step.attempt });
    }
    cancel_tools(s, cx, reason.as_deref().unwrap_or(why));
    s.queued.clear();
    s.run_status = run_status;
    // A stopped run can be retried; an aborted one cannot.
    s.retry = if mode == CancelMode::Stop { retry } else { None };
    if let Some(run) = &s.run {
        let run_id = run.run_id.clone();
        cx.emit(s, OutRunStatus { run_id, status: run_status });
    }
}

fn retry(s: &mut State, cx: &mut Ctx<'_>) {
    if !matches!(s.run_status, RunStatus::Failed | RunStatus::Stopped) {
        return;
    }
    let Some(point) = s.retry.take() else { return };
    s.run = Some(Run { run_id: point.run_id.clone(), step_no: point.step_no });
    s.run_status = RunStatus::Running;
    cx.emit(s, OutRunStatus { run_id: point.run_id, status: RunStatus::Running });
    start_step(s, cx, point.attempt + 1);
}

//! The runtime and effects in-process against one test NATS with the
//! topology: what the effects suites run on.

#![allow(dead_code)] // Each suite uses part of it.

use std::time::Duration;

use conv_contracts::payload::MessageReceived;
use conv_contracts::{ConversationId, Envelope, EventType, Payload};
use conv_effects::EffectsOptions;
use conv_nats::service::{ServiceError, Settings};
use conv_nats::test_util::{ServiceHandle, TestNats, free_addr, spawn_service};

/// A running runtime and effects; they stop when dropped.
pub struct Stack {
    pub nats: TestNats,
    pub js: async_nats::jetstream::Context,
    pub runtime: ServiceHandle<ServiceError>,
    /// `None` between [`Stack::stop_effects`] and [`Stack::start_effects`].
    pub effects: Option<ServiceHandle<ServiceError>>,
}

impl Stack {
    /// A test NATS with the topology, the runtime (fast leases) and effects
    /// with `options`.
    pub async fn start(options: EffectsOptions) -> Stack {
        Stack::start_on(TestNats::start().await.expect("test NATS"), options).await
    }

    /// [`Stack::start`] on `nats`.
    pub async fn start_on(nats: TestNats, options: EffectsOptions) -> Stack {
        nats.setup().await.expect("topology");
        let js = nats.jetstream().await;
        let runtime = runtime(&nats);
        let effects = Some(effects(&nats, options));
        Stack { nats, js, runtime, effects }
    }

    /// Stops both services (their errors are not the caller's business).
    pub async fn stop(mut self) {
        self.stop_effects().await;
        if let Err(e) = self.runtime.shutdown().await {
            eprintln!("the runtime stopped with an error: {e}");
        }
    }

    /// Stops the effects instance gracefully.
    pub async fn stop_effects(&mut self) {
        if let Some(fx) = self.effects.take() {
            fx.shutdown().await.expect("effects stop cleanly");
        }
    }

    /// Starts an effects instance with `options` (after [`Stack::stop_effects`]).
    pub fn start_effects(&mut self, options: EffectsOptions) {
        self.effects = Some(effects(&self.nats, options));
    }

    /// Journals an input of conversation `conv` with id `id`.
    pub async fn send(&self, conv: &str, id: &str, data: impl Into<Payload>) {
        send(&self.js, conv, id, data).await;
    }

    /// Every input of the conversation journaled so far, in record order.
    pub async fn inputs(&self, c: &str) -> Vec<Envelope> {
        conv_nats::test_util::inputs(&self.js, c).await
    }

    /// The inputs once `pred` holds for them; panics after `within`.
    pub async fn wait_for(
        &self,
        c: &str,
        what: &str,
        pred: impl Fn(&[Envelope]) -> bool,
        within: Duration,
    ) -> Vec<Envelope> {
        conv_nats::test_util::wait_inputs(&self.js, c, what, within, pred).await
    }

    /// Sends `text` as conversation `c`'s first message and waits until its
    /// answer streams (the first delta is journaled).
    #[allow(dead_code)] // not every suite uses it
    pub async fn streaming(&self, c: &str, text: &str) {
        self.send(c, "m1", message(text)).await;
        self.wait_for(c, "the first delta", |i| count(i, EventType::LlmDelta) >= 1, Duration::from_secs(20)).await;
    }

    /// Sends `text` as conversation `c`'s first message and waits for a
    /// tool call or model step to fail: the inputs and the failure's error.
    #[allow(dead_code)] // not every suite uses it
    pub async fn fails(&self, c: &str, text: &str, within: Duration) -> (Vec<Envelope>, String) {
        self.send(c, "m1", message(text)).await;
        let i = self.wait_for(c, "a failure", |i| failure(i).is_some(), within).await;
        let error = failure(&i).expect("failed");
        (i, error)
    }

    /// The conversation's state, replayed from the journal.
    pub async fn state(&self, c: &str) -> conv_core::state::State {
        conv_store::journal::rebuild(&self.js, &conv(c), None).await.expect("rebuild").snapshot.state
    }

    /// The conversation's state once `pred` holds for it (the runtime
    /// applies what effects journaled a moment later); panics after `within`
    /// with what `what` waited for and the last state's run status.
    pub async fn state_when(
        &self,
        c: &str,
        what: &str,
        pred: impl Fn(&conv_core::state::State) -> bool,
        within: Duration,
    ) -> conv_core::state::State {
        let deadline = std::time::Instant::now() + within;
        loop {
            let state = self.state(c).await;
            if pred(&state) {
                return state;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{c}: {what} not seen within {within:?} (run {:?}, last entry {:?})",
                state.run_status,
                state.entries.last().map(|e| e.status)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A conversation id.
pub fn conv(c: &str) -> ConversationId {
    ConversationId::parse(c).expect("id")
}

/// How many of `inputs` are of type `ty`.
pub fn count(inputs: &[Envelope], ty: EventType) -> usize {
    inputs.iter().filter(|e| e.event_type() == ty).count()
}

/// The payload of the first input of a variant: `first!(inputs, LlmFailed)`.
#[allow(unused_macros)] // not every suite uses it
macro_rules! first {
    ($inputs:expr, $variant:ident) => {
        $inputs.iter().find_map(|e| match e.data() {
            conv_contracts::Payload::$variant(p) => Some(p.clone()),
            _ => None,
        })
    };
}
#[allow(unused_imports)] // not every suite uses it
pub(crate) use first;

/// The error of the first failed tool call or model step in `inputs`.
pub fn failure(inputs: &[Envelope]) -> Option<String> {
    inputs.iter().find_map(|e| match e.data() {
        Payload::ToolFailed(f) => Some(f.error.clone()),
        Payload::LlmFailed(f) => Some(f.error.clone()),
        _ => None,
    })
}

/// A user's message.
pub fn message(text: &str) -> MessageReceived {
    MessageReceived { text: text.into(), role: None, channel: None, sender: None }
}

/// The runtime with test settings and 200 ms lease heartbeats.
pub fn runtime(nats: &TestNats) -> ServiceHandle<ServiceError> {
    let mut rc: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    rc.options.heartbeat_ms = 200;
    spawn_service("conv-runtime", |t| conv_runtime::run(rc, t))
}

/// Effects with test settings and `options`.
pub fn effects(nats: &TestNats, options: EffectsOptions) -> ServiceHandle<ServiceError> {
    let mut ec: conv_effects::Config = Settings::for_test(nats.config(), free_addr());
    ec.options = options;
    spawn_service("conv-effects", |t| conv_effects::run(ec, t))
}

/// Journals an input of conversation `conv` with id `id`, stamped now.
pub async fn send(js: &async_nats::jetstream::Context, conv: &str, id: &str, data: impl Into<Payload>) {
    let mut e = Envelope::new(id, "/test", self::conv(conv), data).expect("valid event");
    e = e.with_time(Some(chrono::Utc::now()));
    conv_nats::headers::publish(js, &e).await.expect("publish").await.expect("ack");
}

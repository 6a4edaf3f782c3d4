//! The four services in-process against one test NATS, for the suites that
//! exercise the whole pipeline through its HTTP APIs.

#![allow(dead_code)] // Each suite uses part of it.

use std::net::SocketAddr;
use std::time::Duration;

use conv_nats::service::{ServiceError, Settings};
use conv_nats::test_util::{ServiceHandle, TestNats, free_addr, spawn_service, wait_http_ok};
use serde_json::Value;

/// Posts a user message through ingress at `ingress`; it must be accepted.
pub async fn post_message(http: &reqwest::Client, ingress: SocketAddr, conversation: &str, text: &str) {
    let r = http
        .post(format!("http://{ingress}/v1/conversations/{conversation}/messages"))
        .json(&serde_json::json!({ "text": text }))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 202, "message to {conversation} accepted");
}

/// The four services' settings before they start.
#[derive(Debug)]
pub struct Configs {
    pub ingress: conv_ingress::Config,
    pub runtime: conv_runtime::Config,
    pub effects: conv_effects::Config,
    pub projections: conv_projections::Config,
}

/// A running pipeline; stops when dropped.
#[derive(Debug)]
pub struct Pipeline {
    pub nats: TestNats,
    pub ingress: SocketAddr,
    pub runtime: SocketAddr,
    pub effects: SocketAddr,
    pub projections: SocketAddr,
    pub http: reqwest::Client,
    /// The runtime's settings, to start it again.
    runtime_config: conv_runtime::Config,
    /// Ingress, runtime (`None` while stopped), effects, projections.
    services: (
        ServiceHandle<ServiceError>,
        Option<ServiceHandle<ServiceError>>,
        ServiceHandle<ServiceError>,
        ServiceHandle<ServiceError>,
    ),
}

impl Pipeline {
    /// Starts NATS with the topology, then the services with test settings
    /// (scripted replies of 10 tokens, 5 ms apart; fast leases) changed by
    /// `customize`; returns once every service is ready.
    pub async fn start(customize: impl FnOnce(&mut Configs)) -> Pipeline {
        Pipeline::start_on(TestNats::start().await.expect("nats-server"), customize).await
    }

    /// [`Pipeline::start`] on `nats`; on a secured server each service
    /// connects as its own user.
    pub async fn start_on(nats: TestNats, customize: impl FnOnce(&mut Configs)) -> Pipeline {
        nats.setup().await.expect("topology");
        let (ingress, runtime, effects, projections) = (free_addr(), free_addr(), free_addr(), free_addr());
        let user = |name: &str| if nats.is_secured() { nats.config_as(name) } else { nats.config() };
        let mut c = Configs {
            ingress: Settings::for_test(user("ingress"), ingress),
            runtime: Settings::for_test(user("runtime"), runtime),
            effects: Settings::for_test(user("effects"), effects),
            projections: Settings::for_test(user("projections"), projections),
        };
        c.runtime.options.heartbeat_ms = 200;
        c.effects.options.scripted_tokens = 10;
        c.effects.options.scripted_token_delay_ms = 5;
        c.projections.options.ingress_url = format!("http://{ingress}");
        customize(&mut c);
        let Configs { ingress: ic, runtime: rc, effects: ec, projections: pc } = c;
        let runtime_config = rc.clone();
        let services = (
            spawn_service("conv-ingress", |t| conv_ingress::run(ic, t)),
            Some(spawn_service("conv-runtime", |t| conv_runtime::run(rc, t))),
            spawn_service("conv-effects", |t| conv_effects::run(ec, t)),
            spawn_service("conv-projections", |t| conv_projections::run(pc, t)),
        );
        for addr in [ingress, runtime, effects, projections] {
            assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(30)).await, Some(200));
        }
        Pipeline {
            nats,
            ingress,
            runtime,
            effects,
            projections,
            http: reqwest::Client::new(),
            runtime_config,
            services,
        }
    }

    /// Stops the runtime gracefully and starts it again with its settings.
    pub async fn restart_runtime(&mut self) {
        if let Some(rt) = self.services.1.take() {
            rt.shutdown().await.expect("the runtime stops cleanly");
        }
        let rc = self.runtime_config.clone();
        self.services.1 = Some(spawn_service("conv-runtime", |t| conv_runtime::run(rc, t)));
    }

    /// `GET /v1/conversations/{conv}/{what}` on projections: the status and
    /// the JSON body (`null` when there is none).
    pub async fn get(&self, conv: &str, what: &str) -> (u16, Value) {
        let url = format!("http://{}/v1/conversations/{conv}/{what}", self.projections);
        let r = self.http.get(url).send().await.expect("GET");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/conversations/{conv}/{what}` on ingress with a JSON body:
    /// the status and the JSON answer.
    pub async fn post(&self, conv: &str, what: &str, body: &Value) -> (u16, Value) {
        let url = format!("http://{}/v1/conversations/{conv}/{what}", self.ingress);
        let r = self.http.post(url).json(body).send().await.expect("POST");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Stops the services gracefully (each flushes what it buffers) and
    /// waits for them; each must stop cleanly.
    pub async fn shutdown(self) {
        let (i, r, e, p) = self.services;
        i.shutdown().await.expect("ingress stops cleanly");
        if let Some(r) = r {
            r.shutdown().await.expect("the runtime stops cleanly");
        }
        e.shutdown().await.expect("effects stop cleanly");
        p.shutdown().await.expect("projections stop cleanly");
    }
}

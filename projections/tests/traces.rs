//! OpenTelemetry traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a user
//! message is one trace across the four services. A local OTLP/HTTP
//! receiver collects what they export (JSON bodies, as a collector's
//! port 4318 takes them); the spans of the message's trace must form one
//! tree, rooted at ingress's span of the message, whose branches run
//! through runtime and effects down to the views projections folded.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

/// A span as received, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Value,
}

impl Received {
    fn id(&self) -> &str {
        self.span["spanId"].as_str().unwrap_or_default()
    }
    fn parent(&self) -> Option<&str> {
        self.span["parentSpanId"].as_str().filter(|p| !p.is_empty())
    }
    fn name(&self) -> &str {
        self.span["name"].as_str().unwrap_or_default()
    }
    fn attr(&self, key: &str) -> Option<&str> {
        self.span["attributes"].as_array()?.iter().find(|a| a["key"] == key)?["value"]["stringValue"].as_str()
    }
}

type Collected = Arc<Mutex<Vec<Received>>>;

async fn receive(State(seen): State<Collected>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST };
    let mut out = Vec::new();
    for rs in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|kv| kv["key"] == "service.name"))
            .and_then(|kv| kv["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_owned();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                out.push(Received { service: service.clone(), span: span.clone() });
            }
        }
    }
    seen.lock().expect("lock").extend(out);
    StatusCode::OK
}

/// An OTLP/HTTP receiver on a free port; `(its base URL, what it got)`.
async fn collector() -> (String, Collected) {
    let seen: Collected = Arc::default();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// The spans of the trace whose root is ingress's span of `event_id`.
fn trace_of(seen: &Collected, event_id: &str) -> Option<(String, Vec<Received>)> {
    let all = seen.lock().expect("lock").clone();
    let root = all.iter().find(|s| s.service == "conv-ingress" && s.attr("event.id") == Some(event_id))?;
    let trace = root.span["traceId"].as_str()?.to_owned();
    let spans = all.into_iter().filter(|s| s.span["traceId"] == trace.as_str()).collect();
    Some((trace, spans))
}

/// The services on the way from `span` up to the root (nearest first), or
/// `None` when a parent is missing.
fn ancestry(span: &Received, by_id: &HashMap<&str, &Received>) -> Option<Vec<String>> {
    let mut services = vec![span.service.clone()];
    let mut at = span;
    while let Some(parent) = at.parent() {
        at = by_id.get(parent)?;
        services.push(at.service.clone());
        if services.len() > 64 {
            return None; // a cycle
        }
    }
    Some(services)
}

#[tokio::test]
async fn a_user_message_is_one_trace_across_every_service() {
    let (endpoint, seen) = collector().await;
    let pipeline = support::Pipeline::start(|c| {
        for telemetry in [
            &mut c.ingress.service.telemetry,
            &mut c.runtime.service.telemetry,
            &mut c.effects.service.telemetry,
            &mut c.projections.service.telemetry,
        ] {
            telemetry.endpoint = Some(format!("{endpoint}/v1/traces"));
            telemetry.schedule_delay = Duration::from_millis(100);
        }
    })
    .await;
    let ingress = pipeline.ingress;
    let post = |conv: &str, text: &str| {
        pipeline
            .http
            .post(format!("http://{ingress}/v1/conversations/{conv}/messages"))
            .json(&json!({ "text": text }))
            .send()
    };
    let first: Value = post("tr1", "hello").await.expect("post").json().await.expect("202 body");
    let second: Value = post("tr1", "again").await.expect("post").json().await.expect("202 body");
    let (first, second) = (first["event_id"].as_str().expect("id"), second["event_id"].as_str().expect("id"));

    // Wait until the first message's trace is a connected tree holding a
    // branch ingress → runtime → effects → runtime → projections.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (trace, spans) = loop {
        if let Some((trace, spans)) = trace_of(&seen, first) {
            let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.id(), s)).collect();
            let connected = spans.iter().all(|s| ancestry(s, &by_id).is_some());
            let full = spans.iter().filter(|s| s.name() == "projections.fold").any(|s| {
                ancestry(s, &by_id).is_some_and(|path| {
                    path.first().map(String::as_str) == Some("conv-projections")
                        && path.last().map(String::as_str) == Some("conv-ingress")
                        && path.iter().any(|p| p == "conv-effects")
                        && path.iter().any(|p| p == "conv-runtime")
                })
            });
            let finished = spans.iter().any(|s| s.name() == "conv.out.message.finished");
            if connected && full && finished {
                break (trace, spans);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no complete trace of {first}: {:#?}",
            trace_of(&seen, first)
                .map(|(_, s)| s.iter().map(|s| (s.service.clone(), s.name().to_owned())).collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One root: ingress's span of the message.
    let roots: Vec<&Received> = spans.iter().filter(|s| s.parent().is_none()).collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!((roots[0].service.as_str(), roots[0].name()), ("conv-ingress", "conv.in.message.received"));
    for name in ["runtime.apply", "conv.effect.llm.requested", "effects.llm", "conv.in.llm.completed"] {
        assert!(spans.iter().any(|s| s.name() == name), "{name} in the trace: {:?}", names(&spans));
    }
    // Effects' events hang under the run that journaled them.
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.id(), s)).collect();
    let completed = spans.iter().find(|s| s.name() == "conv.in.llm.completed").expect("completed");
    let run = completed.parent().and_then(|p| by_id.get(p)).expect("its parent");
    assert_eq!((run.service.as_str(), run.name()), ("conv-effects", "effects.llm"));
    // Each span once: no two share an id.
    let mut ids: Vec<&str> = spans.iter().map(Received::id).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "span ids repeat: {:?}", names(&spans));
    // Every span is well formed.
    for s in &spans {
        let (start, end) = (&s.span["startTimeUnixNano"], &s.span["endTimeUnixNano"]);
        let (start, end): (u128, u128) = (
            start.as_str().and_then(|v| v.parse().ok()).expect("start"),
            end.as_str().and_then(|v| v.parse().ok()).expect("end"),
        );
        assert!(start > 0 && end >= start, "{s:?}");
        assert_eq!(s.attr("conversation.id"), Some("tr1"));
    }

    // The second message is a trace of its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((other, spans)) = trace_of(&seen, second)
            && spans.iter().any(|s| s.service == "conv-projections")
        {
            assert_ne!(other, trace);
            break;
        }
        assert!(Instant::now() < deadline, "no trace of the second message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pipeline.shutdown().await;
}

fn names(spans: &[Received]) -> Vec<(String, String)> {
    spans.iter().map(|s| (s.service.clone(), s.name().to_owned())).collect()
}

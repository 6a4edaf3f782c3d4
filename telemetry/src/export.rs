//! The export task: batches queued spans and POSTs them as OTLP/JSON
//! (`ExportTraceServiceRequest`, ids in hex, 64-bit numbers as strings).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value as Json, json};
use tokio::sync::{mpsc, oneshot};

use crate::{Config, Span, StartError, Value};

pub(crate) enum Command {
    Span(Box<Span>),
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Exporter {
    http: reqwest::Client,
    endpoint: String,
    headers: reqwest::header::HeaderMap,
    resource: Json,
    spans: prometheus::IntCounterVec,
    /// When a failure was last logged (one warning a minute at most).
    warned: Option<Instant>,
}

impl Exporter {
    pub(crate) fn new(
        config: &Config,
        endpoint: String,
        service: &str,
        spans: prometheus::IntCounterVec,
    ) -> Result<Exporter, StartError> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| StartError::Client(format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?} is not a header name")))?;
            let value = reqwest::header::HeaderValue::from_str(v).map_err(|_| {
                StartError::Client(format!("OTEL_EXPORTER_OTLP_HEADERS: the value of {k} is not valid"))
            })?;
            headers.insert(name, value);
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| StartError::Client(e.to_string()))?;
        let name = config.service_name.clone().unwrap_or_else(|| service.to_owned());
        let mut attributes = vec![attribute("service.name", &Value::Str(name))];
        attributes.push(attribute("service.version", &Value::Str(env!("CARGO_PKG_VERSION").into())));
        for (k, v) in &config.resource {
            if k != "service.name" || config.service_name.is_none() {
                attributes.retain(|a| a["key"] != k.as_str());
                attributes.push(attribute(k, &Value::Str(v.clone())));
            }
        }
        Ok(Exporter { http, endpoint, headers, resource: json!({ "attributes": attributes }), spans, warned: None })
    }

    /// Runs until every [`crate::Tracer`] is gone: sends a batch when it is
    /// full, every `delay`, and on a flush.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>, delay: Duration, max_batch: usize) {
        let mut batch: Vec<Span> = Vec::with_capacity(max_batch);
        let mut tick = tokio::time::interval(delay.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Span(span)) => {
                        batch.push(*span);
                        if batch.len() >= max_batch {
                            self.send(std::mem::take(&mut batch)).await;
                        }
                    }
                    Some(Command::Flush(done)) => {
                        if !batch.is_empty() {
                            self.send(std::mem::take(&mut batch)).await;
                        }
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = tick.tick() => if !batch.is_empty() {
                    self.send(std::mem::take(&mut batch)).await;
                },
            }
        }
        if !batch.is_empty() {
            self.send(batch).await;
        }
    }

    /// One POST; a refusal the collector calls transient (429, 502–504) or
    /// a connection error is tried once more after a second.
    async fn send(&mut self, batch: Vec<Span>) {
        let n = batch.len() as u64;
        let body = match serde_json::to_vec(&request(&self.resource, &batch)) {
            Ok(b) => b,
            Err(error) => {
                self.spans.with_label_values(&["failed"]).inc_by(n);
                tracing::warn!(message = "Cannot encode trace spans.", %error);
                return;
            }
        };
        let mut outcome = self.post(body.clone()).await;
        if outcome.as_ref().is_err_and(PostError::retryable) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            outcome = self.post(body).await;
        }
        match outcome {
            Ok(()) => self.spans.with_label_values(&["exported"]).inc_by(n),
            Err(detail) => {
                self.spans.with_label_values(&["failed"]).inc_by(n);
                if self.warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    self.warned = Some(Instant::now());
                    tracing::warn!(
                        message = "Trace export failed; spans dropped.",
                        endpoint = %crate::config::redacted(&self.endpoint),
                        spans = n,
                        %detail
                    );
                }
            }
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), PostError> {
        let response = self
            .http
            .post(&self.endpoint)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| PostError::Unreachable(e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(PostError::Refused(status))
    }
}

/// Why an export request failed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("{0}")]
    Unreachable(reqwest::Error),
    #[error("the collector answered {0}")]
    Refused(reqwest::StatusCode),
}

impl PostError {
    /// Worth one more try: a connection error, or a refusal the collector
    /// calls transient (429, 502–504).
    fn retryable(&self) -> bool {
        match self {
            PostError::Unreachable(_) => true,
            PostError::Refused(status) => matches!(status.as_u16(), 429 | 502..=504),
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default().to_string()
}

fn attribute(key: &str, value: &Value) -> Json {
    let value = match value {
        Value::Str(s) => json!({ "stringValue": s }),
        Value::Int(i) => json!({ "intValue": i.to_string() }),
        Value::Bool(b) => json!({ "boolValue": b }),
    };
    json!({ "key": key, "value": value })
}

/// The OTLP/JSON body of one export request.
pub(crate) fn request(resource: &Json, spans: &[Span]) -> Json {
    let spans: Vec<Json> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": s.trace_id.hex(),
                "spanId": s.span_id.hex(),
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end.unwrap_or(s.start).max(s.start)),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": match &s.error {
                    None => json!({}),
                    Some(message) => json!({ "code": 2, "message": message }),
                },
            });
            if let Some(parent) = s.parent {
                span["parentSpanId"] = Json::String(parent.hex());
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": resource,
            "scopeSpans": [{
                "scope": { "name": "conv", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, SpanId, TraceId};
    use std::borrow::Cow;

    #[test]
    fn encodes_otlp_json() {
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let span = Span {
            trace_id: TraceId([0xab; 16]),
            span_id: SpanId([1, 2, 3, 4, 5, 6, 7, 8]),
            parent: Some(SpanId([9; 8])),
            name: Cow::Borrowed("runtime.apply"),
            kind: Kind::Consumer,
            start,
            end: Some(start + Duration::from_millis(2)),
            attributes: vec![("stream.sequence", Value::Int(42)), ("duplicate", Value::Bool(false))],
            error: Some("journal unavailable".into()),
        };
        let body = request(&json!({"attributes": []}), &[span]);
        let s = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "abababababababababababababababab");
        assert_eq!(s["spanId"], "0102030405060708");
        assert_eq!(s["parentSpanId"], "0909090909090909");
        assert_eq!(s["kind"], 5);
        assert_eq!(s["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(s["endTimeUnixNano"], "1700000000125456789");
        assert_eq!(s["attributes"][0], json!({"key": "stream.sequence", "value": {"intValue": "42"}}));
        assert_eq!(s["status"], json!({"code": 2, "message": "journal unavailable"}));
    }
}

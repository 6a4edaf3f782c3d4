//! The shipped dashboards and alert rules use only metrics the services
//! export: the pipeline runs a little traffic (a message, a rejected
//! request, a tool aborted mid-call, a tool that fails), then every metric
//! named in `monitoring/alerts.yml` and `monitoring/grafana/dashboards/*.json`
//! must appear in some service's `/metrics`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

mod support;

use serde_json::{Value, json};

const ALERTS: &str = include_str!("../../monitoring/alerts.yml");
const DASHBOARD: &str = include_str!("../../monitoring/grafana/dashboards/conv.json");

/// `conv_*` names in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("conv_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            out.insert(text[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

#[tokio::test]
async fn every_metric_a_dashboard_or_an_alert_uses_is_exported() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let used: BTreeSet<String> = names(ALERTS)
        .into_iter()
        .chain(names(DASHBOARD))
        // Names that are not metrics: the data source uid, the dashboard uid.
        .filter(|n| !n.ends_with('_') && n != "conv_prometheus")
        .collect();
    assert!(used.len() > 10, "{used:?}");

    let pipeline = support::Pipeline::start(|_| {}).await;
    let (ingress, runtime, effects, projections) =
        (pipeline.ingress, pipeline.runtime, pipeline.effects, pipeline.projections);
    let http = reqwest::Client::new();
    let post = |conv: &str, what: &str, body: Value| {
        http.post(format!("http://{ingress}/v1/conversations/{conv}/{what}")).json(&body).send()
    };
    let timeline = async |conv: &str| -> Value {
        let r = http.get(format!("http://{projections}/v1/conversations/{conv}/timeline")).send().await;
        match r {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
            _ => Value::Null,
        }
    };
    let wait = async |conv: &str, done: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = timeline(conv).await;
            if done(&t) {
                return;
            }
            assert!(Instant::now() < deadline, "{conv}: {t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // A reply, watched on the stream (live deltas reach an instance only for
    // conversations with a reader).
    let mut stream = conv_client::EventStream::open(&http, &format!("http://{projections}"), "m1", None, None)
        .await
        .expect("stream");
    let reader = tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            if event.is(conv_contracts::EventType::OutMessageFinished) {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post("m1", "messages", json!({"text": "hello"})).await.expect("post").status().as_u16(), 202);
    wait("m1", &|t| t["run_status"] == "idle" && t["entries"].as_array().is_some_and(|e| e.len() == 2)).await;
    tokio::time::timeout(Duration::from_secs(30), reader).await.expect("the stream ends the reply").expect("reader");
    // A rejected request.
    assert_eq!(post("m1", "messages", json!({"txet": "typo"})).await.expect("post").status().as_u16(), 422);
    // A tool aborted mid-call.
    let sleep = json!({"text": r#"/tool sleep {"ms": 30000}"#});
    assert_eq!(post("m2", "messages", sleep).await.expect("post").status().as_u16(), 202);
    wait("m2", &|t| t.to_string().contains("sleep")).await;
    assert_eq!(post("m2", "abort", json!({})).await.expect("post").status().as_u16(), 202);
    wait("m2", &|t| t["run_status"] == "aborted").await;
    // A tool that fails.
    let bad = json!({"text": r#"/tool sleep {"ms": 999999999999}"#});
    assert_eq!(post("m3", "messages", bad).await.expect("post").status().as_u16(), 202);
    wait("m3", &|t| {
        t["entries"].as_array().is_some_and(|e| e.iter().any(|e| e["role"] == "tool" && e["status"] == "failed"))
    })
    .await;

    // A dead letter as it happens: counted by reason.
    let client = async_nats::connect(pipeline.nats.url()).await.expect("nats");
    client.publish("conv.dlq.test", "x".into()).await.expect("publish");
    client.flush().await.expect("flush");
    let counted = Instant::now() + Duration::from_secs(10);
    loop {
        let text =
            http.get(format!("http://{ingress}/metrics")).send().await.expect("metrics").text().await.expect("text");
        if text.lines().any(|l| l == r#"conv_dlq_entries_total{reason="other"} 1"#) {
            break;
        }
        assert!(Instant::now() < counted, "the dead letter was not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut exported = BTreeSet::new();
    for addr in [ingress, runtime, effects, projections] {
        let text =
            http.get(format!("http://{addr}/metrics")).send().await.expect("metrics").text().await.expect("text");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            exported.insert(name.to_owned());
        }
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used by a dashboard or an alert but not exported: {missing:?}\nexported: {exported:?}"
    );
}

#[test]
fn every_runbook_an_alert_names_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let runbooks: Vec<&str> =
        ALERTS.lines().filter_map(|l| l.trim().strip_prefix("runbook: ")).map(str::trim).collect();
    assert!(runbooks.len() >= 12, "every alert names its runbook: {runbooks:?}");
    for r in runbooks {
        assert!(root.join(r).is_file(), "{r} is named by an alert but does not exist");
    }
    // And each runbook speaks of the alerts that send people to it.
    let mut alert = "";
    for line in ALERTS.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = name.trim();
        } else if let Some(r) = line.strip_prefix("runbook: ") {
            let text = std::fs::read_to_string(root.join(r.trim())).expect("runbook");
            assert!(text.contains(alert), "{r} does not mention {alert}, which sends people there");
        }
    }
}

#[test]
fn names_are_found_whole() {
    let found = names("rate(conv_a_total[1m]) / conv_b_seconds_bucket{le} xconv_c conv_d");
    assert_eq!(found.into_iter().collect::<Vec<_>>(), ["conv_a_total", "conv_b_seconds_bucket", "conv_d"]);
}

//! `convctl readiness` against a running pipeline: every announced instance
//! is asked for `/readyz`; a service that is down is `not_ready` with the
//! reason, and the report is `ready` again once it is back. An instance that
//! died without withdrawing is not ready until its announcement expires.

use std::process::Output;
use std::time::{Duration, Instant};

use conv_nats::service::Settings;
use conv_nats::test_util::{TestNats, free_addr, spawn_service, wait_http_ok};
use serde_json::Value;

async fn readiness(url: &str, dir: &std::path::Path) -> (Output, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(["readiness", "--json"])
        .current_dir(dir)
        .env("NATS_URL", url)
        .env_remove("CONV_PARTITIONS")
        .env_remove("CONV_REPLICAS")
        .output()
        .await
        .expect("convctl readiness");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, report)
}

/// Runs readiness until `done` holds for its report (30 s at most).
async fn until(url: &str, dir: &std::path::Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, report) = readiness(url, dir).await;
        if done(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "never {what}: {report:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn checks_of<'a>(report: &'a Value, service: &str) -> Vec<&'a Value> {
    report["checks"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(service))).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_service_that_is_down_is_not_ready_and_ready_again_when_back() {
    let nats = TestNats::start().await.expect("nats-server");
    nats.setup().await.expect("topology");
    let url = nats.url();
    let dir = tempfile::tempdir().expect("work dir");
    let effects_addr = free_addr();
    let effects_config = || -> conv_effects::Config { Settings::for_test(nats.config(), effects_addr) };
    let (ingress, projections, runtime) = (free_addr(), free_addr(), free_addr());
    let ic: conv_ingress::Config = Settings::for_test(nats.config(), ingress);
    let rc: conv_runtime::Config = Settings::for_test(nats.config(), runtime);
    let pc: conv_projections::Config = Settings::for_test(nats.config(), projections);
    let _others = (
        spawn_service("conv-ingress", |t| conv_ingress::run(ic, t)),
        spawn_service("conv-runtime", |t| conv_runtime::run(rc, t)),
        spawn_service("conv-projections", |t| conv_projections::run(pc, t)),
    );
    let ec = effects_config();
    let effects = spawn_service("conv-effects", |t| conv_effects::run(ec, t));
    for addr in [ingress, projections, runtime, effects_addr] {
        assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(30)).await, Some(200));
    }

    let ready = until(&url, dir.path(), "ready", |r| r["status"] == "ready").await;
    for service in ["conv-ingress", "conv-runtime", "conv-effects", "conv-projections"] {
        let checks = checks_of(&ready, service);
        assert_eq!(checks.len(), 1, "one instance of {service}: {ready:#}");
        assert!(checks[0]["detail"].as_str().is_some_and(|d| d.contains("ready at")), "{ready:#}");
    }

    // Latency from the services' own histograms.
    for name in ["view lag", "abort latency"] {
        let c = ready["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name));
        assert!(c.is_some_and(|c| c["status"] == "ready"), "{name} judged from /metrics: {ready:#}");
    }

    // Effects stops: not ready, and the report says why.
    effects.shutdown().await.expect("effects stops");
    let down = until(&url, dir.path(), "not_ready without effects", |r| r["status"] == "not_ready").await;
    let (out, _) = readiness(&url, dir.path()).await;
    assert_eq!(out.status.code(), Some(2), "exit 2 when not ready");
    let effects_checks = checks_of(&down, "conv-effects");
    assert!(
        effects_checks.iter().any(|c| c["status"] == "not_ready"
            && c["detail"].as_str().is_some_and(|d| d.contains("no instance running") || d.contains("not answering"))),
        "{down:#}"
    );
    assert!(checks_of(&down, "conv-runtime").iter().all(|c| c["status"] == "ready"), "only effects is down: {down:#}");

    // Back: ready again.
    let ec = effects_config();
    let _effects = spawn_service("conv-effects", |t| conv_effects::run(ec, t));
    until(&url, dir.path(), "ready again", |r| r["status"] == "ready").await;

    // An instance that died without withdrawing: not ready until its
    // announcement expires with the lease TTL.
    let js = nats.jetstream().await;
    let leases = js.get_key_value(conv_nats::topology::KV_LEASES).await.expect("leases");
    let ghost = conv_nats::presence::Announcement {
        service: "conv-runtime".into(),
        instance: "ghost0000".into(),
        addr: free_addr().to_string(),
        version: "0".into(),
        started_at: "2026-01-01T00:00:00Z".into(),
    };
    let key = conv_nats::presence::key("conv-runtime", "ghost0000");
    let value: bytes::Bytes = serde_json::to_vec(&ghost).expect("json").into();
    // Announced like a live instance (refreshed within the TTL) ...
    let haunting = tokio::spawn({
        let (leases, key, value) = (leases.clone(), key.clone(), value.clone());
        async move {
            loop {
                leases.put(&key, value.clone()).await.expect("put");
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        }
    });
    let haunted = until(&url, dir.path(), "the dead instance seen", |r| {
        checks_of(r, "conv-runtime").iter().any(|c| c["name"] == "conv-runtime ghost0000")
    })
    .await;
    assert_eq!(haunted["status"], "not_ready", "{haunted:#}");
    // ... then no more: it expires with the lease TTL.
    haunting.abort();
    until(&url, dir.path(), "ready once it expired", |r| r["status"] == "ready").await;

    // Every report was kept, the trend shows the outage.
    let history = tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(["readiness", "--history", "--json"])
        .current_dir(dir.path())
        .env("NATS_URL", &url)
        .output()
        .await
        .expect("history");
    let kept: Vec<Value> = serde_json::from_slice(&history.stdout).expect("json");
    assert!(kept.len() >= 5, "{kept:?}");
    assert!(kept.iter().any(|k| {
        k["status"] == "not_ready"
            && k["problems"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p.as_str().is_some_and(|p| p.starts_with("conv-effects"))))
    }));
    assert_eq!(kept.last().map(|k| k["status"].clone()), Some(Value::from("ready")));
}

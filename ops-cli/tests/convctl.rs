//! `convctl` as a user runs it, against a fresh JetStream server.

use std::process::Output;

use conv_contracts::subject::STREAMS;
use conv_nats::test_util::TestNats;

/// Where convctl keeps its state (`.conv/`) in this test process.
fn workdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("convctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    dir
}

async fn convctl(nats_url: &str, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(args)
        .current_dir(workdir())
        .env("NATS_URL", nats_url)
        .env_remove("CONV_PARTITIONS")
        .env_remove("CONV_REPLICAS")
        .output()
        .await;
    match out {
        Ok(o) => o,
        Err(e) => panic!("run convctl: {e}"),
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("JSON output ({e}): {}", stdout(o)))
}

#[tokio::test]
async fn setup_creates_all_streams_and_is_idempotent() {
    let nats = TestNats::start().await.expect("test NATS");
    let url = nats.url();

    let check = convctl(&url, &["setup", "--check"]).await;
    assert_eq!(check.status.code(), Some(1), "a fresh server has drift: {}", stdout(&check));
    assert!(stdout(&check).contains("missing"), "{}", stdout(&check));

    let first = convctl(&url, &["setup"]).await;
    assert!(first.status.success(), "{first:?}");
    assert!(stdout(&first).contains("created"), "{}", stdout(&first));
    let js = nats.jetstream().await;
    for name in STREAMS {
        assert!(js.get_stream(name).await.is_ok(), "{name} created");
    }

    let second = convctl(&url, &["setup"]).await;
    assert!(second.status.success(), "{second:?}");
    assert!(stdout(&second).starts_with("no changes"), "{}", stdout(&second));

    let again = convctl(&url, &["setup", "--json"]).await;
    let report = json(&again);
    let changes = report["changes"].as_array().expect("changes");
    assert!(changes.iter().all(|c| c["action"] == "unchanged"), "{report}");
    assert!(convctl(&url, &["setup", "--check"]).await.status.success());
}

#[tokio::test]
async fn readiness_and_checkpoints() {
    let nats = TestNats::start().await.expect("test NATS");
    let url = nats.url();

    let before = convctl(&url, &["readiness", "--no-services", "--json"]).await;
    assert_eq!(before.status.code(), Some(2), "{}", stdout(&before));
    assert_eq!(json(&before)["status"], "not_ready");

    nats.setup().await.expect("setup");
    let ready = convctl(&url, &["readiness", "--no-services"]).await;
    assert_eq!(ready.status.code(), Some(0), "{}", stdout(&ready));
    assert!(stdout(&ready).trim_end().ends_with("ready"), "{}", stdout(&ready));

    // A dead letter makes it a warning.
    let js = nats.jetstream().await;
    js.publish("conv.dlq.test", "x".into()).await.expect("publish").await.expect("ack");
    let warn = convctl(&url, &["readiness", "--no-services", "--json"]).await;
    assert_eq!(warn.status.code(), Some(1), "{}", stdout(&warn));
    let report = json(&warn);
    assert_eq!(report["status"], "warning");
    let dlq = report["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "dlq").cloned();
    assert_eq!(dlq.expect("dlq check")["status"], "warning");

    let points = convctl(&url, &["checkpoints", "--json"]).await;
    assert!(points.status.success());
    let points = json(&points);
    let points = points.as_array().expect("list");
    assert_eq!(points.len(), 49, "16 partitions × (main + control + views) + effects");
    assert!(points.iter().all(|p| p["exists"] == true));
    let text = convctl(&url, &["checkpoints"]).await;
    assert!(stdout(&text).contains("runtime-p15"), "{}", stdout(&text));
}

#[tokio::test]
async fn errors_are_one_line_and_non_zero() {
    let nowhere = format!("nats://127.0.0.1:{}", conv_nats::test_util::free_port().expect("port"));
    let out = convctl(&nowhere, &["setup"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&nowhere), "names the URL: {err}");

    let bad = convctl(&nowhere, &["setup", "--partitions", "0"]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("partitions"));
}

#[tokio::test]
async fn a_non_default_topology_is_checked_as_configured() {
    let nats = TestNats::start().await.expect("test NATS");
    let url = nats.url();
    assert!(convctl(&url, &["setup", "--partitions", "4"]).await.status.success());
    assert!(convctl(&url, &["setup", "--check", "--partitions", "4"]).await.status.success());
    let ready = convctl(&url, &["readiness", "--no-services", "--partitions", "4"]).await;
    assert_eq!(ready.status.code(), Some(0), "{}", stdout(&ready));
    let points = json(&convctl(&url, &["checkpoints", "--json", "--partitions", "4"]).await);
    assert_eq!(points.as_array().map(Vec::len), Some(13), "4 partitions × (main + control + views) + effects");
    // The default topology does not match what is deployed.
    let drift = convctl(&url, &["setup", "--check"]).await;
    assert_eq!(drift.status.code(), Some(1), "{}", stdout(&drift));
}

#[tokio::test]
async fn help_lists_every_command() {
    let out = convctl("nats://127.0.0.1:1", &["--help"]).await;
    assert!(out.status.success());
    let help = stdout(&out);
    for cmd in ["setup", "up", "send", "dlq", "replay", "trace", "checkpoints", "readiness"] {
        assert!(help.contains(cmd), "--help mentions {cmd}: {help}");
    }
    let out = convctl("nats://127.0.0.1:1", &["dlq", "--help"]).await;
    assert!(stdout(&out).contains("redrive"));
}

//! `convctl up` then `convctl send`: a streamed answer, and Ctrl-C leaves
//! nothing running. Uses the service binaries built next to `convctl`.

use std::process::Stdio;
use std::time::Duration;

use conv_nats::test_util::{free_addr, free_port, http_get_status, wait_http_ok};

#[tokio::test]
async fn up_then_send_prints_a_streamed_answer_and_ctrl_c_stops_everything() {
    let convctl = env!("CARGO_BIN_EXE_convctl");
    let dir = std::path::Path::new(convctl).parent().expect("bin dir");
    for bin in ["conv-ingress", "conv-runtime", "conv-effects", "conv-projections"] {
        assert!(dir.join(bin).exists(), "{bin} is built next to convctl (cargo build --workspace)");
    }
    let work = tempfile::tempdir().expect("tempdir");
    let url = format!("nats://127.0.0.1:{}", free_port().expect("port"));
    let addrs = [
        ("CONV_INGRESS_ADDR", free_addr()),
        ("CONV_RUNTIME_ADDR", free_addr()),
        ("CONV_EFFECTS_ADDR", free_addr()),
        ("CONV_PROJECTIONS_ADDR", free_addr()),
    ];
    let mut up = tokio::process::Command::new(convctl);
    up.arg("up")
        .current_dir(work.path())
        .env("NATS_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in &addrs {
        up.env(k, v.to_string());
    }
    let mut up = up.spawn().expect("convctl up");
    for (_, addr) in &addrs {
        assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(60)).await, Some(200), "{addr}");
    }

    let mut send = tokio::process::Command::new(convctl);
    send.args(["send", "demo", "hello"]).env("NATS_URL", &url);
    for (k, v) in &addrs {
        send.env(k, v.to_string());
    }
    let out =
        tokio::time::timeout(Duration::from_secs(60), send.output()).await.expect("send in time").expect("send runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("You said: hello."), "{stdout}");
    assert_eq!(stdout.split_whitespace().count(), 24, "the whole scripted answer: {stdout}");

    // Ctrl-C: everything stops.
    let pid = up.id().expect("pid").to_string();
    tokio::process::Command::new("kill").args(["-INT", &pid]).status().await.expect("SIGINT");
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait()).await.expect("stops in time").expect("wait");
    assert!(status.success(), "{status}");
    for (name, addr) in &addrs {
        assert_eq!(http_get_status(&format!("http://{addr}/healthz")).await, None, "{name} is gone");
    }
    let nats_addr = url.trim_start_matches("nats://");
    assert!(std::net::TcpStream::connect(nats_addr).is_err(), "the nats-server it started is gone");
}

#[tokio::test]
async fn bench_runs_and_reports_its_ratios() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(["bench", "--conversations", "3", "--turns", "2", "--aborts", "2", "--json"])
        .output()
        .await
        .expect("bench runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(r["turns"], 6);
    assert_eq!(r["aborts"], 2);
    for field in [
        "turns_per_sec",
        "journal_writes_per_turn",
        "first_delta_ms_p50",
        "abort_ms_p99",
        "raw_async_publish_per_sec",
        "raw_consume_ack_per_sec",
        "ratio_writes_vs_raw_publish",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    assert!(r["seconds"].as_f64().is_some_and(|s| s < 120.0));
}

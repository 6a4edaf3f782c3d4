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
    // Secrets of every kind, to be looked for in the logs afterwards.
    let api_key = format!("client-key-{}", free_port().expect("port") as u64 * 7919);
    let callback_secret = format!("callback-secret-{}", free_port().expect("port") as u64 * 104_729);
    let hmac_secret = format!("hmac-secret-{}", free_port().expect("port") as u64 * 1_299_709);
    let llm_key = format!("sk-llm-{}", free_port().expect("port") as u64 * 15_485_863);
    let tools = format!(r#"[{{"name": "hook", "url": "http://127.0.0.1:9/hook", "hmac_secret": "{hmac_secret}"}}]"#);
    let mut up = tokio::process::Command::new(convctl);
    up.arg("up")
        .current_dir(work.path())
        .env("NATS_URL", &url)
        .env("RUST_LOG", "debug")
        .env("CONV_INGRESS_API_KEYS", &api_key)
        .env("CONV_CALLBACK_SECRET", &callback_secret)
        .env("CONV_WEBHOOK_TOOLS", &tools)
        .env("CONV_LLM_API_KEY", &llm_key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &addrs {
        up.env(k, v.to_string());
    }
    let mut up = up.spawn().expect("convctl up");
    // Everything convctl up and its services print.
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    for pipe in [
        up.stdout.take().map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        up.stderr.take().map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let logs = logs.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                logs.lock().expect("lock").push_str(&line);
                logs.lock().expect("lock").push('\n');
            }
        });
    }
    for (_, addr) in &addrs {
        assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(60)).await, Some(200), "{addr}");
    }

    // The server it started takes no anonymous clients; the admin's
    // credentials are left for other convctl commands, readable by the owner only.
    let anonymous = conv_nats::NatsConfig { url: url.clone(), ..Default::default() };
    assert!(conv_nats::connect(&anonymous, "anon").await.is_err(), "an anonymous client was accepted");
    let admin_env = work.path().join(".conv/admin.env");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&admin_env).expect("admin.env").permissions());
    assert_eq!(mode & 0o777, 0o600);
    let checkpoints = tokio::process::Command::new(convctl)
        .args(["checkpoints", "--json"])
        .current_dir(work.path())
        .env("NATS_URL", &url)
        .output()
        .await
        .expect("checkpoints");
    assert!(
        checkpoints.status.success(),
        "convctl uses .conv/admin.env: {}",
        String::from_utf8_lossy(&checkpoints.stderr)
    );

    let mut send = tokio::process::Command::new(convctl);
    send.args(["send", "demo", "hello"]).env("NATS_URL", &url).env("CONV_API_KEY", &api_key);
    for (k, v) in &addrs {
        send.env(k, v.to_string());
    }
    let out =
        tokio::time::timeout(Duration::from_secs(60), send.output()).await.expect("send in time").expect("send runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("You said: hello."), "{stdout}");
    assert_eq!(stdout.split_whitespace().count(), 24, "the whole scripted answer: {stdout}");

    // --json: what ingress answered and every event seen, the run's end last.
    let mut send = tokio::process::Command::new(convctl);
    send.args(["send", "demo", "again", "--json"]).env("NATS_URL", &url).env("CONV_API_KEY", &api_key);
    for (k, v) in &addrs {
        send.env(k, v.to_string());
    }
    let out =
        tokio::time::timeout(Duration::from_secs(60), send.output()).await.expect("send in time").expect("send runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["accepted"]["conversation_id"], "demo", "{report}");
    assert_eq!(report["run_status"], "idle", "{report}");
    let events = report["events"].as_array().expect("events");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "conv.out.message.delta")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    assert!(text.starts_with("You said: again."), "the streamed text: {text}");
    assert!(events.iter().all(|e| e["id"].is_string() && e["type"].is_string()), "CloudEvents: {report}");
    assert_eq!(events.last().map(|e| e["type"].clone()), Some("conv.out.run.status_changed".into()));

    // The console is served at / of projections, and its list sees the conversation.
    let projections = addrs[3].1;
    let page = reqwest::get(format!("http://{projections}/")).await.expect("console");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.expect("page").contains("conv console"));
    let list: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{projections}/v1/conversations"))
        .bearer_auth(&api_key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["conversations"][0]["conversation_id"], "demo", "{list}");
    // What the console sends reaches the ingress convctl up started (CONV_INGRESS_URL).
    let forwarded = reqwest::Client::new()
        .post(format!("http://{projections}/v1/conversations/demo/messages"))
        .bearer_auth(&api_key)
        .json(&serde_json::json!({"text": "through the console"}))
        .send()
        .await
        .expect("forwarded");
    assert_eq!(forwarded.status().as_u16(), 202, "{:?}", forwarded.text().await);

    // Ctrl-C: everything stops.
    let pid = up.id().expect("pid").to_string();
    tokio::process::Command::new("kill").args(["-INT", &pid]).status().await.expect("SIGINT");
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait()).await.expect("stops in time").expect("wait");
    assert!(status.success(), "{status}");
    for (name, addr) in &addrs {
        assert_eq!(http_get_status(&format!("http://{addr}/healthz")).await, None, "{name} is gone");
    }
    // No secret in any log line of the run (debug level included).
    let logs = logs.lock().expect("lock").clone();
    assert!(logs.contains("Booted.") && logs.contains("conv-effects"), "the logs were captured: {logs:.2000}");
    let admin_password = std::fs::read_to_string(&admin_env)
        .expect("admin.env")
        .lines()
        .find_map(|l| l.strip_prefix("NATS_PASSWORD=").map(str::to_owned))
        .expect("the admin password");
    for (what, secret) in [
        ("the NATS admin password", admin_password.as_str()),
        ("the client API key", api_key.as_str()),
        ("the callback secret", callback_secret.as_str()),
        ("a webhook HMAC secret", hmac_secret.as_str()),
        ("the LLM API key", llm_key.as_str()),
    ] {
        assert!(!logs.contains(secret), "{what} appears in the logs");
    }
    // The services' NATS passwords, made up by convctl up, are 64 hex digits.
    // (nats-server prints its config file's sha256, also 64 hex digits.)
    let line = logs
        .lines()
        .filter(|l| !l.contains("sha256:"))
        .find(|l| l.split(|c: char| !c.is_ascii_hexdigit()).any(|w| w.len() == 64));
    assert!(line.is_none(), "a generated password appears in the logs: {line:?}");
    let nats_addr = url.trim_start_matches("nats://");
    assert!(std::net::TcpStream::connect(nats_addr).is_err(), "the nats-server it started is gone");
}

#[tokio::test]
async fn bench_runs_and_reports_its_ratios() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(["bench", "--conversations", "3", "--turns", "2", "--aborts", "2", "--storm", "20", "--json"])
        .output()
        .await
        .expect("bench runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(r["turns"], 6);
    assert_eq!(r["aborts"], 2);
    // Every streaming conversation of the storm was canceled, each timed
    // from its abort to its `llm.canceled` in the journal.
    assert_eq!(r["storm"], 20);
    assert_eq!(r["storm_canceled"], 20, "{r}");
    // The aborts' wait in the runtime's scheduler was measured.
    assert!(r["p0_queued"].as_u64().is_some_and(|n| n >= 22), "{r}");
    for field in [
        "storm_abort_ms_p99",
        "raw_storm_ms_p99",
        "ratio_storm_vs_raw_p99",
        "turns_per_sec",
        "journal_writes_per_turn",
        "first_delta_ms_p50",
        "abort_ms_p99",
        "raw_async_publish_per_sec",
        "raw_consume_ack_per_sec",
        "ratio_writes_vs_raw_publish",
        "p0_queue_wait_ms_p99",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    assert!(r["seconds"].as_f64().is_some_and(|s| s < 120.0));
}

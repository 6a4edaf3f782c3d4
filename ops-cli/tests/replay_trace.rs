//! `convctl replay` and `convctl trace` against a journal written by a real runtime.

use std::process::Output;
use std::time::Duration;

use conv_contracts::payload::{LlmCompleted, LlmDelta, MessageReceived};
use conv_contracts::{ConversationId, Envelope};
use conv_nats::test_util::{TestNats, free_addr, spawn_service};
use conv_store::Snapshots;
use serde_json::Value;

async fn convctl(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_convctl"))
        .args(args)
        .env("NATS_URL", url)
        .output()
        .await
        .expect("run")
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[tokio::test]
async fn replay_matches_live_state_and_trace_walks_both_ways() {
    let (nats, js) = TestNats::set_up().await;
    let mut config: conv_runtime::Config = conv_nats::service::Settings::for_test(nats.config(), free_addr());
    config.options.snapshot_every = 3;
    let rt = spawn_service("conv-runtime", |t| conv_runtime::run(config, t));

    let conv = ConversationId::parse("rp1").expect("id");
    let mut events = vec![
        Envelope::new(
            "msg-1",
            "/t",
            conv.clone(),
            MessageReceived { text: "hi".into(), role: None, channel: None, sender: None },
        )
        .expect("valid event"),
    ];
    // The model's output, as the effects worker will send it: caused by the LLM directive.
    let directive = "msg-1~2";
    for i in 0..5 {
        let d = Envelope::new(
            format!("delta-{i}"),
            "/t",
            conv.clone(),
            LlmDelta { step_id: "r1.s1".into(), attempt: 1, seq: i, text: format!("w{i} ") },
        )
        .expect("valid event")
        .with_causation(Some(directive.into()), None)
        .expect("valid ids");
        events.push(d);
    }
    let done = Envelope::new(
        "done",
        "/t",
        conv.clone(),
        LlmCompleted {
            step_id: "r1.s1".into(),
            attempt: 1,
            text: "w0 w1 w2 w3 w4".into(),
            tool_calls: vec![],
            finish_reason: None,
        },
    )
    .expect("valid event")
    .with_causation(Some(directive.into()), None)
    .expect("valid ids");
    events.push(done);
    for e in &events {
        conv_nats::headers::publish(&js, e).await.expect("publish").await.expect("ack");
    }
    let url = nats.url();
    let mut report = Value::Null;
    for _ in 0..100 {
        let out = convctl(&url, &["replay", "rp1", "--json"]).await;
        if out.status.success() {
            report = json(&out);
            if report["events"] == 7 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(report["events"], 7, "{report}");
    assert_eq!(report["match"], true, "{report}");
    assert_eq!(report["live_hash"], report["replay_hash"]);
    rt.shutdown().await.expect("stop");

    let unknown = convctl(&url, &["replay", "nobody"]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no applied events"));

    // Trace a delta: its cause chain goes through the directive to the message.
    // These ids do not start with their conversation, so it is named.
    let t = json(&convctl(&url, &["trace", "delta-2", "--conversation", "rp1", "--json"]).await);
    let causes: Vec<&str> =
        t["branch"]["causes"].as_array().expect("causes").iter().map(|c| c["id"].as_str().unwrap_or("")).collect();
    assert_eq!(causes, ["msg-1", directive], "{t}");
    let unnamed = convctl(&url, &["trace", "msg-1"]).await;
    assert_eq!(unnamed.status.code(), Some(1), "msg-1 read as a conversation, which has no events");
    assert!(String::from_utf8_lossy(&unnamed.stderr).contains("--conversation"));
    // Trace the message: its effects include the marker, the directive and the deltas under it.
    let t = json(&convctl(&url, &["trace", "msg-1", "--conversation", "rp1", "--json"]).await);
    let effects = t["branch"]["event"]["effects"].as_array().expect("effects");
    let types: Vec<&str> = effects.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    assert!(types.contains(&"conv.applied.marker.recorded"), "{types:?}");
    assert!(types.contains(&"conv.effect.llm.requested"), "{types:?}");
    let llm = effects.iter().find(|e| e["id"] == directive).expect("the directive");
    assert_eq!(llm["effects"].as_array().map(Vec::len), Some(6), "five deltas and the completion: {llm}");
    let text = convctl(&url, &["trace", "msg-1", "--conversation", "rp1"]).await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("conv.in.llm.delta delta-4"));
    // The whole conversation: the message is the one root, everything under it.
    let t = json(&convctl(&url, &["trace", "rp1", "--json"]).await);
    let roots: Vec<&str> =
        t["roots"].as_array().expect("roots").iter().map(|r| r["id"].as_str().unwrap_or("")).collect();
    assert_eq!(roots, ["msg-1"], "{t}");
    let events = t["events"].as_u64().expect("count");
    assert!(events >= 7 + 3, "inputs, the directive, markers and outputs: {t}");
    // The flat list: every event with its id, in time order.
    let rows = json(&convctl(&url, &["events", "rp1", "--json"]).await);
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len() as u64, events, "the same events as the tree");
    assert_eq!(rows[0]["id"], "msg-1");
    assert!(rows.iter().any(|r| r["id"] == "delta-4" && r["causation_id"] == directive));
    let listed = String::from_utf8_lossy(&convctl(&url, &["events", "rp1"]).await.stdout).into_owned();
    assert!(listed.lines().next().is_some_and(|l| l.starts_with("TIME")), "{listed}");
    assert!(listed.contains("conv.effect.llm.requested") && listed.contains(directive), "{listed}");

    // A live state that disagrees with the journal is reported, exit 1.
    let snapshots = Snapshots::open(&js).await.expect("bucket");
    let loaded = snapshots.load("rp1").await.expect("load");
    let (mut snap, rev, mut entries) =
        (loaded.snapshot.expect("snapshot"), loaded.revision.expect("revision"), loaded.entries);
    snap.state.entries[0].text = "tampered".into();
    snap.state.retouch(0);
    snapshots.save("rp1", &mut snap, &mut entries, Some(rev)).await.expect("overwrite");
    let bad = convctl(&url, &["replay", "rp1", "--json"]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(json(&bad)["match"], false);
}

#[tokio::test]
async fn projections_verify_reports_a_view_that_differs_from_the_journal() {
    let (nats, js) = TestNats::set_up().await;
    let rc: conv_runtime::Config = conv_nats::service::Settings::for_test(nats.config(), free_addr());
    let _rt = spawn_service("conv-runtime", |t| conv_runtime::run(rc, t));
    let pc: conv_projections::Config = conv_nats::service::Settings::for_test(nats.config(), free_addr());
    let _p = spawn_service("conv-projections", |t| conv_projections::run(pc, t));
    let conv = ConversationId::parse("vf1").expect("id");
    let m = Envelope::new(
        "vf-msg",
        "/t",
        conv.clone(),
        MessageReceived { text: "hi".into(), role: None, channel: None, sender: None },
    )
    .expect("valid event");
    conv_nats::headers::publish(&js, &m).await.expect("publish").await.expect("ack");
    let url = nats.url();
    // The view catches up with the journal: verify says so.
    let mut ok = Value::Null;
    for _ in 0..100 {
        let out = convctl(&url, &["projections", "verify", "vf1", "--json"]).await;
        if out.status.success() {
            ok = json(&out);
            if ok["views"][0]["view_position"].as_u64().is_some_and(|p| p >= 3) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ok["match"], true, "{ok}");
    assert!(ok["views"][0]["view_position"].as_u64().is_some_and(|p| p >= 3), "{ok}");

    // A stored view that disagrees with the journal: exit 1, the difference named.
    let bucket = js.get_key_value(conv_nats::topology::KV_PROJECTIONS).await.expect("bucket");
    let mut view = conv_store::views::read(&bucket, "vf1").await.expect("read").expect("a view");
    view.entries[0].text = "tampered".into();
    assert!(conv_store::views::replace(&bucket, view, 0, 1 << 20).await.expect("overwrite"));
    let bad = convctl(&url, &["projections", "verify", "vf1", "--settle-secs", "0"]).await;
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stdout));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("DIFFERS") && text.contains("entry 0"), "{text}");

    // A conversation that has neither output nor a view is an error, not "ok".
    let none = convctl(&url, &["projections", "verify", "nobody"]).await;
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("nobody"));
}

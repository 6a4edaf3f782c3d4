//! The shipped NATS users and permissions (`nats/config/auth.conf`): every
//! service runs the whole pipeline with its own user, and no user can do
//! what its service does not (publish outside its subjects, read other
//! buckets, purge or delete streams); anonymous clients are refused.

use std::time::{Duration, Instant};

mod support;

use conv_nats::NatsConfig;
use conv_nats::test_util::TestNats;
use serde_json::{Value, json};

/// A user's JetStream context with a short request timeout, so that a
/// denied request fails fast.
async fn as_user(nats: &TestNats, user: &str) -> async_nats::jetstream::Context {
    let config = NatsConfig { request_timeout_ms: 1_000, ..nats.config_as(user) };
    let client = conv_nats::connect(&config, "secured-test").await.expect("connect as a service user");
    conv_nats::jetstream(client, &config)
}

/// The permission violations a secured server logged.
fn violations(nats: &TestNats) -> String {
    nats.log().lines().filter(|l| l.contains("Violation")).collect::<Vec<_>>().join("\n")
}

async fn messages(nats: &TestNats, stream: &str) -> u64 {
    let js = nats.jetstream().await;
    js.get_stream(stream).await.expect("stream").info().await.expect("info").state.messages
}

/// A JetStream publish the user may not make: refused, nothing stored.
async fn publish_refused(nats: &TestNats, user: &str, subject: &str, stream: &str) {
    let before = messages(nats, stream).await;
    let js = as_user(nats, user).await;
    let result = match js.publish(subject.to_owned(), "{}".into()).await {
        Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(result.is_err(), "{user} could publish {subject}");
    assert_eq!(messages(nats, stream).await, before, "{user}: nothing reached {stream}");
}

/// A read of a bucket the user may not read: refused.
async fn kv_read_refused(nats: &TestNats, user: &str, bucket: &str) {
    let js = as_user(nats, user).await;
    let read = async {
        let kv = js.get_key_value(bucket).await.map_err(|e| e.to_string())?;
        kv.get("any").await.map_err(|e| e.to_string())
    };
    assert!(read.await.is_err(), "{user} could read {bucket}");
}

#[tokio::test]
async fn each_service_works_with_its_own_user_and_can_do_nothing_else() {
    let nats = TestNats::start_secured().await.expect("nats-server with nats/config/auth.conf");
    nats.setup().await.expect("topology, as admin");

    // Anonymous and wrong passwords are refused.
    let anonymous = NatsConfig { url: nats.url(), ..Default::default() };
    assert!(conv_nats::connect(&anonymous, "anon").await.is_err(), "an anonymous connection was accepted");
    let wrong = NatsConfig { password: "not-it".into(), ..nats.config_as("runtime") };
    assert!(conv_nats::connect(&wrong, "wrong").await.is_err(), "a wrong password was accepted");

    // The pipeline, each service as its own user.
    let pipeline = support::Pipeline::start_on(nats, |c| {
        c.effects.options.scripted_tokens = 30;
        c.effects.options.coalesce_ms = 100;
    })
    .await;
    let (nats, ingress, projections) = (&pipeline.nats, pipeline.ingress, pipeline.projections);
    let http = reqwest::Client::new();
    let post = |conv: &str, what: &str, body: Value| {
        http.post(format!("http://{ingress}/v1/conversations/{conv}/{what}")).json(&body).send()
    };
    let timeline = |conv: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("http://{projections}/v1/conversations/{conv}/timeline")).send().await.ok()?;
            r.status().is_success().then_some(())?;
            r.json::<Value>().await.ok()
        }
    };
    let wait = async |conv: &str, what: &str, done: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = timeline(conv.to_owned()).await
                && done(&t)
            {
                return t;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; server log:\n{}", violations(nats));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let r = post("s1", "messages", json!({"text": "hello"})).await.expect("post");
    assert_eq!(r.status().as_u16(), 202);
    let t = wait("s1", "the reply", &|t| {
        t["run_status"] == "idle" && t["entries"].as_array().is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(t["entries"][1]["status"], "completed", "{t}");
    // A tool that sleeps, aborted: the runtime's hint and cancel reach effects.
    let r = post("s2", "messages", json!({"text": r#"/tool sleep {"ms": 30000}"#})).await.expect("post");
    assert_eq!(r.status().as_u16(), 202);
    wait("s2", "the tool call", &|t| t.to_string().contains("sleep")).await;
    let r = post("s2", "abort", json!({})).await.expect("post");
    assert_eq!(r.status().as_u16(), 202);
    wait("s2", "the aborted run", &|t| t["run_status"] == "aborted").await;
    let r = http.get(format!("http://{projections}/v1/conversations/s1/context")).send().await.expect("context");
    assert_eq!(r.status().as_u16(), 200, "projections reads the stored context: {}", violations(nats));
    // The console's list reads the view headers.
    let r = http.get(format!("http://{projections}/v1/conversations")).send().await.expect("list");
    assert_eq!(r.status().as_u16(), 200, "projections lists conversations: {}", violations(nats));
    let list: Value = r.json().await.expect("json");
    assert!(list["conversations"].as_array().is_some_and(|c| c.iter().any(|c| c["conversation_id"] == "s1")), "{list}");
    // Every service announced itself under its own user (for readiness).
    let announced = conv_nats::presence::list(&nats.jetstream().await).await.expect("announcements");
    for service in ["conv-ingress", "conv-runtime", "conv-effects", "conv-projections"] {
        assert!(announced.iter().any(|a| a.service == service), "{service} announced: {announced:?}");
    }
    // Doing all that (taking partitions: unpin and reset; watching leases;
    // streaming, aborting) needed nothing the users may not do.
    assert_eq!(violations(nats), "", "the services were refused something they do");

    // Reads by sequence (a KV revision, a part of a large value, a journal
    // message) go to the bare DIRECT.GET subject: a runtime that loads a
    // snapshot after a restart reads its entries so (found by `convctl chaos
    // --compose`, where the services run with these users).
    let admin_js = nats.jetstream().await;
    let entries = admin_js.get_key_value("conv_entries").await.expect("entries bucket");
    let key = futures::StreamExt::next(&mut entries.keys().await.expect("keys")).await.expect("an entry").expect("key");
    let revision = entries.entry(&key).await.expect("entry").expect("stored").revision;
    for user in ["runtime", "effects", "projections"] {
        let js = as_user(nats, user).await;
        let kv = js.get_key_value("conv_entries").await.expect("entries bucket");
        let read = kv.entry_for_revision(key.as_str(), revision).await;
        assert!(matches!(read, Ok(Some(_))), "{user} reads an entry by revision: {read:?}");
    }
    for (user, stream) in [("runtime", "CONV_IN"), ("runtime", "CONV_APPLIED"), ("projections", "CONV_APPLIED")] {
        let js = as_user(nats, user).await;
        let read = js.get_stream(stream).await.expect("stream").get_raw_message(1).await;
        assert!(read.is_ok(), "{user} reads {stream} #1 by sequence: {read:?}");
    }
    assert_eq!(violations(nats), "", "reads by sequence were refused");

    // What each user may not do.
    publish_refused(nats, "ingress", "conv.out.message.s1", "CONV_OUT").await;
    publish_refused(nats, "ingress", "conv.effect.tool.s1", "CONV_EFFECT").await;
    publish_refused(nats, "effects", "conv.out.message.s1", "CONV_OUT").await;
    publish_refused(nats, "effects", "conv.in.message.s1", "CONV_IN").await;
    publish_refused(nats, "projections", "conv.in.message.s1", "CONV_IN").await;
    publish_refused(nats, "runtime", "conv.in.message.s1", "CONV_IN").await;
    publish_refused(nats, "ingress", "conv.audit.dlq.1.redriven", "CONV_AUDIT").await;
    kv_read_refused(nats, "ingress", "conv_snapshots").await;
    kv_read_refused(nats, "ingress", "conv_projections").await;
    kv_read_refused(nats, "effects", "conv_projections").await;
    kv_read_refused(nats, "projections", "conv_timers").await;
    for user in ["ingress", "runtime", "effects", "projections"] {
        let js = as_user(nats, user).await;
        let audit = messages(nats, "CONV_AUDIT").await;
        let purged = async {
            js.get_stream("CONV_AUDIT").await.map_err(|e| e.to_string())?.purge().await.map_err(|e| e.to_string())
        };
        assert!(purged.await.is_err(), "{user} could purge CONV_AUDIT");
        assert_eq!(messages(nats, "CONV_AUDIT").await, audit);
        assert!(js.delete_stream("CONV_IN").await.is_err(), "{user} could delete CONV_IN");
    }
    // Durable consumers are admin's: no service may delete or create one.
    for user in ["runtime", "effects", "projections"] {
        let js = as_user(nats, user).await;
        let stream = js.get_stream_no_info("CONV_IN").await.expect("stream handle");
        assert!(stream.delete_consumer("runtime-p0").await.is_err(), "{user} could delete runtime-p0");
        let durable = async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(format!("{user}-sneaky")),
            ..Default::default()
        };
        assert!(stream.create_consumer(durable).await.is_err(), "{user} could create a durable consumer");
    }
    let admin_js = nats.jetstream().await;
    let mut runtime_p0: async_nats::jetstream::consumer::PullConsumer =
        admin_js.get_stream("CONV_IN").await.expect("stream").get_consumer("runtime-p0").await.expect("still there");
    assert!(runtime_p0.info().await.is_ok());

    // A cancel hint is the runtime's alone: effects and ingress cannot send one.
    let admin = nats.client().await;
    let mut hints = admin.subscribe("conv.live.cancel.>").await.expect("subscribe");
    admin.flush().await.expect("flush");
    for user in ["ingress", "effects", "projections"] {
        let client = conv_nats::connect(&nats.config_as(user), "secured-test").await.expect("connect");
        let _ = client.publish("conv.live.cancel.s1", "{}".into()).await;
        let _ = client.flush().await;
    }
    let heard = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut hints)).await;
    assert!(heard.is_err(), "a service other than the runtime sent a cancel hint");
    // Ingress cannot read the journal.
    let js = as_user(nats, "ingress").await;
    let read = conv_nats::read::all(&js, "CONV_IN", "", false).await;
    assert!(read.is_err(), "ingress could read CONV_IN");
}

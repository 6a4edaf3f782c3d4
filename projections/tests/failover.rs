//! Fast failover at the default settings, through the whole pipeline: a
//! runtime instance killed (like SIGKILL: no lease released, no goodbye)
//! is replaced and the next reply arrives within seconds; an effects
//! instance killed mid-stream has its stream resumed by the other one
//! within seconds, and the reply completes once with the same text.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use conv_contracts::payload::RunStatus;
use conv_contracts::{ConversationId, Payload};
use conv_nats::service::Settings;
use conv_nats::test_util::{
    IsolatedService, ServiceHandle, TestNats, free_addr, spawn_isolated, spawn_service, wait_http_ok,
};
use futures::StreamExt;
use support::post_message;

fn runtime(nats: &TestNats, instance: &str) -> IsolatedService {
    let mut rc: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    rc.options.instance = instance.into();
    spawn_isolated(&format!("runtime-{instance}"), |t| conv_runtime::run(rc, t))
}

fn effects(nats: &TestNats, addr: SocketAddr, tokens: usize, delay_ms: u64) -> IsolatedService {
    let mut ec: conv_effects::Config = Settings::for_test(nats.config(), addr);
    ec.options.scripted_tokens = tokens;
    ec.options.scripted_token_delay_ms = delay_ms;
    spawn_isolated(&format!("effects-{addr}"), |t| conv_effects::run(ec, t))
}

async fn until_idle(runs: &mut futures::stream::BoxStream<'static, (String, RunStatus)>, run: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, runs.next()).await;
        match next.unwrap_or_else(|_| panic!("run {run} did not end within {within:?}")) {
            Some((id, RunStatus::Idle)) if id == run => return,
            Some((id, status @ (RunStatus::Failed | RunStatus::Aborted | RunStatus::Stopped))) if id == run => {
                panic!("run {id} ended {status:?}")
            }
            Some(_) => {}
            None => panic!("subscription ended"),
        }
    }
}

/// Who holds the runtime lease of each partition.
async fn lease_holders(js: &async_nats::jetstream::Context) -> Vec<Option<String>> {
    let leases = js.get_key_value(conv_nats::topology::KV_LEASES).await.expect("bucket");
    let mut out = Vec::new();
    for p in 0..conv_contracts::subject::DEFAULT_PARTITIONS {
        out.push(leases.get(format!("p.{p}")).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned()));
    }
    out
}

#[tokio::test]
async fn a_killed_runtime_is_replaced_and_the_next_reply_comes_within_seconds() {
    let (nats, js) = TestNats::set_up().await; // default leases and ack waits
    let ingress = free_addr();
    let ic: conv_ingress::Config = Settings::for_test(nats.config(), ingress);
    let _ingress: ServiceHandle<conv_ingress::Error> = spawn_service("conv-ingress", |t| conv_ingress::run(ic, t));
    let _effects = effects(&nats, free_addr(), 8, 5);
    let a = runtime(&nats, "a");
    let _b = runtime(&nats, "b");
    assert_eq!(wait_http_ok(&format!("http://{ingress}/readyz"), Duration::from_secs(20)).await, Some(200));
    let deadline = Instant::now() + Duration::from_secs(30);
    let holders = loop {
        let h = lease_holders(&js).await;
        let count = |who: &str| h.iter().filter(|x| x.as_deref() == Some(who)).count();
        if count("a") == 8 && count("b") == 8 {
            break h;
        }
        assert!(Instant::now() < deadline, "partitions never split: {h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A conversation on one of a's partitions.
    let conv = (0..)
        .map(|i| format!("fo-{i}"))
        .find(|c| {
            let id = ConversationId::parse(c).expect("id");
            let p = conv_contracts::subject::partition_of(&id, conv_contracts::subject::DEFAULT_PARTITIONS);
            holders[usize::from(p)].as_deref() == Some("a")
        })
        .expect("a conversation of a");
    let http = reqwest::Client::new();
    let mut runs = conv_nats::test_util::run_statuses(&nats, &conv).await;
    post_message(&http, ingress, &conv, "hello").await;
    until_idle(&mut runs, "r1", Duration::from_secs(20)).await;

    a.crash();
    let killed = Instant::now();
    post_message(&http, ingress, &conv, "are you still there?").await;
    until_idle(&mut runs, "r2", Duration::from_secs(30)).await;
    let took = killed.elapsed();
    eprintln!("runtime killed: the next reply ended {took:?} later");
    // The bound of the issue is 3 s at the default settings (2 s lease,
    // 0.5 s heartbeat); generous here for a loaded test machine.
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[tokio::test]
async fn a_killed_effects_instance_mid_stream_is_resumed_by_the_other_within_seconds() {
    let (nats, js) = TestNats::set_up().await; // default ack waits and progress
    let mut rc: conv_runtime::Config = Settings::for_test(nats.config(), free_addr());
    rc.options.heartbeat_ms = 200;
    let _runtime: ServiceHandle<conv_runtime::Error> = spawn_service("conv-runtime", |t| conv_runtime::run(rc, t));
    // A reply of 150 tokens, one every 40 ms (6 s).
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let mut instances =
        vec![(addr_a, Some(effects(&nats, addr_a, 150, 40))), (addr_b, Some(effects(&nats, addr_b, 150, 40)))];
    for (addr, _) in &instances {
        assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(20)).await, Some(200));
    }
    let conv = ConversationId::parse("fx-resume").expect("id");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut live = client.subscribe(conv_contracts::subject::live_subject(&conv)).await.expect("subscribe");
    let mut m = conv_contracts::Envelope::new(
        "m1",
        "/test",
        conv.clone(),
        conv_contracts::payload::MessageReceived {
            text: "a long answer".into(),
            role: None,
            channel: None,
            sender: None,
        },
    )
    .expect("valid event");
    m = m.with_time(chrono::Utc::now());
    conv_nats::headers::publish(&js, &m).await.expect("publish").await.expect("ack");
    // Streaming: a few pieces have arrived.
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(20), live.next()).await.expect("streaming").expect("piece");
    }
    // Kill the instance that runs it.
    let http = reqwest::Client::new();
    let mut running = None;
    for (i, (addr, _)) in instances.iter().enumerate() {
        let metrics =
            http.get(format!("http://{addr}/metrics")).send().await.expect("metrics").text().await.expect("text");
        if metrics.lines().any(|l| l.starts_with("conv_effects_in_flight ") && !l.ends_with(" 0")) {
            running = Some(i);
        }
    }
    let running = running.expect("one instance runs the stream");
    if let Some(service) = instances[running].1.take() {
        service.crash();
    }
    let killed = Instant::now();
    // Drain what was in flight, then wait for the survivor's first piece.
    while tokio::time::timeout(Duration::from_millis(300), live.next()).await.is_ok() {}
    tokio::time::timeout(Duration::from_secs(30), live.next()).await.expect("the stream resumes").expect("piece");
    let took = killed.elapsed();
    eprintln!("effects killed mid-stream: streaming resumed {took:?} later");
    // The bound of the issue is 5 s at the default settings (3 s ack wait
    // kept alive by 1 s progress); generous here for a loaded test machine.
    assert!(took < Duration::from_secs(10), "{took:?}");

    // The reply completes once, its text the deltas joined.
    let deadline = Instant::now() + Duration::from_secs(30);
    let journal = loop {
        let inputs = conv_nats::test_util::inputs(&js, "fx-resume").await;
        if inputs.iter().any(|e| matches!(e.data(), Payload::LlmCompleted(_))) {
            break inputs;
        }
        assert!(Instant::now() < deadline, "the reply never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let completed: Vec<&conv_contracts::payload::LlmCompleted> = journal
        .iter()
        .filter_map(|e| match e.data() {
            Payload::LlmCompleted(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(completed.len(), 1);
    let streamed: String = journal
        .iter()
        .filter_map(|e| match e.data() {
            Payload::LlmDelta(d) => Some(d.text.as_str()),
            _ => None,
        })
        .collect();
    assert!(completed[0].text.starts_with(&streamed), "journaled chunks are a prefix of the final text");
    assert_eq!(completed[0].text.split_whitespace().count(), 150);
}

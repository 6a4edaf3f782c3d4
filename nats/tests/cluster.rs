//! The shipped 3-node cluster (`nats/config/cluster-*.conf`) with R3 streams,
//! clients given every node in `NATS_URL`: what a node loss does to the
//! journal's publish path (ingress and the services append this way) and to
//! a durable consumer.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use conv_contracts::payload::MessageReceived;
use conv_contracts::subject::STREAM_IN;
use conv_contracts::{ConversationId, Envelope};
use conv_nats::cluster::{self, NODES};
use conv_nats::journal::{self, AppendError};
use conv_nats::test_util::TestCluster;
use conv_nats::topology::TopologyConfig;
use futures::StreamExt;

/// One partition keeps the number of R3 consumers (each its own Raft group) small.
fn topology() -> TopologyConfig {
    TopologyConfig { partitions: 1, ..Default::default() }
}

fn event(run: &str, i: usize) -> (Envelope, String) {
    let conv = ConversationId::parse(&format!("{run}-c{}", i % 12)).expect("id");
    let id = format!("{run}-e{i}");
    let event = Envelope::new(
        id.clone(),
        "/cluster-test",
        conv,
        MessageReceived { text: format!("m{i}"), role: None, channel: None, sender: None },
    )
    .expect("valid event");
    (event, id)
}

/// What publishing one event took.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// First attempt to ack, over all retries.
    took: Duration,
    /// Attempts that failed before the ack.
    failures: usize,
}

/// Publishes `count` events one after another, as ingress does (retrying an
/// unavailable journal with the same message id), `gap` apart; `progress`
/// counts the acked ones.
async fn publish(
    js: jetstream::Context,
    run: &'static str,
    count: usize,
    gap: Duration,
    progress: Arc<AtomicUsize>,
) -> Vec<Sent> {
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let (event, id) = event(run, i);
        let started = Instant::now();
        let mut failures = 0;
        loop {
            match journal::append(&js, &event, &id, &[], Duration::from_secs(2)).await {
                Ok(_) => break,
                Err(AppendError::Unavailable(why)) => {
                    failures += 1;
                    assert!(started.elapsed() < Duration::from_secs(60), "event {i} not appended within 60 s: {why}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(other) => panic!("event {i} refused: {other}"),
            }
        }
        sent.push(Sent { took: started.elapsed(), failures });
        progress.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(gap).await;
    }
    sent
}

/// Every message id in `CONV_IN`, with how often it is stored.
async fn stored_ids(js: &jetstream::Context) -> HashMap<String, usize> {
    let stream = js.get_stream(STREAM_IN).await.expect("stream");
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let total = stream.get_info().await.expect("info").state.messages;
    let mut ids = HashMap::new();
    let mut messages = consumer.messages().await.expect("messages");
    let mut read = 0u64;
    while read < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream is read within 10 s")
            .expect("more messages")
            .expect("message");
        let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()).unwrap_or_default();
        *ids.entry(id).or_default() += 1;
        read += 1;
    }
    ids
}

/// Waits until `stream` has a leader and all replicas are current.
async fn wait_in_sync(js: &jetstream::Context, stream: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !cluster::stream_in_sync(js, stream).await {
        assert!(Instant::now() < deadline, "{stream} not in sync on all {NODES} nodes within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader of `stream`, waiting through an election.
async fn leader(js: &jetstream::Context, stream: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(node)) = cluster::stream_leader(js, stream).await {
            return node;
        }
        assert!(Instant::now() < deadline, "{stream} has no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the durable consumer until every one of `expected` was delivered
/// (acking each); returns how many deliveries were redeliveries.
async fn consume_all(js: jetstream::Context, expected: BTreeSet<String>) -> usize {
    let stream = js.get_stream(STREAM_IN).await.expect("stream");
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "cluster-test",
            pull::Config {
                durable_name: Some("cluster-test".into()),
                ack_wait: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .await
        .expect("durable consumer");
    let mut seen = BTreeSet::new();
    let mut repeats = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < expected.len() {
        assert!(Instant::now() < deadline, "consumer saw {} of {} within 90 s", seen.len(), expected.len());
        let Ok(mut batch) = consumer.fetch().max_messages(100).expires(Duration::from_millis(500)).messages().await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while let Some(Ok(m)) = batch.next().await {
            let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()).unwrap_or_default();
            if !seen.insert(id) {
                repeats += 1;
            }
            // A lost ack only means a redelivery, counted above.
            let _ = m.ack().await;
        }
    }
    assert_eq!(seen, expected, "the consumer delivered exactly the published events");
    repeats
}

#[tokio::test]
async fn killing_the_stream_leader_during_traffic_loses_nothing() {
    let mut nodes = TestCluster::start().await.expect("3-node cluster");
    let report = nodes.setup_with(&topology()).await.expect("R3 topology");
    assert!(report.changes.iter().all(|c| c.action == conv_nats::topology::Action::Created), "{report}");
    let js = nodes.jetstream().await;
    let info = js.get_stream(STREAM_IN).await.expect("stream").get_info().await.expect("info");
    assert_eq!(info.config.num_replicas, 3, "streams are R3");
    let victim = leader(&js, STREAM_IN).await;

    const COUNT: usize = 500;
    let expected: BTreeSet<String> = (0..COUNT).map(|i| event("lead", i).1).collect();
    let consumer = tokio::spawn(consume_all(nodes.jetstream().await, expected.clone()));
    let progress = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish(js.clone(), "lead", COUNT, Duration::from_millis(4), progress.clone()));
    while progress.load(Ordering::SeqCst) < COUNT / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes.kill(victim).expect("kill the leader");
    let killed_at = progress.load(Ordering::SeqCst);
    let sent = publisher.await.expect("publisher");
    let new_leader = leader(&js, STREAM_IN).await;
    assert_ne!(new_leader, victim, "another node leads after the kill");

    let recovery = sent.iter().map(|s| s.took).max().unwrap_or_default();
    let retried = sent.iter().filter(|s| s.failures > 0).count();
    println!(
        "stream leader conv-n{} killed after {killed_at} of {COUNT} appends: new leader conv-n{}, \
         longest append {recovery:?} (recovery time), {retried} appends retried",
        victim + 1,
        new_leader + 1
    );
    assert!(recovery < Duration::from_secs(30), "recovered within 30 s, took {recovery:?}");

    let ids = stored_ids(&js).await;
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "no event stored twice: {twice:?}");
    let stored: BTreeSet<String> = ids.into_keys().collect();
    assert_eq!(stored, expected, "every acked event is stored, nothing else");
    let repeats = consumer.await.expect("consumer");
    println!("durable consumer: all {COUNT} delivered, {repeats} redeliveries");

    // The killed node comes back and catches up.
    nodes.restart(victim).await.expect("restart");
    wait_in_sync(&js, STREAM_IN, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn a_non_leader_node_restart_is_invisible_to_clients() {
    let mut nodes = TestCluster::start().await.expect("3-node cluster");
    nodes.setup_with(&topology()).await.expect("R3 topology");
    let client = nodes.client().await;
    let js = conv_nats::jetstream(client.clone(), &nodes.config());
    wait_in_sync(&js, STREAM_IN, Duration::from_secs(30)).await;
    let lead = leader(&js, STREAM_IN).await;
    let connected = cluster::node_of(&client.server_info().server_name).expect("connected to one of ours");
    let victim = (0..NODES).find(|n| *n != lead && *n != connected).expect("a third node");

    const COUNT: usize = 300;
    let progress = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish(js.clone(), "follow", COUNT, Duration::from_millis(5), progress.clone()));
    while progress.load(Ordering::SeqCst) < COUNT / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes.kill(victim).expect("kill a follower");
    while progress.load(Ordering::SeqCst) < 2 * COUNT / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes.restart(victim).await.expect("restart the follower");
    let sent = publisher.await.expect("publisher");

    let failed = sent.iter().filter(|s| s.failures > 0).count();
    let slowest = sent.iter().map(|s| s.took).max().unwrap_or_default();
    println!("follower conv-n{} killed and restarted: {failed} appends retried, slowest {slowest:?}", victim + 1);
    assert_eq!(failed, 0, "no append failed while a follower was down");
    assert!(slowest < Duration::from_secs(2), "no append waited long: slowest {slowest:?}");
    assert_eq!(cluster::stream_leader(&js, STREAM_IN).await.expect("info"), Some(lead), "the leader stayed");
    wait_in_sync(&js, STREAM_IN, Duration::from_secs(60)).await;
    let ids = stored_ids(&js).await;
    assert_eq!(ids.len(), COUNT);
    assert!(ids.values().all(|n| *n == 1));
}

//! The topology against a real JetStream server.

use std::time::Duration;

use async_nats::jetstream;
use conv_contracts::payload::MessageReceived;
use conv_contracts::subject::{self, STREAMS};
use conv_contracts::{ConversationId, Envelope};
use conv_nats::test_util::TestNats;
use conv_nats::topology::{self, Action, Topology, TopologyConfig};

async fn nats() -> TestNats {
    match TestNats::start().await {
        Ok(n) => n,
        Err(e) => panic!("test NATS: {e}"),
    }
}

/// A server with nothing set up, and the default topology.
async fn bare() -> (TestNats, async_nats::jetstream::Context, Topology) {
    let nats = nats().await;
    let js = nats.jetstream().await;
    (nats, js, Topology::declare(&TopologyConfig::default()))
}

#[tokio::test]
async fn apply_creates_everything_then_reports_no_changes() {
    let (_nats, js, topo) = bare().await;

    let before = topology::check(&js, &topo).await.expect("check");
    assert_eq!(before.count(Action::Missing), before.changes.len(), "fresh server has nothing: {before}");

    let first = topology::apply(&js, &topo).await.expect("apply");
    assert_eq!(first.count(Action::Created), first.changes.len(), "{first}");
    for name in STREAMS {
        js.get_stream(name).await.unwrap_or_else(|e| panic!("{name} exists: {e}"));
    }
    for bucket in [
        topology::KV_SNAPSHOTS,
        topology::KV_ENTRIES,
        topology::KV_LEASES,
        topology::KV_TIMERS,
        topology::KV_PROJECTIONS,
    ] {
        js.get_key_value(bucket).await.unwrap_or_else(|e| panic!("{bucket} exists: {e}"));
    }

    let second = topology::apply(&js, &topo).await.expect("apply again");
    assert!(second.is_unchanged(), "second run changes nothing: {second}");
    assert!(second.to_string().starts_with("no changes"), "{second}");
    assert!(topology::check(&js, &topo).await.expect("check").is_unchanged());
}

#[tokio::test]
async fn drift_is_reported_and_repaired() {
    let (_nats, js, topo) = bare().await;
    topology::apply(&js, &topo).await.expect("apply");

    // Someone shortens CONV_OUT's retention by hand.
    let mut out = topo.streams.iter().find(|s| s.name == subject::STREAM_OUT).expect("declared").clone();
    out.max_age = Duration::from_secs(3600);
    js.update_stream(out).await.expect("manual update");

    let drift = topology::check(&js, &topo).await.expect("check");
    let drifted: Vec<_> = drift.changes.iter().filter(|c| c.action == Action::Drifted).collect();
    assert_eq!(drifted.len(), 1, "{drift}");
    assert_eq!(drifted[0].name, subject::STREAM_OUT);
    assert!(drifted[0].fields[0].starts_with("max_age"), "{:?}", drifted[0].fields);

    let repaired = topology::apply(&js, &topo).await.expect("apply");
    assert_eq!(repaired.count(Action::Updated), 1, "{repaired}");
    assert!(topology::check(&js, &topo).await.expect("check").is_unchanged());
}

#[tokio::test]
async fn a_leases_bucket_of_an_older_version_is_upgraded() {
    let (_nats, js, topo) = bare().await;
    // The bucket as earlier versions created it: in memory (gone after a
    // NATS restart), no expiry markers.
    let mut old = topo.kv.iter().find(|k| k.bucket == topology::KV_LEASES).expect("declared").clone();
    assert!(old.limit_markers.is_some(), "declared with limit markers");
    assert_eq!(old.storage, jetstream::stream::StorageType::File);
    old.limit_markers = None;
    old.storage = jetstream::stream::StorageType::Memory;
    js.create_key_value(old).await.expect("old bucket");
    let drift = topology::check(&js, &topo).await.expect("check");
    let leases = drift.changes.iter().find(|c| c.name == topology::KV_LEASES).expect("reported");
    assert_eq!(leases.action, Action::Drifted, "{drift}");
    assert!(leases.fields.iter().any(|f| f.starts_with("limit_markers")), "{:?}", leases.fields);
    assert!(leases.fields.iter().any(|f| f.starts_with("storage")), "{:?}", leases.fields);

    topology::apply(&js, &topo).await.expect("apply");
    assert!(topology::check(&js, &topo).await.expect("check").is_unchanged());
    let mut stream = js.get_stream("KV_conv_leases").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").config.storage, jetstream::stream::StorageType::File);
    // And an expiry is now seen by a watcher (what takeover waits for).
    let kv = js.get_key_value(topology::KV_LEASES).await.expect("bucket");
    let mut watch = kv.watch("members.>").await.expect("watch");
    kv.put("members.gone", "x".into()).await.expect("put");
    let expired = tokio::time::timeout(Duration::from_secs(10), async {
        use futures::StreamExt;
        while let Some(entry) = watch.next().await {
            let entry = entry.expect("entry");
            if entry.key == "members.gone" && entry.operation != jetstream::kv::Operation::Put {
                return entry.operation;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("the expiry is seen");
    assert_eq!(expired, jetstream::kv::Operation::Purge);
}

#[tokio::test]
async fn partition_transform_matches_the_client_side_hash() {
    let (_nats, js) = TestNats::set_up().await;
    for i in 0..40 {
        let conv = ConversationId::parse(&format!("conv-{i}")).expect("id");
        let event = Envelope::new(
            format!("e-{i}"),
            "/test",
            conv.clone(),
            MessageReceived { text: "hi".into(), role: None, channel: None, sender: None },
        )
        .expect("valid event");
        let ack = conv_nats::headers::publish(&js, &event).await.expect("publish").await.expect("ack");
        let stored = js
            .get_stream(subject::STREAM_IN)
            .await
            .expect("stream")
            .get_raw_message(ack.sequence)
            .await
            .expect("stored");
        let p = subject::partition_of(&conv, subject::DEFAULT_PARTITIONS);
        assert_eq!(stored.subject.as_str(), format!("conv.in.{p}.message.{conv}"));
        // The stored message still decodes on its stored (partitioned) subject.
        let decoded =
            conv_nats::headers::decode(&stored.subject, Some(&stored.headers), &stored.payload, Default::default())
                .expect("valid");
        assert_eq!(decoded, event);
    }
}

#[tokio::test]
async fn duplicate_event_ids_are_stored_once() {
    let (_nats, js) = TestNats::set_up().await;
    let event = Envelope::new(
        "same-id",
        "/test",
        ConversationId::parse("c1").expect("id"),
        MessageReceived { text: "hi".into(), role: None, channel: None, sender: None },
    )
    .expect("valid event");
    let first = conv_nats::headers::publish(&js, &event).await.expect("publish").await.expect("ack");
    let second = conv_nats::headers::publish(&js, &event).await.expect("publish").await.expect("ack");
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.sequence, second.sequence);
    let mut stream = js.get_stream(subject::STREAM_IN).await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
    let _: jetstream::stream::Stream = stream;
}

#[tokio::test]
async fn stray_input_subjects_land_in_the_dlq() {
    let (_nats, js) = TestNats::set_up().await;
    // Every shape under conv.in.> other than conv.in.<family>.<id> is
    // journaled in CONV_DLQ: never lost, never read by a partition worker.
    for stray in ["conv.in.nofamily", "conv.in.3.message.c1", "conv.in.message.c1.extra.tokens"] {
        let ack = js.publish(stray, "x".into()).await.expect("publish").await.expect("stored");
        assert_eq!(ack.stream, subject::STREAM_DLQ, "{stray}");
    }
    let ack = js.publish("conv.in.message.c1", "x".into()).await.expect("publish").await.expect("stored");
    assert_eq!(ack.stream, subject::STREAM_IN);
}

#[tokio::test]
async fn changed_retention_and_limits_show_as_drift_and_apply_in_place() {
    let (_nats, js) = TestNats::set_up().await;
    let changed = TopologyConfig {
        journal_max_bytes: 8 << 30,
        dlq_max_age_hours: 48,
        dlq_max_bytes: 256 << 20,
        effects_max_ack_pending: 2048,
        entries_history: 4,
        max_deliver: 6,
        ..Default::default()
    };
    changed.validate().expect("valid");
    let topo = Topology::declare(&changed);
    let drift = topology::check(&js, &topo).await.expect("check");
    let drifted: Vec<&str> =
        drift.changes.iter().filter(|c| c.action == Action::Drifted).map(|c| c.name.as_str()).collect();
    for name in ["CONV_IN", "CONV_OUT", "CONV_DLQ", "CONV_EFFECT", "effects", "conv_entries"] {
        assert!(drifted.iter().any(|d| *d == name || d.ends_with(&format!("/{name}"))), "{name} drifted: {drift}");
    }
    assert_eq!(drift.count(Action::Missing), 0);
    let dlq = drift.changes.iter().find(|c| c.name == "CONV_DLQ").expect("dlq");
    assert!(dlq.fields.iter().any(|f| f.starts_with("max_bytes")), "{:?}", dlq.fields);
    assert!(dlq.fields.iter().any(|f| f.starts_with("max_age")), "{:?}", dlq.fields);

    let applied = topology::apply(&js, &topo).await.expect("applied in place");
    assert_eq!(applied.count(Action::Updated), drift.count(Action::Drifted), "{applied}");
    assert!(topology::check(&js, &topo).await.expect("check").is_unchanged());
    let dlq = js.get_stream(subject::STREAM_DLQ).await.expect("dlq").get_info().await.expect("info").config;
    assert_eq!((dlq.max_bytes, dlq.max_age), (256 << 20, Duration::from_secs(48 * 3600)));
    let effects = js
        .get_stream(subject::STREAM_EFFECT)
        .await
        .expect("stream")
        .consumer_info("effects")
        .await
        .expect("consumer")
        .config
        .clone();
    assert_eq!((effects.max_ack_pending, effects.max_deliver), (2048, 6));
    let entries = js.get_key_value(topology::KV_ENTRIES).await.expect("bucket").status().await.expect("status");
    assert_eq!(entries.history(), 4);
}

#[tokio::test]
async fn a_write_expecting_another_last_message_is_refused_even_a_repeat() {
    let (_nats, js) = TestNats::set_up().await;
    let conv = ConversationId::parse("fence").expect("id");
    let marker = |id: &str| {
        Envelope::new(
            id,
            "/test",
            conv.clone(),
            conv_contracts::payload::Applied {
                input_id: format!("in-{id}"),
                input_type: "conv.in.message.received".into(),
                input_seq: 1,
                applied_index: 1,
                state_version: 1,
                state_hash: "h".into(),
                rules: Some(2),
            },
        )
        .expect("valid event")
    };
    let first = conv_nats::headers::publish_expecting(&js, &marker("m1"), 0).await.expect("publish");
    let first = first.await.expect("the first write on the subject expects none").sequence;
    // Another writer that still expects an empty subject is refused.
    let second = conv_nats::headers::publish_expecting(&js, &marker("m2"), 0).await.expect("publish");
    let refused = second.await.expect_err("refused");
    assert!(refused.to_string().contains("wrong last sequence"), "{refused}");
    // The expectation is checked before the dedupe: a repeat of a stored
    // write that still expects what was last before it is refused too (the
    // runtime then reloads the conversation and finds its marker stored).
    let repeat = conv_nats::headers::publish_expecting(&js, &marker("m1"), 0).await.expect("publish");
    assert!(repeat.await.is_err(), "refused, not deduped");
    let repeat = conv_nats::headers::publish_expecting(&js, &marker("m1"), first).await.expect("publish");
    let repeat = repeat.await.expect("expecting itself as the last: a duplicate");
    assert!(repeat.duplicate && repeat.sequence == first, "{repeat:?}");
    let next = conv_nats::headers::publish_expecting(&js, &marker("m3"), first).await.expect("publish");
    assert!(next.await.expect("expects the last one").sequence > first);
}

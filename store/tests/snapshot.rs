//! The snapshot store against a real NATS: revision-checked heads, entries
//! stored one by one (split when larger than a value), heads that read the
//! entry copies they name, contexts read by reference within a window.

use conv_contracts::payload::{ContextRef, EntryRole, EntryStatus};
use conv_core::snapshot::Snapshot;
use conv_core::state::{Entry, State};
use conv_nats::test_util::TestNats;
use conv_store::snapshot::{self, Snapshots};

fn entry(id: &str, role: EntryRole, text: &str) -> Entry {
    Entry {
        id: id.into(),
        role,
        text: text.into(),
        status: EntryStatus::Completed,
        tool_call_id: None,
        tool_calls: Vec::new(),
    }
}

fn snap(conv: &str, version: u64, texts: &[&str]) -> Snapshot {
    let mut state = State::new(conv);
    state.version = version;
    for (i, t) in texts.iter().enumerate() {
        state.entries.push(entry(&format!("u{i}"), EntryRole::User, t));
    }
    Snapshot { applied_seq: version, state }
}

#[tokio::test]
async fn a_stale_owner_cannot_overwrite_the_snapshot() {
    let (_nats, js) = TestNats::set_up().await;
    let snapshots = Snapshots::open(&js).await.expect("bucket");
    let mut revs = Vec::new();
    let r1 = snapshots.save("s1", &mut snap("s1", 1, &[]), &mut revs, None).await.expect("first write");
    let r2 = snapshots.save("s1", &mut snap("s1", 2, &[]), &mut revs, Some(r1)).await.expect("owner writes on");
    // The old owner still believes revision r1 is current.
    let stale = snapshots.save("s1", &mut snap("s1", 3, &[]), &mut revs, Some(r1)).await;
    assert!(matches!(stale, Err(snapshot::Error::Conflict { .. })), "{stale:?}");
    let again = snapshots.save("s1", &mut snap("s1", 3, &[]), &mut revs, None).await;
    assert!(matches!(again, Err(snapshot::Error::Conflict { .. })));
    let loaded = snapshots.load("s1").await.expect("load");
    assert_eq!((loaded.snapshot.expect("exists").state.version, loaded.revision), (2, Some(r2)));

    // An unreadable head is rebuilt from the journal and overwritten, not fought over.
    let bucket = js.get_key_value(conv_nats::topology::KV_SNAPSHOTS).await.expect("bucket");
    let r3 = bucket.put("s1", "garbage".into()).await.expect("put");
    let loaded = snapshots.load("s1").await.expect("load");
    assert!(loaded.snapshot.is_none());
    assert_eq!(loaded.revision, Some(r3));
    assert!(snapshots.save("s1", &mut snap("s1", 4, &[]), &mut Vec::new(), loaded.revision).await.is_ok());
}

#[tokio::test]
async fn entries_of_any_size_round_trip_and_only_changed_ones_are_written() {
    let (_nats, js) = TestNats::set_up().await;
    let snapshots = Snapshots::open(&js).await.expect("bucket");
    // 3 MiB in one entry: over the server's payload limit, so it is split.
    let big = "x".repeat(3 << 20);
    let mut s = snap("big", 3, &["hello", &big, "bye"]);
    let mut revs = Vec::new();
    let head = snapshots.save("big", &mut s, &mut revs, None).await.expect("save");
    assert_eq!(revs.len(), 3);
    let loaded = snapshots.load("big").await.expect("load");
    assert_eq!(loaded.snapshot.as_ref(), Some(&s));
    assert_eq!(loaded.entries, revs);

    // Change one entry: only it is written.
    let before = revs.clone();
    s.state.entries[2].text = "bye!".into();
    s.state.retouch(2);
    s.state.version = 4;
    let written = snapshots.flush("big", &mut s.state, &mut revs).await.expect("flush");
    assert_eq!(written, 1);
    assert_eq!(revs[..2], before[..2]);
    assert_ne!(revs[2], before[2]);
    snapshots.save("big", &mut s, &mut revs, Some(head)).await.expect("save");
    assert_eq!(snapshots.load("big").await.expect("load").snapshot, Some(s));
}

#[tokio::test]
async fn a_head_reads_the_entry_copies_it_names_not_later_writes() {
    let (_nats, js) = TestNats::set_up().await;
    let snapshots = Snapshots::open(&js).await.expect("bucket");
    let mut s = snap("h", 2, &["one", "two"]);
    let mut revs = Vec::new();
    let head = snapshots.save("h", &mut s, &mut revs, None).await.expect("save");

    // A later flush (an LLM step, or a stale owner) writes entries past the head.
    let mut later = s.clone();
    later.state.entries[1].text = "two, later".into();
    later.state.retouch(1);
    let mut later_revs = revs.clone();
    snapshots.flush("h", &mut later.state, &mut later_revs).await.expect("flush");

    let loaded = snapshots.load("h").await.expect("load");
    assert_eq!(loaded.revision, Some(head));
    assert_eq!(loaded.snapshot.expect("snapshot").state.entries[1].text, "two", "the copy the head names");
    // The latest copy is what a context reader sees.
    let latest = snapshots.latest_entry("h", 1).await.expect("read").expect("stored");
    assert_eq!(latest.text, "two, later");
}

#[tokio::test]
async fn a_context_is_read_by_reference_newest_first_within_the_window() {
    let (_nats, js) = TestNats::set_up().await;
    let snapshots = Snapshots::open(&js).await.expect("bucket");
    // 200 turns of 1 KiB questions and answers.
    let mut state = State::new("w");
    for i in 0..200 {
        state.entries.push(entry(&format!("u{i}"), EntryRole::User, &format!("{i:04}{}", "q".repeat(1020))));
        state.entries.push(entry(&format!("a{i}"), EntryRole::Assistant, &format!("{i:04}{}", "a".repeat(1020))));
    }
    state.entries.push(entry("streaming", EntryRole::Assistant, ""));
    let mut revs = Vec::new();
    snapshots.flush("w", &mut state, &mut revs).await.expect("flush");
    let r = ContextRef { entries: 400, version: 400 };

    let all = conv_store::context::read(&snapshots, "w", r, usize::MAX).await.expect("read");
    assert_eq!((all.messages.len(), all.dropped), (400, 0));
    assert_eq!(all.messages, conv_core::context::messages(&state.entries[..400]));

    // A 10 KiB window holds the last 10 messages.
    let windowed = conv_store::context::read(&snapshots, "w", r, 10 * 1024).await.expect("read");
    assert_eq!(windowed.messages.len(), 10);
    assert!(windowed.dropped >= 1);
    assert_eq!(windowed.messages[..], all.messages[390..]);

    // The newest message alone over the window: a clear error.
    let err = conv_store::context::read(&snapshots, "w", r, 100).await.expect_err("too small");
    assert!(err.to_string().contains("window"), "{err}");
    // An entry that was never stored: a clear error after a short wait.
    let missing = conv_store::context::read(&snapshots, "w", ContextRef { entries: 500, version: 1 }, usize::MAX).await;
    assert!(matches!(missing, Err(conv_store::context::ContextError::Missing { place: 499 })), "{missing:?}");
}

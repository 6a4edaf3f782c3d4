//! The client side of a NATS restart.

use std::time::Duration;

use conv_nats::test_util::TestNats;

#[tokio::test]
async fn a_wait_ends_when_the_connection_drops_instead_of_at_the_timeout() {
    let mut nats = TestNats::start().await.expect("test NATS");
    let client = conv_nats::connect(&nats.config(), "connection-test").await.expect("connect");
    // Something that would only end with its (long) timeout, like the ack of
    // a publish written just before the server went away.
    let waiting = tokio::spawn(conv_nats::connect::unless_disconnected(tokio::time::sleep(Duration::from_secs(60))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "ended before anything happened");
    nats.stop().await.expect("stop");
    nats.restart().await.expect("restart");
    let ended = tokio::time::timeout(Duration::from_secs(20), waiting).await.expect("ended with the disconnect");
    assert_eq!(ended.expect("task"), None, "reported as cut off by the disconnect");
    // A wait begun afterwards runs to its end.
    let done = conv_nats::connect::unless_disconnected(async { 7 }).await;
    assert_eq!(done, Some(7));
    drop(client);
}

#[tokio::test]
async fn a_server_list_connects_to_one_that_answers() {
    let nats = TestNats::start().await.expect("test NATS");
    // A port nobody listens on, then the real server (NATS_URL of a cluster).
    let closed = conv_nats::test_util::free_addr();
    let config = conv_nats::NatsConfig { url: format!("nats://{closed},{}", nats.url()), ..nats.config() };
    let client = conv_nats::connect(&config, "list-test").await.expect("connects to the one that answers");
    let js = conv_nats::jetstream(client, &config);
    assert!(js.query_account().await.is_ok(), "JetStream answers through it");
}

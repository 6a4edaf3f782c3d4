//! The binary boots against NATS, serves its health endpoints and stops cleanly on SIGTERM.

use conv_nats::test_util::{TestNats, free_addr};

#[tokio::test]
async fn binary_boots_and_stops_on_sigterm() {
    let nats = TestNats::start().await.expect("test NATS");
    let addr = free_addr();
    conv_nats::test_util::assert_binary_boots_and_stops(
        env!("CARGO_BIN_EXE_conv-ingress"),
        addr,
        &[("NATS_URL", nats.url()), ("CONV_INGRESS_ADDR", addr.to_string())],
    )
    .await;
}

//! The service skeleton: readiness follows NATS and the topology; the
//! binary stops cleanly on SIGTERM and exits when its address is taken.

use std::time::Duration;

use conv_nats::service::Settings;
use conv_nats::test_util::{TestNats, free_addr, http_get_status, spawn_service, wait_http_ok};

async fn body(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

#[tokio::test]
async fn readiness_follows_nats_and_topology() {
    let mut nats = TestNats::start().await.expect("test NATS");
    let addr = free_addr();
    let service =
        spawn_service("conv-runtime", |token| conv_runtime::run(Settings::for_test(nats.config(), addr), token));
    let base = format!("http://{addr}");
    assert_eq!(wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(10)).await, Some(200));

    // Connected, but no topology yet.
    let ready = body(&format!("{base}/readyz")).await;
    assert!(ready.contains("missing streams: CONV_IN"), "{ready}");
    assert_eq!(http_get_status(&format!("{base}/readyz")).await, Some(503));

    nats.setup().await.expect("topology");
    assert_eq!(wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(10)).await, Some(200));
    let metrics = body(&format!("{base}/metrics")).await;
    assert!(metrics.contains("conv_ready 1"), "{metrics}");
    assert!(metrics.contains("conv_nats_connected 1"), "{metrics}");
    assert!(metrics.contains(r#"conv_service_info{service="conv-runtime""#), "{metrics}");

    // NATS goes away: still alive, no longer ready.
    nats.stop().await.expect("stop NATS");
    let mut status = None;
    for _ in 0..100 {
        status = http_get_status(&format!("{base}/readyz")).await;
        if status == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, Some(503));
    assert_eq!(http_get_status(&format!("{base}/healthz")).await, Some(200));

    // ...and ready again once it is back.
    nats.restart().await.expect("restart NATS");
    assert_eq!(wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(20)).await, Some(200));
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn boots_without_nats_and_reports_not_ready() {
    let addr = free_addr();
    let nowhere =
        conv_nats::NatsConfig { url: format!("nats://127.0.0.1:{}", free_addr().port()), ..Default::default() };
    let service = spawn_service("conv-runtime", |token| conv_runtime::run(Settings::for_test(nowhere, addr), token));
    let base = format!("http://{addr}");
    assert_eq!(wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(10)).await, Some(200));
    assert_eq!(http_get_status(&format!("{base}/readyz")).await, Some(503));
    let ready = body(&format!("{base}/readyz")).await;
    assert!(ready.contains(r#""name":"nats","ok":false"#), "{ready}");
    service.shutdown().await.expect("clean shutdown");
}

conv_nats::binary_boot_tests!(env!("CARGO_BIN_EXE_conv-runtime"), "CONV_RUNTIME_ADDR");

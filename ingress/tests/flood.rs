//! Memory after a connection flood, measured on the real `conv-ingress`
//! binary (its allocator is part of what is tested): rounds of thousands of
//! connections that send half a request head and stop; once the header
//! timeout has closed them, resident memory falls back to about the idle
//! figure instead of staying at the peak.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conv_nats::test_util::{TestNats, free_addr, open_files_limit, wait_http_ok};

/// Resident memory of `pid` in MiB (`VmRSS` of `/proc/<pid>/status`).
fn resident_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn resident_memory_returns_to_the_idle_figure_after_a_connection_flood() {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let addr = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_conv-ingress"))
        .env("NATS_URL", nats.url())
        .env("CONV_INGRESS_ADDR", addr.to_string())
        .env("CONV_HTTP_HEADER_TIMEOUT_MS", "1000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("conv-ingress");
    let ingress = Killed(child);
    let pid = ingress.0.id();
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(30)).await, Some(200));
    // Idle after some ordinary requests.
    let http = reqwest::Client::new();
    for _ in 0..20 {
        let r = http
            .post(format!("http://{addr}/v1/conversations/flood-idle/messages"))
            .json(&serde_json::json!({"text": "warm up"}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 202);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = resident_mib(pid);

    let n = 3_000.min(open_files_limit().saturating_sub(200));
    assert!(n >= 500, "too few open files allowed to test a flood");
    let mut peak: f64 = idle;
    for _round in 0..3 {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            // A blocking socket on purpose: connect and write from a plain
            // thread-less loop, like a flooding client.
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"POST /v1/conversations/x/messages HTTP/1.1\r\nHost: x\r\n").expect("half a head");
            held.push(s);
        }
        peak = peak.max(resident_mib(pid));
        // The header timeout closes every one of them.
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &held {
            s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
                .expect("timeout");
            let mut buf = [0u8; 16];
            let closed = matches!(std::io::Read::read(&mut &*s, &mut buf), Ok(0) | Err(_));
            assert!(closed, "a flooding connection was served");
        }
        drop(held);
    }
    // The flood did cost memory while it lasted...
    assert!(peak - idle >= 10.0, "the flood did not show in memory: idle {idle:.1} MiB, peak {peak:.1} MiB");
    // ...and that memory is given back (not only reused by the next flood).
    let bound = idle * 1.2 + 2.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = resident_mib(pid);
    while now > bound {
        assert!(
            Instant::now() < deadline,
            "resident memory stayed at {now:.1} MiB after the flood (idle {idle:.1}, peak {peak:.1}, bound {bound:.1})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = resident_mib(pid);
    }
    eprintln!("idle {idle:.1} MiB, peak {peak:.1} MiB, after {now:.1} MiB");
    // Still serving.
    let r = http.get(format!("http://{addr}/readyz")).send().await.expect("request");
    assert_eq!(r.status().as_u16(), 200);
}

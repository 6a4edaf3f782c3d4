//! Benchmark (not a test): events per second accepted through the HTTP
//! ingress, next to raw JetStream publishing with async-nats on the same
//! server in the same run. Reports ratios, since absolute numbers on a shared
//! 2-core machine are noise.
//!
//! cargo run --release -p conv-ingress --example bench_ingress -- [events] [concurrency]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conv_ingress::Config;
use conv_nats::service::Settings;
use conv_nats::test_util::{TestNats, free_addr, spawn_service, wait_http_ok};
use tokio::sync::Semaphore;

const BODY: &str = r#"{"text":"a benchmark message of ordinary length, about sixty bytes"}"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Run {
    name: &'static str,
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, baseline: Option<&Run>) {
        let mut l = self.latencies.clone();
        l.sort();
        let ratio = baseline.map(|b| format!("  ratio {:.2}", self.rate() / b.rate())).unwrap_or_default();
        println!(
            "{:<44} {:>9.0} events/s  p50 {:>7.2} ms  p99 {:>7.2} ms{ratio}",
            self.name,
            self.rate(),
            percentile(&l, 0.50).as_secs_f64() * 1e3,
            percentile(&l, 0.99).as_secs_f64() * 1e3,
        );
    }
}

/// `concurrency` tasks, each calling `request(task, i)` `events /
/// concurrency` times one after another; the latency of every call.
async fn closed_loop<F, Fut>(name: &'static str, events: usize, concurrency: usize, request: F) -> Run
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per = events / concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let s = Instant::now();
                request(t, i).await;
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    Run { name, events: per * concurrency, elapsed: started.elapsed(), latencies }
}

/// Raw JetStream: `concurrency` tasks, each publish → await ack, like ingress does per request.
async fn raw_request_shaped(js: &async_nats::jetstream::Context, events: usize, concurrency: usize, tag: &str) -> Run {
    let (js, tag) = (js.clone(), tag.to_owned());
    closed_loop("raw JetStream publish+ack, same concurrency", events, concurrency, move |t, i| {
        let (js, tag) = (js.clone(), tag.clone());
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{tag}-{t}-{i}").as_str());
            let ack = js
                .publish_with_headers(format!("conv.in.message.bench-{t}"), h, Bytes::from_static(BODY.as_bytes()))
                .await
                .expect("publish");
            ack.await.expect("ack");
        }
    })
    .await
}

/// Raw JetStream, pipelined: async publish with a window of outstanding acks.
async fn raw_pipelined(js: &async_nats::jetstream::Context, events: usize, window: usize) -> Run {
    let permits = Arc::new(Semaphore::new(window));
    let started = Instant::now();
    let mut acks = Vec::with_capacity(events);
    for i in 0..events {
        let permit = permits.clone().acquire_owned().await.expect("permit");
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("pipe-{i}").as_str());
        let ack = js
            .publish_with_headers(format!("conv.in.message.bench-{}", i % 64), h, Bytes::from_static(BODY.as_bytes()))
            .await
            .expect("publish");
        acks.push(tokio::spawn(async move {
            ack.await.expect("ack");
            drop(permit);
        }));
    }
    for a in acks {
        a.await.expect("ack task");
    }
    Run { name: "raw JetStream async publish (pipelined)", events, elapsed: started.elapsed(), latencies: Vec::new() }
}

/// The HTTP ingress: `concurrency` clients, each POST → 202.
async fn http(base: &str, events: usize, concurrency: usize) -> Run {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().expect("client");
    let base = base.to_owned();
    closed_loop("conv-ingress HTTP POST /messages → 202", events, concurrency, move |t, _| {
        let (client, url) = (client.clone(), format!("{base}/v1/conversations/bench-{t}/messages"));
        async move {
            let resp =
                client.post(&url).header("content-type", "application/json").body(BODY).send().await.expect("request");
            assert_eq!(resp.status().as_u16(), 202);
            let _ = resp.bytes().await;
        }
    })
    .await
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);

    let nats = TestNats::start_process().await.expect("nats-server (scripts/ensure-nats.sh installs it)");
    nats.setup().await.expect("topology");
    let js = nats.jetstream().await;
    let addr = free_addr();
    let config: Config = Settings::for_test(nats.config(), addr);
    let ingress = spawn_service("conv-ingress", |token| conv_ingress::run(config, token));
    wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(15)).await;
    let base = format!("http://{addr}");

    println!("conv-ingress benchmark: {events} events, concurrency {concurrency}, nats-server {}", nats.url());
    // Warm up both paths.
    let _ = raw_request_shaped(&js, 2_000, concurrency, "warm").await;
    let _ = http(&base, 2_000, concurrency).await;

    let raw = raw_request_shaped(&js, events, concurrency, "raw").await;
    let ingress_run = http(&base, events, concurrency).await;
    let pipelined = raw_pipelined(&js, events, 1024).await;
    println!();
    raw.print(None);
    ingress_run.print(Some(&raw));
    pipelined.print(None);
    println!(
        "\ningress / raw publish+ack (same concurrency): {:.2}\ningress / raw pipelined async publish:       {:.2}",
        ingress_run.rate() / raw.rate(),
        ingress_run.rate() / pipelined.rate()
    );
    let _ = ingress.shutdown().await;
}

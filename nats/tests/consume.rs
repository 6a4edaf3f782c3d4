//! The consume loop's ack discipline against a real JetStream server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use conv_contracts::subject::STREAM_DLQ;
use conv_nats::consume::{self, HandlerError, Options};
use conv_nats::test_util::TestNats;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "CONV_EFFECT";

async fn setup(
    max_deliver: i64,
    ack_wait: Duration,
) -> (TestNats, jetstream::Context, jetstream::consumer::PullConsumer) {
    let (nats, js) = TestNats::set_up().await;
    let stream = js.get_stream(STREAM).await.expect("stream");
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("test-worker".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver,
            ack_wait,
            ..Default::default()
        })
        .await
        .expect("consumer");
    (nats, js, consumer)
}

async fn publish(js: &jetstream::Context, n: usize) {
    for i in 0..n {
        js.publish(format!("conv.effect.llm.c{i}"), format!("{i}").into()).await.expect("publish").await.expect("ack");
    }
}

/// Waits until `CONV_DLQ` holds `n` messages and returns their subjects.
async fn dlq_subjects(js: &jetstream::Context, n: u64) -> Vec<String> {
    let mut dlq = js.get_stream(STREAM_DLQ).await.expect("dlq");
    for _ in 0..200 {
        if dlq.info().await.expect("info").state.messages >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut subjects = Vec::new();
    for seq in 1..=dlq.info().await.expect("info").state.last_sequence {
        if let Ok(m) = dlq.get_raw_message(seq).await {
            subjects.push(m.subject.to_string());
        }
    }
    subjects
}

/// Runs the consume loop over `consumer` in a task. `handler` gets each
/// message, how many calls came before it and the loop's shutdown token
/// (cancel it to stop the loop). Returns the task, that token and the
/// number of calls.
async fn spawn_loop<H, Fut>(
    consumer: &jetstream::consumer::PullConsumer,
    options: Options,
    handler: H,
) -> (tokio::task::JoinHandle<consume::Stats>, CancellationToken, Arc<AtomicU32>)
where
    H: Fn(jetstream::Message, u32, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let shutdown = CancellationToken::new();
    let calls = Arc::new(AtomicU32::new(0));
    let (counted, stop) = (calls.clone(), shutdown.clone());
    let messages = consumer.messages().await.expect("messages");
    let run = tokio::spawn(consume::run(
        messages,
        move |m| handler(m, counted.fetch_add(1, Ordering::SeqCst), stop.clone()),
        options,
        shutdown.clone(),
    ));
    (run, shutdown, calls)
}

#[tokio::test]
async fn ok_acks_and_poison_terms_into_the_dlq() {
    let (_nats, js, consumer) = setup(5, Duration::from_secs(30)).await;
    publish(&js, 3).await;
    let (run, _, _) = spawn_loop(&consumer, Options::default(), |m, before, stop| async move {
        if before + 1 == 3 {
            stop.cancel();
        }
        if m.payload.as_ref() == b"1" { Err(HandlerError::Poison("payload 1 is poison".into())) } else { Ok(()) }
    })
    .await;
    let stats = tokio::time::timeout(Duration::from_secs(20), run).await.expect("finishes").expect("no panic");
    assert_eq!((stats.acked, stats.termed, stats.naked), (2, 1, 0));

    let subjects = dlq_subjects(&js, 1).await;
    assert_eq!(subjects, vec![format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{STREAM}.test-worker")]);
    let mut consumer = consumer;
    let info = consumer.info().await.expect("info");
    assert_eq!(info.ack_floor.stream_sequence, 3, "everything settled");
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn transient_failures_retry_until_max_deliver_then_dead_letter() {
    let (_nats, js, consumer) = setup(3, Duration::from_secs(30)).await;
    publish(&js, 1).await;
    let opts =
        Options { nak_min: Duration::from_millis(20), nak_max: Duration::from_millis(100), ..Default::default() };
    let (run, shutdown, attempts) =
        spawn_loop(&consumer, opts, |_, _, _| async { Err(HandlerError::Transient("dependency down".into())) }).await;
    let subjects = dlq_subjects(&js, 1).await;
    assert_eq!(subjects, vec![format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.test-worker")]);
    // Nothing is delivered after max_deliver.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    shutdown.cancel();
    let stats = run.await.expect("no panic");
    assert_eq!(stats.naked, 3);
    assert_eq!(stats.acked, 0);
}

#[tokio::test]
async fn progress_keeps_long_work_from_being_redelivered() {
    let (_nats, js, consumer) = setup(5, Duration::from_secs(1)).await;
    publish(&js, 1).await;
    let opts = Options { progress_every: Duration::from_millis(250), ..Default::default() };
    let (run, _, deliveries) = spawn_loop(&consumer, opts, |_, _, stop| async move {
        // Three times the ack wait.
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        Ok(())
    })
    .await;
    let stats = tokio::time::timeout(Duration::from_secs(20), run).await.expect("finishes").expect("no panic");
    assert_eq!(stats.acked, 1);
    assert_eq!(deliveries.load(Ordering::SeqCst), 1);
    let mut consumer = consumer;
    let info = consumer.info().await.expect("info");
    assert_eq!(info.num_redelivered, 0, "never redelivered");
    assert_eq!(info.num_ack_pending, 0);
    // The message was seen exactly once by a fresh reader too.
    let mut again =
        consumer.fetch().max_messages(1).expires(Duration::from_millis(300)).messages().await.expect("fetch");
    assert!(again.next().await.is_none());
}

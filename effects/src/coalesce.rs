//! The durable lane's batching of a streamed answer: text waits until its
//! oldest byte is `max_delay` old or `max_bytes` wait, whichever comes
//! first — also when the provider goes quiet, so a pause in the answer does
//! not hold journaled text back (the stream loop sleeps until
//! [`Coalescer::deadline`]). On tokio's clock, so tests run on paused time.

use std::time::Duration;

use tokio::time::Instant;

/// When buffered text is journaled as an `llm.delta` chunk: once the
/// oldest unjournaled byte is `max_delay` old or `max_bytes` wait. Every
/// piece of text also goes out at once on the live lane.
#[derive(Debug, Clone)]
pub struct Coalesce {
    pub max_delay: Duration,
    pub max_bytes: usize,
}

/// Text on its way to the journal.
#[derive(Debug)]
pub struct Coalescer {
    limits: Coalesce,
    buffer: String,
    /// When the oldest buffered byte arrived.
    since: Option<Instant>,
}

impl Coalescer {
    pub fn new(limits: Coalesce) -> Self {
        Self { limits, buffer: String::new(), since: None }
    }

    /// Buffers `text` (arrived now).
    pub fn push(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.buffer.push_str(text);
        self.since.get_or_insert_with(Instant::now);
    }

    /// When the buffered text is due by age (`None`: nothing buffered).
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|at| at + self.limits.max_delay)
    }

    /// The text to journal now, if it is due (by age or by size).
    pub fn take_due(&mut self) -> Option<String> {
        let due = self.deadline().is_some_and(|at| Instant::now() >= at) || self.buffer.len() >= self.limits.max_bytes;
        (due && !self.buffer.is_empty()).then(|| self.take_rest())
    }

    /// Everything buffered (the end of the answer goes into `completed`).
    pub fn take_rest(&mut self) -> String {
        self.since = None;
        std::mem::take(&mut self.buffer)
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
pub async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coalescer() -> Coalescer {
        Coalescer::new(Coalesce { max_delay: Duration::from_millis(3000), max_bytes: 10 })
    }

    #[tokio::test(start_paused = true)]
    async fn text_waits_until_its_oldest_byte_is_old_enough() {
        let mut c = coalescer();
        assert_eq!((c.deadline(), c.take_due()), (None, None), "nothing buffered, nothing due");
        c.push("ab");
        let deadline = c.deadline().expect("a deadline");
        tokio::time::advance(Duration::from_millis(2000)).await;
        c.push("cd");
        assert_eq!(c.deadline(), Some(deadline), "the oldest byte sets the deadline");
        assert_eq!(c.take_due(), None);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(c.take_due(), None, "1 ms early");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(c.take_due().as_deref(), Some("abcd"));
        assert_eq!((c.deadline(), c.take_due()), (None, None), "the deadline goes with the text");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_provider_does_not_hold_text_back() {
        let mut c = coalescer();
        c.push("hello");
        // The stream loop sleeps until the deadline when no chunk comes.
        let started = Instant::now();
        until(c.deadline()).await;
        assert_eq!(started.elapsed(), Duration::from_millis(3000));
        assert_eq!(c.take_due().as_deref(), Some("hello"));
        let never = tokio::time::timeout(Duration::from_secs(3600), until(c.deadline())).await;
        assert!(never.is_err(), "with nothing buffered there is nothing to wake for");
    }

    #[tokio::test(start_paused = true)]
    async fn enough_bytes_are_due_at_once() {
        let mut c = coalescer();
        c.push("0123456");
        assert_eq!(c.take_due(), None);
        c.push("789");
        assert_eq!(c.take_due().as_deref(), Some("0123456789"), "10 bytes wait: due without waiting");
        c.push("x");
        assert_eq!(c.take_rest(), "x");
        assert_eq!(c.take_rest(), "");
    }
}

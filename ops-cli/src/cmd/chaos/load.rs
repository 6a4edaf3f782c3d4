//! The traffic of a chaos run, through the HTTP API like any client: post a
//! message (with an `Idempotency-Key`, retried on any instance until it is
//! accepted), wait for the reply in the timeline, post the next.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One accepted message and how long its reply took.
#[derive(Debug, Clone)]
pub struct Turn {
    pub conversation: String,
    pub event_id: String,
    /// When the first post attempt was made.
    pub started: Instant,
    /// From the first post attempt to the reply in the timeline; `None`:
    /// no reply within the deadline.
    pub reply: Option<Duration>,
    /// Event ids of the retries asked for after visible failures.
    pub retries: Vec<String>,
}

/// A client of the stack's ingress and projections instances.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    ingress: Vec<SocketAddr>,
    projections: Vec<SocketAddr>,
    /// Sent as `Authorization: Bearer` where the stack requires a key.
    api_key: Option<String>,
}

/// Why a message was not accepted at all.
#[derive(Debug, Clone)]
pub struct Refused(pub String);

impl Client {
    pub fn new(
        ingress: Vec<SocketAddr>,
        projections: Vec<SocketAddr>,
        api_key: Option<String>,
    ) -> Result<Self, crate::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(crate::Error::http("an HTTP client"))?;
        Ok(Self { http, ingress, projections, api_key })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Posts `text` with `key` until an instance accepts it (202), trying
    /// the instances in turn; gives up at `deadline`. Returns the event id.
    pub async fn post(&self, conv: &str, key: &str, text: &str, deadline: Instant) -> Result<String, Refused> {
        self.send(conv, "messages", key, &json!({ "text": text }), deadline).await
    }

    /// Asks to re-run the failed step (`POST /retry`), like [`Client::post`].
    pub async fn retry(&self, conv: &str, key: &str, deadline: Instant) -> Result<String, Refused> {
        self.send(conv, "retry", key, &json!({}), deadline).await
    }

    async fn send(
        &self,
        conv: &str,
        what: &str,
        key: &str,
        body: &Value,
        deadline: Instant,
    ) -> Result<String, Refused> {
        let mut last = String::new();
        for attempt in 0usize.. {
            let addr = self.ingress[attempt % self.ingress.len()];
            let sent = self
                .authorized(self.http.post(format!("http://{addr}/v1/conversations/{conv}/{what}")))
                .header("Idempotency-Key", key)
                .json(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().as_u16() == 202 => {
                    let body: Value =
                        r.json().await.map_err(|e| Refused(format!("202 with an unreadable body: {e}")))?;
                    return body["event_id"]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| Refused(format!("202 without event_id: {body}")));
                }
                // Retrying cannot fix these.
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 && r.status().as_u16() != 408 => {
                    let status = r.status();
                    return Err(Refused(format!("{status}: {}", r.text().await.unwrap_or_default())));
                }
                Ok(r) => last = r.status().to_string(),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Refused(format!("not accepted before the deadline; last: {last}")))
    }

    /// The stored timeline from any projections instance.
    pub async fn timeline(&self, conv: &str) -> Option<Value> {
        for addr in &self.projections {
            let get = self.authorized(self.http.get(format!("http://{addr}/v1/conversations/{conv}/timeline")));
            if let Ok(r) = get.send().await
                && r.status().is_success()
                && let Ok(v) = r.json::<Value>().await
            {
                return Some(v);
            }
        }
        None
    }

    /// Waits until the timeline shows `turns` user messages, each answered,
    /// and the run idle. False at `deadline`.
    pub async fn wait_answered(&self, conv: &str, turns: usize, deadline: Instant) -> bool {
        loop {
            if let Some(t) = self.timeline(conv).await
                && answered(&t) == Some(turns)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The number of user messages when every one of them is answered by a
/// completed assistant entry and the run is idle; `None` otherwise.
pub fn answered(timeline: &Value) -> Option<usize> {
    if timeline["run_status"] != "idle" {
        return None;
    }
    let entries = timeline["entries"].as_array()?;
    let mut users = 0;
    let mut waiting = false;
    for e in entries {
        match e["role"].as_str() {
            Some("user") => {
                if waiting {
                    return None;
                }
                users += 1;
                waiting = true;
            }
            Some("assistant") if e["status"] == "completed" => waiting = false,
            _ => {}
        }
    }
    (!waiting).then_some(users)
}

/// Sends message `n` of `conv` (idempotency key from both) and waits for
/// its reply: the turn, and a problem when it was not accepted or got no
/// reply by `deadline`. A step that failed visibly (the run `failed`, as a
/// provider that drops the connection makes it) is retried as a user would,
/// once per failure; the retries are in the turn.
pub async fn turn(client: &Client, conv: &str, n: usize, deadline: Instant) -> (Option<Turn>, Option<String>) {
    let started = Instant::now();
    let key = format!("{conv}-turn-{n}");
    let event_id = match client.post(conv, &key, &format!("turn {n} of {conv}"), deadline).await {
        Ok(id) => id,
        Err(Refused(why)) => return (None, Some(format!("{conv}: message {n} not accepted: {why}"))),
    };
    let mut turn = Turn { conversation: conv.to_owned(), event_id, started, reply: None, retries: Vec::new() };
    let mut asked = std::collections::HashSet::new();
    loop {
        if let Some(t) = client.timeline(conv).await {
            if answered(&t) == Some(n) {
                turn.reply = Some(started.elapsed());
                return (Some(turn), None);
            }
            // Once per failure: the count names it (it covers the whole
            // conversation, and a view that lags shows one failure twice).
            let failures = failed_steps(&t);
            if t["run_status"] == "failed" && asked.insert(failures) {
                match client.retry(conv, &format!("{key}-retry-{failures}"), deadline).await {
                    Ok(id) => turn.retries.push(id),
                    Err(Refused(why)) => {
                        return (Some(turn), Some(format!("{conv}: retry of message {n} not accepted: {why}")));
                    }
                }
            }
        }
        if Instant::now() > deadline {
            let problem = format!("{conv}: no reply to message {n} within {:?}", deadline - started);
            return (Some(turn), Some(problem));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Assistant entries that failed (a model call that broke).
fn failed_steps(timeline: &Value) -> usize {
    timeline["entries"]
        .as_array()
        .map_or(0, |e| e.iter().filter(|e| e["role"] == "assistant" && e["status"] == "failed").count())
}

/// Drives one conversation: at least `min_turns` messages, and more while
/// `keep_going` says so; each waits for its reply (at most `reply_deadline`).
pub async fn conversation(
    client: Client,
    conv: String,
    min_turns: usize,
    keep_going: impl Fn() -> bool,
    reply_deadline: Duration,
) -> (Vec<Turn>, Vec<String>) {
    let (mut turns, mut problems) = (Vec::new(), Vec::new());
    for n in 1usize.. {
        if n > min_turns && !keep_going() {
            break;
        }
        let (done, problem) = turn(&client, &conv, n, Instant::now() + reply_deadline).await;
        turns.extend(done);
        if let Some(p) = problem {
            problems.push(p);
            break;
        }
    }
    (turns, problems)
}

/// Waits for every conversation task: all their turns and problems, in
/// task order.
pub async fn join(
    talkers: Vec<tokio::task::JoinHandle<(Vec<Turn>, Vec<String>)>>,
) -> Result<(Vec<Turn>, Vec<String>), crate::Error> {
    let (mut turns, mut problems) = (Vec::new(), Vec::new());
    for t in talkers {
        let (done, found) = t.await.map_err(|e| crate::Error::Failed(format!("a conversation task failed: {e}")))?;
        turns.extend(done);
        problems.extend(found);
    }
    Ok((turns, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_counts_only_fully_answered_idle_timelines() {
        let t = |run: &str, entries: Value| json!({"run_status": run, "entries": entries});
        let user = json!({"role": "user", "status": "completed"});
        let done = json!({"role": "assistant", "status": "completed"});
        let streaming = json!({"role": "assistant", "status": "streaming"});
        assert_eq!(answered(&t("idle", json!([]))), Some(0));
        assert_eq!(answered(&t("idle", json!([user, done, user, done]))), Some(2));
        assert_eq!(answered(&t("running", json!([user, done]))), None);
        assert_eq!(answered(&t("idle", json!([user, streaming]))), None);
        assert_eq!(answered(&t("idle", json!([user, user, done]))), None, "a message without its own reply");
        assert_eq!(answered(&t("idle", json!([user]))), None);
    }
}

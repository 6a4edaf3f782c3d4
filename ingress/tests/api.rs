//! The ingress HTTP and NATS APIs against a real JetStream server.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use conv_contracts::subject::{self, STREAM_IN};
use conv_contracts::trust::{self, CallbackTarget};
use conv_contracts::{ConversationId, EventType};
use conv_ingress::{Config, IngressOptions};
use conv_nats::service::Settings;
use conv_nats::test_util::{ServiceHandle, TestNats, free_addr, open_files_limit, wait_http_ok};
use serde_json::{Value, json};

struct Stack {
    nats: TestNats,
    addr: SocketAddr,
    http: reqwest::Client,
    _ingress: ServiceHandle<conv_ingress::Error>,
}

/// The callback secret of the test stacks.
const SECRET: &str = "test-callback-secret-0123456789";

fn options() -> IngressOptions {
    IngressOptions { callback_secret: SECRET.into(), ..Default::default() }
}

/// The callback token of an effect of conversation `conv`.
fn token(conv: &str, target: CallbackTarget<'_>) -> String {
    trust::callback_token(SECRET.as_bytes(), &ConversationId::parse(conv).expect("id"), target)
}

fn tool_token(conv: &str, tool_call_id: &str) -> String {
    token(conv, CallbackTarget::Tool { tool_call_id })
}

async fn start() -> Stack {
    start_with(options()).await
}

async fn start_with(options: IngressOptions) -> Stack {
    start_configured(|config| config.options = options).await
}

/// Ingress with the test options, changed by `customize`; ready.
async fn start_configured(customize: impl FnOnce(&mut Config)) -> Stack {
    let nats = TestNats::start().await.expect("test NATS");
    nats.setup().await.expect("topology");
    let addr = free_addr();
    let mut config: Config = Settings::for_test(nats.config(), addr);
    config.options = options();
    customize(&mut config);
    let ingress = conv_nats::test_util::spawn_service("conv-ingress", |token| conv_ingress::run(config, token));
    assert_eq!(wait_http_ok(&format!("http://{addr}/readyz"), Duration::from_secs(15)).await, Some(200));
    Stack { nats, addr, http: reqwest::Client::new(), _ingress: ingress }
}

impl Stack {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    async fn in_count(&self) -> u64 {
        let mut s = self.nats.jetstream().await.get_stream(STREAM_IN).await.expect("stream");
        s.info().await.expect("info").state.messages
    }

    async fn stored(&self, seq: u64) -> jetstream::message::StreamMessage {
        let js = self.nats.jetstream().await;
        js.get_stream(STREAM_IN).await.expect("stream").get_raw_message(seq).await.expect("stored")
    }
}

fn header<'a>(m: &'a jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn a_message_is_journaled_with_the_right_headers() {
    let s = start().await;
    let (status, body, _) = s.post("/v1/conversations/demo/messages", json!({"text": "hello", "channel": "web"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["conversation_id"], "demo");
    assert_eq!(body["duplicate"], false);
    let event_id = body["event_id"].as_str().expect("event_id").to_owned();
    let seq = body["stream_seq"].as_u64().expect("stream_seq");

    let m = s.stored(seq).await;
    let p = subject::partition_of(&ConversationId::parse("demo").expect("id"), 16);
    assert_eq!(m.subject.as_str(), format!("conv.in.{p}.message.demo"));
    // Deduped by (conversation, source, id), in a namespace of its own.
    let demo = ConversationId::parse("demo").expect("id");
    let msg_id = trust::ingress_msg_id(&demo, "/conv/ingress/http", &event_id);
    assert_eq!(header(&m, "Nats-Msg-Id"), Some(msg_id.as_str()));
    assert_eq!(header(&m, "ce-id"), Some(event_id.as_str()));
    assert_eq!(header(&m, "ce-specversion"), Some("1.0"));
    assert_eq!(header(&m, "ce-type"), Some("conv.in.message.received"));
    assert_eq!(header(&m, "ce-subject"), Some("demo"));
    assert_eq!(header(&m, "ce-source"), Some("/conv/ingress/http"));
    assert!(header(&m, "ce-time").is_some());
    assert_eq!(header(&m, "content-type"), Some("application/json"));
    let data: Value = serde_json::from_slice(&m.payload).expect("json");
    assert_eq!(data, json!({"text": "hello", "channel": "web"}));
    // It decodes as a valid event on its stored subject.
    let event =
        conv_nats::headers::decode(&m.subject, Some(&m.headers), &m.payload, Default::default()).expect("valid");
    assert_eq!(event.id(), event_id);

    for (path, ty) in [
        ("abort", "conv.in.control.abort_requested"),
        ("stop", "conv.in.control.stop_requested"),
        ("retry", "conv.in.control.retry_requested"),
    ] {
        let (status, body, _) = s.send(s.http.post(s.url(&format!("/v1/conversations/demo/{path}")))).await;
        assert_eq!(status, 202, "{path}: {body}");
        let m = s.stored(body["stream_seq"].as_u64().expect("seq")).await;
        assert_eq!(header(&m, "ce-type"), Some(ty));
    }
    let (status, body, _) = s.post("/v1/conversations/demo/abort", json!({"reason": "user left"})).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn a_repeated_idempotency_key_writes_nothing() {
    let s = start().await;
    let req = || {
        s.http
            .post(s.url("/v1/conversations/c1/messages"))
            .header("Idempotency-Key", "k-42")
            .json(&json!({"text": "once"}))
    };
    let (status, first, _) = s.send(req()).await;
    assert_eq!((status, first["duplicate"].clone()), (202, json!(false)));
    let (status, second, _) = s.send(req()).await;
    assert_eq!(status, 202);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["stream_seq"], first["stream_seq"]);
    assert_eq!(second["event_id"], first["event_id"]);
    assert_eq!(s.in_count().await, 1);

    // The same for a CloudEvent id on /v1/events.
    let ce = json!({"specversion": "1.0", "id": "ce-1", "source": "/ext", "type": "conv.in.message.received",
                    "subject": "c1", "data": {"text": "hi"}});
    let post =
        || s.http.post(s.url("/v1/events")).header("content-type", "application/cloudevents+json").body(ce.to_string());
    let (_, a, _) = s.send(post()).await;
    let (_, b, _) = s.send(post()).await;
    assert_eq!((a["duplicate"].clone(), b["duplicate"].clone()), (json!(false), json!(true)));
    assert_eq!(a["stream_seq"], b["stream_seq"]);
    assert_eq!(s.in_count().await, 2);
}

#[tokio::test]
async fn every_malformed_kind_is_refused_and_nothing_is_journaled() {
    let s = start_with(IngressOptions { max_body_bytes: 4096, ..options() }).await;
    let ce = |patch: Value| {
        let mut base = json!({"specversion": "1.0", "id": "e1", "source": "/ext", "type": "conv.in.message.received",
                              "subject": "c1", "data": {"text": "hi"}});
        if let (Value::Object(b), Value::Object(p)) = (&mut base, patch) {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    b.insert(k, v);
                }
            }
        }
        s.http.post(s.url("/v1/events")).header("content-type", "application/cloudevents+json").body(base.to_string())
    };
    let msg = |body: &'static str, ct: &'static str| {
        s.http.post(s.url("/v1/conversations/c1/messages")).header("content-type", ct).body(body)
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("not json", msg("{nope", "application/json"), 400, "malformed"),
        ("no text", msg("{}", "application/json"), 422, "payload_schema"),
        ("text not a string", msg(r#"{"text": 5}"#, "application/json"), 422, "payload_schema"),
        ("form body", msg("text=hi", "application/x-www-form-urlencoded"), 415, "unsupported_content_type"),
        (
            "bad id",
            s.http.post(s.url("/v1/conversations/a.b/messages")).json(&json!({"text": "x"})),
            422,
            "bad_conversation_id",
        ),
        ("oversize", msg(Box::leak("x".repeat(5000).into_boxed_str()), "application/json"), 413, "oversize"),
        ("missing id", ce(json!({"id": null})), 422, "missing_field"),
        ("specversion", ce(json!({"specversion": "0.3"})), 422, "bad_specversion"),
        ("unknown type", ce(json!({"type": "conv.in.message.exploded"})), 422, "unknown_type"),
        ("bad subject", ce(json!({"subject": "has space"})), 422, "bad_conversation_id"),
        ("bad time", ce(json!({"time": "yesterday"})), 422, "bad_attribute"),
        ("schema", ce(json!({"data": {"text": ""}})), 422, "payload_schema"),
        (
            "version",
            ce(json!({"dataschema": "urn:conv:schema:conv.in.message.received:v2"})),
            422,
            "unsupported_version",
        ),
        (
            "output type",
            ce(json!({"type": "conv.out.run.status_changed", "data": {"run_id": "r", "status": "idle"}})),
            422,
            "not_an_input",
        ),
        (
            "batch",
            s.http.post(s.url("/v1/events")).header("content-type", "application/cloudevents-batch+json").body("[]"),
            415,
            "unsupported_content_type",
        ),
        ("plain json", s.http.post(s.url("/v1/events")).json(&json!({"text": "hi"})), 415, "unsupported_content_type"),
        (
            "binary bad header",
            s.http
                .post(s.url("/v1/events"))
                .header("ce-specversion", "1.0")
                .header("ce-id", "x")
                .header("ce-type", "conv.in.message.received")
                .header("ce-subject", "c1")
                .header("content-type", "application/json")
                .body(r#"{"text":"hi"}"#),
            422,
            "missing_field",
        ),
        ("unknown route", s.http.post(s.url("/v1/nope")), 404, "not_found"),
        ("unknown outcome", s.http.post(s.url("/v1/conversations/c1/tools/t1/exploded")), 404, "not_found"),
        (
            "non-ASCII idempotency key",
            s.http
                .post(s.url("/v1/conversations/c1/messages"))
                .header("Idempotency-Key", reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).expect("bytes"))
                .json(&json!({"text": "x"})),
            400,
            "bad_header",
        ),
        (
            "idempotency key too long",
            s.http
                .post(s.url("/v1/conversations/c1/messages"))
                .header("Idempotency-Key", "k".repeat(257))
                .json(&json!({"text": "x"})),
            400,
            "bad_header",
        ),
        ("a derived id", ce(json!({"id": "c1.llm.r1.s1.1.completed"})), 422, "bad_attribute"),
        ("a runtime id", ce(json!({"id": "m1~0"})), 422, "bad_attribute"),
    ];
    for (name, req, status, code) in cases {
        let (got, body, _) = s.send(req).await;
        assert_eq!(got, status, "{name}: {body}");
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {body}");
    }
    assert_eq!(s.in_count().await, 0, "nothing malformed was journaled");

    let metrics = reqwest::get(s.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains(r#"conv_ingress_rejected_total{reason="payload_schema"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"conv_ingress_rejected_total{reason="oversize"} 1"#), "{metrics}");
}

#[tokio::test]
async fn binary_mode_events_and_callbacks_are_accepted() {
    let s = start().await;
    let binary = s
        .http
        .post(s.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "b-1")
        .header("ce-source", "/ext%20producer")
        .header("ce-type", "conv.in.tool.completed")
        .header("ce-subject", "c2")
        .header("ce-causationid", "tool-req-1")
        .header("conv-callback-token", tool_token("c2", "call_1"))
        .header("content-type", "application/json")
        .body(r#"{"tool_call_id": "call_1", "result": {"ok": true}}"#);
    let (status, body, _) = s.send(binary).await;
    assert_eq!(status, 202, "{body}");
    let m = s.stored(body["stream_seq"].as_u64().expect("seq")).await;
    assert_eq!(header(&m, "ce-source"), Some("/ext%20producer"), "percent-encoding kept on the wire");
    assert_eq!(header(&m, "ce-causationid"), Some("tool-req-1"));

    // A causation id that is not a valid event id is refused, not journaled.
    let bad_cause = s
        .http
        .post(s.url("/v1/conversations/c2/tools/call_8/completed"))
        .header("conv-callback-token", tool_token("c2", "call_8"))
        .header("causation-id", "has a space")
        .json(&json!({"result": 1}));
    let (status, body, _) = s.send(bad_cause).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("bad_attribute")), "{body}");

    // A webhook answering later: natural id, so its retries dedupe.
    let cb = || {
        s.http
            .post(s.url("/v1/conversations/c2/tools/call_9/completed"))
            .header("conv-callback-token", tool_token("c2", "call_9"))
            .json(&json!({"result": 42}))
    };
    let (status, a, _) = s.send(cb()).await;
    assert_eq!(status, 202, "{a}");
    assert_eq!(a["event_id"], "c2.tool.call_9.completed");
    let (_, b, _) = s.send(cb()).await;
    assert_eq!(b["duplicate"], true);
    let llm = token("c2", CallbackTarget::Llm { step_id: "step-1", attempt: 1 });
    let delta = s
        .http
        .post(s.url("/v1/conversations/c2/llm/step-1/delta"))
        .bearer_auth(llm)
        .json(&json!({"seq": 0, "text": "Hel"}));
    let (status, body, _) = s.send(delta).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["event_id"], "c2.llm.step-1.1.delta.0");
    let timer = token("c2", CallbackTarget::Timer { timer_id: "t-1" });
    let fired = s.http.post(s.url("/v1/conversations/c2/timers/t-1/fired")).header("conv-callback-token", timer);
    let (status, body, _) = s.send(fired.json(&json!({}))).await;
    assert_eq!(status, 202, "{body}");
    let m = s.stored(body["stream_seq"].as_u64().expect("seq")).await;
    assert_eq!(header(&m, "ce-type"), Some(EventType::TimerFired.as_str()));
}

#[tokio::test]
async fn nats_down_gives_503_and_recovery_accepts_again() {
    let mut s = start_with(IngressOptions { publish_timeout_ms: 1_000, ..options() }).await;
    let (status, _, _) = s.post("/v1/conversations/c3/messages", json!({"text": "before"})).await;
    assert_eq!(status, 202);

    s.nats.stop().await.expect("stop NATS");
    let (status, body, headers) = s.post("/v1/conversations/c3/messages", json!({"text": "during"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(headers.get("retry-after").map(|v| v.to_str().unwrap_or_default()), Some("1"));

    s.nats.restart().await.expect("restart NATS");
    let mut last = (0, Value::Null);
    for _ in 0..150 {
        let (status, body, _) = s
            .send(
                s.http
                    .post(s.url("/v1/conversations/c3/messages"))
                    .header("Idempotency-Key", "after-1")
                    .json(&json!({"text": "after"})),
            )
            .await;
        last = (status, body);
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last.0, 202, "accepted again after NATS is back: {}", last.1);
    assert_eq!(s.in_count().await, 2, "the 503 wrote nothing; storage survived the restart");
}

#[tokio::test]
async fn nats_request_api_with_service_discovery() {
    let s = start().await;
    let client = s.nats.client().await;
    let reply = client
        .request("conv.ingress.message", r#"{"conversation_id": "n1", "text": "over nats"}"#.into())
        .await
        .expect("reply");
    let accepted: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(accepted["conversation_id"], "n1");
    assert_eq!(accepted["duplicate"], false);

    let reply = client
        .request("conv.ingress.control", r#"{"conversation_id": "n1", "action": "abort"}"#.into())
        .await
        .expect("reply");
    let accepted: Value = serde_json::from_slice(&reply.payload).expect("json");
    let m = s.stored(accepted["stream_seq"].as_u64().expect("seq")).await;
    assert_eq!(header(&m, "ce-type"), Some("conv.in.control.abort_requested"));

    let reply = client
        .request("conv.ingress.message", r#"{"conversation_id": "n 1", "text": "x"}"#.into())
        .await
        .expect("reply");
    let headers = reply.headers.expect("error headers");
    assert_eq!(headers.get("Nats-Service-Error-Code").map(|v| v.as_str()), Some("422"));
    assert!(headers.get("Nats-Service-Error").is_some_and(|v| v.as_str().starts_with("bad_conversation_id:")));

    // A structured CloudEvent on the generic endpoint.
    let ce = json!({"specversion": "1.0", "id": "n-ce", "source": "/ext", "type": "conv.in.timer.fired",
                    "subject": "n1", "data": {"timer_id": "t9"}});
    // An outcome needs its callback token over NATS too.
    let reply = client.request("conv.ingress.event", ce.to_string().into()).await.expect("reply");
    let headers = reply.headers.expect("error headers");
    assert_eq!(headers.get("Nats-Service-Error-Code").map(|v| v.as_str()), Some("403"));
    let mut with_token = async_nats::HeaderMap::new();
    with_token.insert("conv-callback-token", token("n1", CallbackTarget::Timer { timer_id: "t9" }).as_str());
    let reply =
        client.request_with_headers("conv.ingress.event", with_token, ce.to_string().into()).await.expect("reply");
    let accepted: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(accepted["event_id"], "n-ce");

    // $SRV discovery.
    let ping = client.request("$SRV.PING.conv-ingress", "".into()).await.expect("discovery");
    let info: Value = serde_json::from_slice(&ping.payload).expect("json");
    assert_eq!(info["name"], "conv-ingress");
}

#[tokio::test]
async fn a_message_whose_output_would_not_fit_the_journal_is_refused_up_front() {
    // The test server takes 1 MiB per message; the body limit is 1 MiB too.
    let s = start().await;
    let near = "x".repeat((1 << 20) - 2_000);
    let (status, body, _) = s.post("/v1/conversations/big/messages", json!({ "text": near })).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "oversize");
    assert_eq!(s.in_count().await, 0, "nothing journaled");
    // Well below the server's limit: taken.
    let fits = "x".repeat(1_000_000);
    let (status, body, _) = s.post("/v1/conversations/big/messages", json!({ "text": fits })).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn clients_need_a_key_and_callbacks_their_effects_token() {
    let key = "client-key-0123456789";
    let team = "team-key-0123456789ab";
    let s = start_with(IngressOptions { api_keys: format!("{key},{team}:team-a-").as_str().into(), ..options() }).await;
    let message =
        |conv: &str| s.http.post(s.url(&format!("/v1/conversations/{conv}/messages"))).json(&json!({"text": "hi"}));

    let (status, body, headers) = s.send(message("c1")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{body}");
    assert_eq!(headers.get("www-authenticate").map(|v| v.to_str().unwrap_or_default()), Some("Bearer"));
    let (status, body, _) = s.send(message("c1").bearer_auth("not-a-key-0123456789")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body, _) = s.send(message("c1").bearer_auth(key)).await;
    assert_eq!(status, 202, "{body}");
    let (status, body, _) = s.send(message("team-a-7").bearer_auth(team)).await;
    assert_eq!(status, 202, "{body}");
    let (status, body, _) = s.send(message("team-b-7").bearer_auth(team)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let stored = s.in_count().await;

    // Refused before the body is read: a request head without a key gets its
    // 401 at once, though the body it announces never comes.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(s.addr).await.expect("connect");
        let head = "POST /v1/conversations/c1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500000\r\n\r\n";
        raw.write_all(head.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }

    // A forged completion: no token, a client key, another step's token.
    let forged = json!({"text": "FORGED ANSWER: 5", "tool_calls": []});
    let completed = || s.http.post(s.url("/v1/conversations/c1/llm/r1.s1/completed")).json(&forged);
    let other = token("c1", CallbackTarget::Llm { step_id: "r1.s2", attempt: 1 });
    for (name, req) in [
        ("no token", completed()),
        ("client key", completed().bearer_auth(key)),
        ("another step's token", completed().header("conv-callback-token", other)),
    ] {
        let (status, body, _) = s.send(req).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{name}: {body}");
    }
    let ce = json!({"specversion": "1.0", "id": "forge-1", "source": "/ext", "type": "conv.in.tool.completed",
                    "subject": "c1", "data": {"tool_call_id": "r1.s1.call1", "result": "FORGED"}});
    let req = s.http.post(s.url("/v1/events")).bearer_auth(key).header("content-type", "application/cloudevents+json");
    let (status, body, _) = s.send(req.body(ce.to_string())).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(s.in_count().await, stored, "nothing forged was journaled");

    // The right token is taken.
    let right = token("c1", CallbackTarget::Llm { step_id: "r1.s1", attempt: 1 });
    let (status, body, _) = s.send(completed().header("conv-callback-token", right)).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn without_a_callback_secret_callbacks_are_refused() {
    let s = start_with(IngressOptions::default()).await;
    let req = s.http.post(s.url("/v1/conversations/c1/tools/call1/completed")).json(&json!({"result": 1}));
    let (status, body, _) = s.send(req).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("CONV_CALLBACK_SECRET")), "{body}");
    assert_eq!(s.in_count().await, 0);
}

#[tokio::test]
async fn an_id_taken_in_one_conversation_is_free_in_another() {
    // CloudEvents ids are unique per source only: the same id from another
    // conversation or source is a new event, not a duplicate.
    let s = start().await;
    let ce = |subject: &str, source: &str| {
        json!({"specversion": "1.0", "id": "shared-id", "source": source, "type": "conv.in.message.received",
               "subject": subject, "data": {"text": "hi"}})
    };
    let post = |body: Value| {
        s.http.post(s.url("/v1/events")).header("content-type", "application/cloudevents+json").body(body.to_string())
    };
    let (_, a, _) = s.send(post(ce("c1", "/a"))).await;
    let (_, b, _) = s.send(post(ce("c2", "/a"))).await;
    let (_, c, _) = s.send(post(ce("c1", "/b"))).await;
    let (_, d, _) = s.send(post(ce("c1", "/a"))).await;
    assert_eq!(
        [&a, &b, &c, &d].map(|r| r["duplicate"].as_bool()),
        [Some(false), Some(false), Some(false), Some(true)],
        "{a} {b} {c} {d}"
    );
    assert_eq!(s.in_count().await, 3);
}

#[tokio::test]
async fn with_no_keys_ingress_refuses_a_public_address() {
    let nats = TestNats::start().await.expect("test NATS");
    let mut config: Config = Settings::for_test(nats.config(), "0.0.0.0:0".parse().expect("addr"));
    config.options = options();
    let err = conv_ingress::run(config, tokio_util::sync::CancellationToken::new()).await.expect_err("refused");
    assert!(err.to_string().contains("CONV_INGRESS_API_KEYS"), "{err}");
}

#[tokio::test]
async fn what_retrying_cannot_fix_is_a_4xx_with_a_json_body() {
    let s = start().await;
    // A 100 KB source: more than NATS headers take.
    let ce = json!({"specversion": "1.0", "id": "big-source", "source": format!("/{}", "s".repeat(100_000)),
                    "type": "conv.in.message.received", "subject": "c1", "data": {"text": "hi"}});
    let req = s.http.post(s.url("/v1/events")).header("content-type", "application/cloudevents+json");
    let (status, body, headers) = s.send(req.body(ce.to_string())).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("bad_attribute")), "{body}");
    assert!(headers.get("retry-after").is_none());

    // A body of exactly the limit is taken; one byte more is not.
    let limit = IngressOptions::default().max_body_bytes;
    let exact = |n: usize| {
        // {"text":"xxx…"} padded with spaces to n bytes.
        let mut b = format!(r#"{{"text":"{}"}}"#, "x".repeat(1000)).into_bytes();
        b.resize(n, b' ');
        s.http.post(s.url("/v1/conversations/exact/messages")).header("content-type", "application/json").body(b)
    };
    let (status, body, _) = s.send(exact(limit)).await;
    assert_eq!(status, 202, "{body}");
    let (status, body, _) = s.send(exact(limit + 1)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("oversize")), "{body}");

    // Errors of the HTTP layer itself carry the JSON body too.
    let long_uri = s.url(&format!("/v1/conversations/c1/messages?pad={}", "c".repeat(10_000)));
    let (status, body, _) = s.send(s.http.post(long_uri).json(&json!({"text": "x"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (414, Some("uri_too_long")), "{body}");
    let huge_header = s.http.post(s.url("/v1/conversations/c1/messages")).header("x-filler", "h".repeat(100_000));
    let (status, body, _) = s.send(huge_header.json(&json!({"text": "x"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (431, Some("headers_too_large")), "{body}");
    assert_eq!(s.in_count().await, 1, "only the message of exactly the limit was journaled");
}

#[tokio::test]
async fn idle_connections_are_closed_by_the_header_timeout_while_requests_are_served() {
    use tokio::io::AsyncReadExt;
    let s = start_configured(|c| c.service.http.header_timeout_ms = 1_000).await;
    let addr = s.addr;

    // 2 000 connections that never send a request (fewer if this process
    // may not open that many files: both ends live here).
    let n = 2_000.min(open_files_limit().saturating_sub(300) / 2);
    assert!(n >= 200, "too few open files allowed to test a flood");
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // Meanwhile a normal request is served.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{addr}/v1/conversations/flood/messages"))
        .json(&json!({"text": "still here"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 202);
    // Every idle connection is closed by the server (EOF), well within the deadline.
    let started = std::time::Instant::now();
    for mut c in idle {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(15), c.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed open: {read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    // And ingress still serves (a new client: the pooled connection went
    // idle past the timeout and was closed too).
    let r = reqwest::get(format!("http://{addr}/readyz")).await.expect("request");
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn past_the_connection_limit_new_connections_are_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start_configured(|c| c.service.http.max_connections = 20).await;
    let addr = s.addr;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the extra connection was served: {read:?}");
    drop(held);
    // Once the others are gone, connections are served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/healthz")).await
            && r.status().is_success()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not served again after the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let key = "rate-key-0123456789ab";
    let s = start_with(IngressOptions { api_keys: key.into(), rate_per_key: 1.0, rate_burst: 2.0, ..options() }).await;
    let post = || s.http.post(s.url("/v1/conversations/r1/messages")).bearer_auth(key).json(&json!({"text": "hi"}));
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..3 {
        let (status, body, headers) = s.send(post()).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            retry_after = headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [202, 202, 429]);
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    assert_eq!(s.in_count().await, 2, "the refused request wrote nothing");
    // Callbacks are not limited by the client's rate.
    let cb = s
        .http
        .post(s.url("/v1/conversations/r1/tools/call1/completed"))
        .header("conv-callback-token", tool_token("r1", "call1"))
        .json(&json!({"result": 1}));
    assert_eq!(s.send(cb).await.0, 202);
}

#[tokio::test]
async fn while_the_pipeline_lags_new_messages_are_shed_and_aborts_taken() {
    let s = start_with(IngressOptions { shed_backlog: 3, shed_poll_ms: 100, ..options() }).await;
    // No runtime runs: inputs pile up in its consumers.
    for i in 0..5 {
        let (status, body, _) = s.post(&format!("/v1/conversations/lag-{i}/messages"), json!({"text": "x"})).await;
        assert_eq!(status, 202, "{body}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body, headers) = loop {
        let answer = s.post("/v1/conversations/lag-new/messages", json!({"text": "more"})).await;
        if answer.0 != 202 || std::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("overloaded")), "{body}");
    assert!(headers.get("retry-after").is_some());
    let (status, body, _) = s.post("/v1/conversations/lag-1/abort", json!({})).await;
    assert_eq!(status, 202, "an abort is taken while shedding: {body}");
    let (status, body, _) = s.post("/v1/conversations/lag-1/stop", json!({})).await;
    assert_eq!(status, 202, "{body}");
}

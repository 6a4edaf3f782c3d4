//! The web console in a real browser: headless Chromium driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`, which
//! `scripts/test.sh` installs) against the whole pipeline with client keys.
//! A message typed into the page gets its reply streamed in (seen partway
//! and then complete), and a long reply is aborted with the page's button —
//! done when effects journaled the call's `canceled`, not when a badge
//! changed.
//!
//! Signed in as the NATS admin user (on a server that takes only the
//! shipped users), the console shows a conversation's cause tree, lists the
//! dead letters and re-drives one, and shows the readiness report.
//!
//! `CONV_CHROMEDRIVER` and `CONV_CHROMIUM` point at other binaries;
//! `CONV_CONSOLE_SCREENSHOT=<file.png>` saves what the page looked like,
//! `CONV_CONSOLE_TRACE_SCREENSHOT=<file.png>` the admin's cause tree.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use conv_contracts::ConversationId;
use conv_contracts::subject::{STREAM_IN, in_conversation_filter};
use conv_nats::test_util::{TestNats, free_addr};
use serde_json::{Value, json};

const KEY: &str = "console-test-key-0123456789";

/// A binary from `var`, else the first of `names` found in `PATH`.
fn binary(var: &str, names: &[&str]) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")]) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "{} not found: install Debian's chromium and chromium-driver (scripts/test.sh does), or set {var}",
        names[0]
    );
}

/// A WebDriver session in headless Chromium.
struct Browser {
    http: reqwest::Client,
    url: String,
    _driver: tokio::process::Child,
}

impl Browser {
    async fn start() -> Browser {
        let driver = binary("CONV_CHROMEDRIVER", &["chromedriver"]);
        let chromium = binary("CONV_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
        let port = free_addr().port();
        let child = tokio::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = async {
                let v: Value = http.get(format!("{base}/status")).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool()
            };
            if ready.await == Some(true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1200,800"]
            }
        }}});
        let session: Value =
            http.post(format!("{base}/session")).json(&caps).send().await.expect("session").json().await.expect("json");
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}")).to_owned();
        Browser { http, url: format!("{base}/session/{id}"), _driver: child }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if !body.is_null() {
            request = request.json(&body);
        }
        let text = request.send().await.expect("webdriver").text().await.expect("webdriver body");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("webdriver {path}: {e}: {text}"));
        assert!(v["value"]["error"].is_null(), "webdriver {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    async fn element(&self, css: &str) -> String {
        let v = self.call(reqwest::Method::POST, "/element", json!({"using": "css selector", "value": css})).await;
        v["element-6066-11e4-a52e-4f735466cecf"].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_owned()
    }

    /// Types `text` into the element as keystrokes.
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), json!({"text": text})).await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), json!({})).await;
    }

    /// The entries on the page: (role, status, text).
    async fn entries(&self) -> Vec<(String, String, String)> {
        let v = self
            .js("return [...document.querySelectorAll('#entries .entry')].map(e => [e.dataset.role, e.dataset.status, e.querySelector('.text').textContent]);")
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        let s = |i: usize| e[i].as_str().unwrap_or_default().to_owned();
                        (s(0), s(1), s(2))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn screenshot(&self, path: &str) {
        let v = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64")).expect("png");
        std::fs::write(path, png).expect("write the screenshot");
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}

/// The last assistant entry: (status, text).
fn last_reply(entries: &[(String, String, String)]) -> Option<(String, String)> {
    entries.iter().rev().find(|(role, _, _)| role == "assistant").map(|(_, s, t)| (s.clone(), t.clone()))
}

#[tokio::test]
async fn a_message_typed_into_the_console_streams_its_reply_and_abort_stops_a_long_one() {
    let keys = conv_nats::secret::Secret::new(KEY);
    let pipeline = support::Pipeline::start(|c| {
        c.ingress.options.api_keys = keys.clone();
        c.projections.options.api_keys = keys;
        // Replies of about 3 s: long enough to see them stream and to abort one.
        c.effects.options.scripted_tokens = 60;
        c.effects.options.scripted_token_delay_ms = 50;
        c.effects.options.coalesce_ms = 50;
    })
    .await;
    let (nats, projections) = (&pipeline.nats, pipeline.projections);

    // The console's own endpoints take the client key like every other.
    let http = reqwest::Client::new();
    let list = http.get(format!("http://{projections}/v1/conversations")).send().await.expect("list");
    assert_eq!(list.status().as_u16(), 401, "listing takes a key");
    let post = |key: Option<&str>, content_type: &str| {
        let r = http
            .post(format!("http://{projections}/v1/conversations/console-0/messages"))
            .header("content-type", content_type.to_owned())
            .body(r#"{"text": "hi"}"#);
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
        .send()
    };
    assert_eq!(post(None, "application/json").await.expect("post").status().as_u16(), 401);
    assert_eq!(post(Some("not-the-key-0123456789"), "application/json").await.expect("post").status().as_u16(), 401);
    // A cross-site form cannot forward anything: JSON only.
    assert_eq!(post(Some(KEY), "text/plain").await.expect("post").status().as_u16(), 415);

    let browser = Browser::start().await;
    browser.goto(&format!("http://{projections}/#console-1")).await;
    // The key, typed like a user would; the page keeps it for the session.
    browser.type_into("#key", KEY).await;
    browser.js("document.getElementById('key').dispatchEvent(new Event('change'));").await;

    // A message: its reply streams in, then completes.
    browser.type_into("#text", "hello console").await;
    browser.click("#send").await;
    let (mut partway, mut done) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.is_none() {
        let entries = browser.entries().await;
        match last_reply(&entries) {
            // The first look at it while it streams.
            Some((status, text)) if status == "streaming" && !text.is_empty() && partway.is_none() => {
                partway = Some(text)
            }
            Some((status, text)) if status == "completed" => {
                done = Some((entries, text));
                break;
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "no completed reply on the page: {entries:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (entries, reply) = done.expect("done");
    assert_eq!(entries[0], ("user".into(), "completed".into(), "hello console".into()), "{entries:?}");
    assert!(reply.starts_with("You said: hello console"), "{reply}");
    let partway = partway.expect("the reply was seen streaming, partway");
    assert!(partway.len() < reply.len() && reply.starts_with(partway.trim_end()), "{partway:?} then {reply:?}");
    // The page agrees with the stored view (written a moment later).
    let settled = Instant::now() + Duration::from_secs(10);
    loop {
        let view: Value = reqwest::Client::new()
            .get(format!("http://{projections}/v1/conversations/console-1/timeline"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("timeline")
            .json()
            .await
            .expect("json");
        if view["entries"][1]["status"] == "completed" {
            assert_eq!(view["entries"][1]["text"], reply.as_str());
            break;
        }
        assert!(Instant::now() < settled, "the stored view never showed the reply completed: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The list shows the conversation.
    let listed = Instant::now() + Duration::from_secs(20);
    while browser.js("return document.querySelector('#list a[data-id=\"console-1\"]') !== null;").await != json!(true) {
        assert!(Instant::now() < listed, "console-1 not in the list");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A long reply, aborted from the page while it streams.
    browser.type_into("#text", "tell me a long story").await;
    browser.click("#send").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = browser.entries().await;
        if entries.len() >= 4
            && let Some((status, text)) = last_reply(&entries)
            && status == "streaming"
            && !text.is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the second reply never streamed: {entries:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let clicked = Instant::now();
    browser.click("#abort").await;
    // Done when effects stopped the call: its `canceled` is in the journal.
    let js = nats.jetstream().await;
    let conv = ConversationId::parse("console-1").expect("id");
    loop {
        let inputs = conv_nats::read::all(&js, STREAM_IN, &in_conversation_filter(&conv), true).await.expect("read");
        let canceled =
            inputs.iter().any(|m| conv_nats::headers::header(&m.headers, "ce-type") == Some("conv.in.llm.canceled"));
        if canceled {
            break;
        }
        assert!(clicked.elapsed() < Duration::from_secs(10), "effects did not journal the call's canceled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let badge = browser.js("return document.getElementById('status').textContent;").await;
        let entries = browser.entries().await;
        if badge == json!("aborted") && last_reply(&entries).is_some_and(|(s, _)| s != "streaming") {
            let (status, text) = last_reply(&entries).expect("reply");
            assert_ne!(status, "completed", "an aborted reply is not complete: {text}");
            break;
        }
        assert!(Instant::now() < deadline, "the page does not show the abort: {badge} {entries:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Ok(path) = std::env::var("CONV_CONSOLE_SCREENSHOT") {
        browser.screenshot(&path).await;
    }
    browser.quit().await;
}

async fn wait_js(browser: &Browser, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = browser.js(script).await;
        if !v.is_null() && v != json!(false) && v != json!("") {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {}", browser.js("return document.body.innerText;").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn signed_in_as_admin_the_console_traces_redrives_and_reports_readiness() {
    let nats = TestNats::start_secured().await.expect("nats-server");
    let pipeline = support::Pipeline::start_on(nats, |_| {}).await;
    let (projections, http) = (pipeline.projections, pipeline.http.clone());
    let admin_password = pipeline.nats.config_as("admin").password.expose().to_owned();
    let projections_password = pipeline.nats.config_as("projections").password.expose().to_owned();

    // The admin API: NATS decides who is the admin.
    let sign_in = |user: &str, password: &str| {
        http.post(format!("http://{projections}/v1/admin/session"))
            .json(&json!({"user": user, "password": password}))
            .send()
    };
    let wrong = sign_in("admin", "wrong-password").await.expect("post");
    assert_eq!(wrong.status().as_u16(), 401);
    let wrong: Value = wrong.json().await.expect("json");
    let service = sign_in("projections", &projections_password).await.expect("post");
    assert_eq!(service.status().as_u16(), 401, "a service user is not an admin");
    let service: Value = service.json().await.expect("json");
    assert_eq!(wrong, service, "a service user's right password looks like a wrong one");
    let dlq = http.get(format!("http://{projections}/v1/admin/dlq")).send().await.expect("get");
    assert_eq!(dlq.status().as_u16(), 401, "no session, no dead letters");

    // A dead letter: a valid message on a subject that is not an input's.
    let js = pipeline.nats.jetstream().await;
    let conv = ConversationId::parse("adm-1").expect("id");
    let stray = conv_contracts::Envelope::new(
        "adm-1.stray-1",
        "/test",
        conv.clone(),
        conv_contracts::payload::MessageReceived {
            text: "lost and found".into(),
            role: None,
            channel: None,
            sender: None,
        },
    )
    .expect("valid event");
    let (h, body) = conv_nats::headers::encode(&stray);
    let ack = js.publish_with_headers("conv.in.0.message.adm-1", h, body).await.expect("publish").await.expect("ack");
    assert_eq!(ack.stream, conv_contracts::subject::STREAM_DLQ);

    let browser = Browser::start().await;
    browser.goto(&format!("http://{projections}/")).await;
    assert_eq!(browser.js("return document.getElementById('adminNav').hidden;").await, json!(true));
    browser.click("#adminBtn").await;
    browser.type_into("#adminPass", "wrong-password").await;
    browser.click("#loginSubmit").await;
    wait_js(
        &browser,
        "a refused sign-in says so",
        "const t = document.getElementById('loginError').textContent; return t !== 'signing in…' && t;",
    )
    .await;
    assert_eq!(browser.js("return document.getElementById('login').open;").await, json!(true));
    browser.js("document.getElementById('adminPass').value = '';").await;
    browser.type_into("#adminPass", &admin_password).await;
    browser.click("#loginSubmit").await;
    wait_js(&browser, "signed in", "return !document.getElementById('adminNav').hidden;").await;

    // The dead letter, re-driven from the page: it leaves CONV_DLQ, is
    // audited, and the conversation gets its reply.
    browser.click("#dlqLink").await;
    wait_js(
        &browser,
        "the dead letter is listed",
        "return [...document.querySelectorAll('#adminBody tr')].some(r => r.textContent.includes('adm-1.stray-1'));",
    )
    .await;
    browser.click("#adminBody button.redrive").await;
    wait_js(
        &browser,
        "the re-drive is reported",
        "const p = document.querySelector('#adminBody p.done'); return p && p.textContent;",
    )
    .await;
    let mut dlq = js.get_stream(conv_contracts::subject::STREAM_DLQ).await.expect("stream");
    assert_eq!(dlq.info().await.expect("info").state.messages, 0, "re-driven dead letters leave CONV_DLQ");

    browser.type_into("#newid", "adm-1").await;
    browser.click("#open button").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = browser.entries().await;
        if last_reply(&entries).is_some_and(|(s, t)| s == "completed" && t.contains("lost and found")) {
            break;
        }
        assert!(Instant::now() < deadline, "no reply to the re-driven message: {entries:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The cause tree: the audit record of the re-drive hangs under the
    // message, and the reply's events under it.
    browser.click("#causesTab").await;
    wait_js(
        &browser,
        "the cause tree",
        "return !!document.querySelector('#causes li[data-type=\"conv.audit.dlq.redriven\"]');",
    )
    .await;
    let message = "#causes li[data-type=\"conv.in.message.received\"]";
    assert_eq!(
        browser
            .js(&format!("return !!document.querySelector('{message} li[data-type=\"conv.audit.dlq.redriven\"]');"))
            .await,
        json!(true),
        "the audit record is an effect of the re-driven message"
    );
    wait_js(
        &browser,
        "the reply under the message",
        &format!("return !!document.querySelector('{message} li[data-type=\"conv.out.message.finished\"]');"),
    )
    .await;
    if let Ok(path) = std::env::var("CONV_CONSOLE_TRACE_SCREENSHOT") {
        browser.screenshot(&path).await;
    }

    // Readiness: every service instance probed.
    browser.click("#readyLink").await;
    for service in ["conv-ingress", "conv-runtime", "conv-effects", "conv-projections"] {
        wait_js(&browser, service, &format!("return [...document.querySelectorAll('#adminBody tr[data-name]')].some(r => r.dataset.name.startsWith('{service} ') && r.querySelector('td').textContent === 'ready');")).await;
    }
    wait_js(&browser, "the NATS check", "return [...document.querySelectorAll('#adminBody tr[data-name=\"nats\"] td')].map(t => t.textContent).join(' ').startsWith('ready');").await;

    // Signing out ends the session on the server too.
    let token = browser.js("return sessionStorage.getItem('conv-admin');").await;
    let token = token.as_str().expect("a session token").to_owned();
    browser.click("#adminBtn").await;
    wait_js(&browser, "signed out", "return document.getElementById('adminNav').hidden;").await;
    let r = http.get(format!("http://{projections}/v1/admin/dlq")).bearer_auth(&token).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 401);
    browser.quit().await;
    pipeline.shutdown().await;
}

//! Property tests of the contract: every encoding round-trips, and malformed
//! input is refused with the right reason — never a panic.

use chrono::{DateTime, Utc};
use conv_contracts::binding::{decode_binary, decode_nats, decode_structured, encode_binary, encode_structured};
use conv_contracts::cloudevent::{from_event, to_event};
use conv_contracts::payload::*;
use conv_contracts::{ConversationId, Envelope, EventType, Limits, Rejection};
use proptest::prelude::*;
use serde_json::{Value, json};

fn conversation_id() -> impl Strategy<Value = ConversationId> {
    "[A-Za-z0-9_-]{1,128}".prop_map(|s| ConversationId::parse(&s).expect("strategy yields valid ids"))
}

fn event_id() -> impl Strategy<Value = String> {
    "[!-~]{1,64}"
}

/// Any printable text that is not blank (payload rules refuse blank strings).
fn text() -> impl Strategy<Value = String> {
    "\\PC{1,40}".prop_filter("not blank", |s| !s.trim().is_empty())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (text(), any::<bool>(), proptest::option::of(text()), proptest::option::of(text())).prop_map(
            |(text, role, channel, sender)| Payload::from(MessageReceived {
                text,
                role: role.then_some(MessageRole::User),
                channel,
                sender
            })
        ),
        proptest::option::of(text()).prop_map(|reason| Payload::from(AbortRequested { reason })),
        Just(Payload::from(StopRequested {})),
        Just(Payload::from(RetryRequested {})),
        (text(), json_value()).prop_map(|(tool_call_id, result)| Payload::from(ToolCompleted { tool_call_id, result })),
        (text(), text(), any::<bool>()).prop_map(|(tool_call_id, error, retryable)| Payload::from(ToolFailed {
            tool_call_id,
            error,
            retryable
        })),
        (text(), any::<u64>(), "\\PC{0,40}").prop_map(|(step_id, seq, text)| Payload::from(LlmDelta {
            step_id,
            attempt: (seq % 3) as u32 + 1,
            seq,
            text
        })),
        (text(), "\\PC{0,40}", prop::collection::vec((text(), text(), json_value()), 0..3)).prop_map(
            |(step_id, text, calls)| Payload::from(LlmCompleted {
                step_id,
                attempt: 1,
                text,
                tool_calls: calls.into_iter().map(|(id, name, args)| ToolCall { id, name, args }).collect(),
                finish_reason: None,
            })
        ),
        text().prop_map(|timer_id| Payload::from(TimerFired { timer_id })),
        (any::<bool>(), prop::collection::vec(text(), 0..4)).prop_map(|(abort, effect_ids)| {
            Payload::from(CancelRequested {
                mode: if abort { CancelMode::Abort } else { CancelMode::Stop },
                effect_ids,
                reason: None,
            })
        }),
        (event_id(), any::<u32>(), any::<u64>(), "[0-9a-f]{64}").prop_map(|(input_id, seq, version, hash)| {
            Payload::from(Applied {
                input_id,
                input_type: "conv.in.message.received".into(),
                input_seq: u64::from(seq),
                applied_index: u64::from(seq) + 1,
                state_version: version,
                state_hash: hash,
                rules: (seq % 2 == 0).then_some(2),
            })
        }),
        (text(), "\\PC{0,40}").prop_map(|(entry_id, text)| Payload::from(OutMessageFinished {
            entry_id,
            status: EntryStatus::Stopped,
            text
        })),
    ]
}

const RESERVED: [&str; 12] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "causationid",
    "correlationid",
    "datarefx",
];

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        event_id(),
        text(),
        conversation_id(),
        payload(),
        proptest::option::of(0i64..4_000_000_000i64),
        proptest::option::of(event_id()),
        proptest::option::of(event_id()),
        prop::collection::btree_map("[a-z][a-z0-9]{0,10}", "\\PC{0,20}", 0..3),
    )
        .prop_map(|(id, source, conv, data, secs, causation, correlation, ext)| {
            let mut env = Envelope::new(id, source, conv, data)
                .expect("valid event")
                .with_time(secs.and_then(|s| DateTime::<Utc>::from_timestamp(s, (s % 1000) as u32 * 1_000_000)))
                .with_causation(causation, correlation)
                .expect("valid ids");
            for (k, v) in ext.into_iter().filter(|(k, _)| !RESERVED.contains(&k.as_str())) {
                env = env.with_extension(k, v).expect("valid extension");
            }
            env
        })
}

fn headers_ref(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

fn structured_value(env: &Envelope) -> serde_json::Map<String, Value> {
    match serde_json::from_slice(&encode_structured(env)) {
        Ok(Value::Object(map)) => map,
        other => panic!("structured encoding is an object, got {other:?}"),
    }
}

fn decode_value(map: serde_json::Map<String, Value>) -> Result<Envelope, Rejection> {
    decode_structured(&serde_json::to_vec(&Value::Object(map)).expect("json"), Limits::default())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn structured_round_trip(env in envelope()) {
        let bytes = encode_structured(&env);
        prop_assert_eq!(decode_structured(&bytes, Limits::default()), Ok(env));
    }

    #[test]
    fn binary_round_trip(env in envelope()) {
        let (headers, body) = encode_binary(&env);
        for (name, value) in &headers {
            prop_assert!(value.bytes().all(|b| (0x21..0x7f).contains(&b)), "header {} not encoded: {:?}", name, value);
        }
        prop_assert_eq!(decode_binary(headers_ref(&headers), &body, Limits::default()), Ok(env.clone()));
        // The same bytes on the event's own NATS subject pass the subject check too.
        prop_assert_eq!(decode_nats(&env.nats_subject(), headers_ref(&headers), &body, Limits::default()), Ok(env));
    }

    #[test]
    fn check_returns_the_bytes_it_validated(env in envelope()) {
        let encoded = conv_contracts::binding::check(&env, Limits::default()).expect("a valid event");
        prop_assert_eq!(decode_binary(headers_ref(&encoded.headers), &encoded.body, Limits::default()), Ok(env.clone()));
        let (headers, body) = encode_binary(&env);
        prop_assert_eq!((encoded.headers, encoded.body), (headers, body));
        // What the wire refuses, check refuses: here a size over the limit.
        let small = Limits { max_event_bytes: 16 };
        prop_assert_eq!(conv_contracts::binding::check(&env, small).map(drop).map_err(|r| r.code()), Err("oversize"));
    }

    #[test]
    fn sdk_round_trip(env in envelope()) {
        let event = to_event(&env).expect("sdk accepts our events");
        prop_assert_eq!(from_event(&event, Limits::default()), Ok(env));
    }

    #[test]
    fn missing_required_attribute(env in envelope(), which in 0usize..5) {
        let field = ["specversion", "id", "source", "type", "subject"][which];
        let mut map = structured_value(&env);
        map.remove(field);
        prop_assert_eq!(decode_value(map), Err(Rejection::MissingField { field }));
        // Binary mode gives the same verdict.
        let (headers, body) = encode_binary(&env);
        let headers: Vec<_> = headers.into_iter().filter(|(n, _)| n != &format!("ce-{field}")).collect();
        if field != "specversion" {
            prop_assert_eq!(decode_binary(headers_ref(&headers), &body, Limits::default()),
                Err(Rejection::MissingField { field }));
        }
    }

    #[test]
    fn bad_specversion(env in envelope(), v in "\\PC{0,8}") {
        prop_assume!(v != "1.0");
        let mut map = structured_value(&env);
        map.insert("specversion".into(), Value::String(v.clone()));
        prop_assert_eq!(decode_value(map), Err(Rejection::BadSpecVersion { found: v }));
    }

    #[test]
    fn unknown_type(env in envelope(), ty in "\\PC{0,30}") {
        prop_assume!(ty.parse::<EventType>().is_err());
        let mut map = structured_value(&env);
        map.insert("type".into(), Value::String(ty.clone()));
        prop_assert_eq!(decode_value(map), Err(Rejection::UnknownType { found: ty }));
    }

    #[test]
    fn bad_conversation_id(env in envelope(), bad in "\\PC{0,140}") {
        prop_assume!(ConversationId::parse(&bad).is_err());
        let mut map = structured_value(&env);
        map.insert("subject".into(), Value::String(bad));
        let err = decode_value(map).expect_err("refused");
        prop_assert_eq!(err.code(), "bad_conversation_id");
    }

    #[test]
    fn subject_type_mismatch(env in envelope(), other in 0usize..EventType::ALL.len()) {
        let other = EventType::ALL[other];
        prop_assume!(other.kind() != env.event_type().kind() || other.family() != env.event_type().family());
        let wrong = conv_contracts::subject::for_event(other, env.conversation_id());
        let (headers, body) = encode_binary(&env);
        let err = decode_nats(&wrong, headers_ref(&headers), &body, Limits::default()).expect_err("refused");
        prop_assert_eq!(err.code(), "subject_type_mismatch");
        // ...and a subject naming another conversation.
        let elsewhere = format!("conv.{}.{}.someone-else-{}", env.event_type().kind().token(), env.event_type().family(), env.conversation_id().as_str().len());
        let err = decode_nats(&elsewhere, headers_ref(&headers), &body, Limits::default()).expect_err("refused");
        prop_assert_eq!(err.code(), "subject_type_mismatch");
    }

    #[test]
    fn oversize(env in envelope()) {
        let bytes = encode_structured(&env);
        let limits = Limits { max_event_bytes: bytes.len() - 1 };
        prop_assert_eq!(decode_structured(&bytes, limits), Err(Rejection::Oversize { size: bytes.len(), limit: bytes.len() - 1 }));
        let (headers, body) = encode_binary(&env);
        let err = decode_binary(headers_ref(&headers), &body, Limits { max_event_bytes: body.len() }).expect_err("refused");
        prop_assert_eq!(err.code(), "oversize");
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_structured(&bytes, Limits::default());
        let _ = decode_binary([("ce-specversion", "1.0")], &bytes, Limits::default());
    }

    #[test]
    fn arbitrary_headers_never_panic(
        headers in prop::collection::vec(("(ce-)?[a-z%-]{0,12}", "\\PC{0,16}"), 0..10),
        subject in "\\PC{0,40}",
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = decode_nats(&subject, headers_ref(&headers), &body, Limits::default());
    }

    #[test]
    fn mutated_json_never_panics(env in envelope(), key in "[a-z_]{1,16}", value in json_value()) {
        let mut map = structured_value(&env);
        map.insert(key, value);
        let _ = decode_value(map);
    }
}

#[test]
fn payload_schema_errors_name_the_problem() {
    let env = Envelope::new(
        "e1",
        "/t",
        ConversationId::parse("c1").expect("valid"),
        MessageReceived { text: "hi".into(), role: None, channel: None, sender: None },
    )
    .expect("valid event");
    let mut map = structured_value(&env);
    map.insert("data".into(), json!({"text": ""}));
    let err = decode_value(map.clone()).expect_err("refused");
    assert_eq!(err.code(), "payload_schema");
    assert!(err.to_string().contains("text"), "{err}");
    map.insert("data".into(), json!("just a string"));
    assert_eq!(decode_value(map).expect_err("refused").code(), "payload_schema");
}

#[test]
fn every_rejection_kind_has_a_distinct_code() {
    let conv = ConversationId::parse("c1").expect("valid");
    let good = Envelope::new("e1", "/t", conv, TimerFired { timer_id: "t".into() }).expect("valid event");
    let base = structured_value(&good);
    let with = |k: &str, v: Value| {
        let mut m = base.clone();
        m.insert(k.into(), v);
        decode_value(m)
    };
    let mut without_id = base.clone();
    without_id.remove("id");
    let cases: Vec<Result<Envelope, Rejection>> = vec![
        decode_structured(b"{nope", Limits::default()),
        decode_value(without_id),
        with("specversion", json!("0.3")),
        with("time", json!("yesterday")),
        with("type", json!("conv.in.timer.exploded")),
        with("subject", json!("a.b")),
        decode_nats("conv.in.message.c1", [], &encode_structured(&good), Limits::default()),
        with("data", json!({})),
        decode_structured(&encode_structured(&good), Limits { max_event_bytes: 10 }),
        with("datacontenttype", json!("text/plain")),
        with("dataschema", json!("urn:conv:schema:conv.in.timer.fired:v9")),
        conv_contracts::binding::require_input(
            Envelope::new(
                "e2",
                "/t",
                ConversationId::parse("c1").expect("valid"),
                conv_contracts::payload::OutRunStatus { run_id: "r".into(), status: RunStatus::Idle },
            )
            .expect("valid event"),
        ),
    ];
    let codes: Vec<&str> = cases.iter().map(|r| r.as_ref().expect_err("refused").code()).collect();
    assert_eq!(codes, Rejection::CODES.to_vec());
    let statuses: Vec<u16> = cases.iter().map(|r| r.as_ref().expect_err("refused").http_status()).collect();
    assert_eq!(statuses, vec![400, 422, 422, 422, 422, 422, 422, 422, 413, 415, 422, 422]);
}

#[test]
fn percent_encoding_of_headers() {
    let conv = ConversationId::parse("c1").expect("valid");
    let env = Envelope::new("e1", "/a b\"%ü", conv, TimerFired { timer_id: "t".into() })
        .expect("valid event")
        .with_extension("note", "line\nbreak")
        .expect("valid extension");
    let (headers, body) = encode_binary(&env);
    let source = headers.iter().find(|(n, _)| n == "ce-source").map(|(_, v)| v.as_str());
    assert_eq!(source, Some("/a%20b%22%25%C3%BC"));
    let note = headers.iter().find(|(n, _)| n == "ce-note").map(|(_, v)| v.as_str());
    assert_eq!(note, Some("line%0Abreak"));
    assert_eq!(decode_binary(headers_ref(&headers), &body, Limits::default()), Ok(env));
    // Header names are case-insensitive, as on HTTP.
    let upper: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_uppercase(), v.clone())).collect();
    assert!(decode_binary(headers_ref(&upper), &body, Limits::default()).is_ok());
    let bad = [("ce-specversion", "1.0"), ("ce-id", "%FF%FE")];
    assert_eq!(decode_binary(bad, b"", Limits::default()).expect_err("refused").code(), "malformed");
}

//! Fuzzes every decoder of the contract: structured JSON, binary mode
//! (headers + body) and the NATS entry point with an arbitrary subject.
//! Any panic is a bug; every input must end in `Ok` or a typed `Rejection`.
//! Accepted events must survive an encode/decode round trip unchanged.
#![no_main]

use conv_contracts::{Limits, binding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(event) = binding::decode_structured(data, limits) {
        let again = binding::decode_structured(&binding::encode_structured(&event), limits);
        assert_eq!(again.as_ref(), Ok(&event));
        let (headers, body) = binding::encode_binary(&event);
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(binding::decode_binary(pairs, &body, limits).as_ref(), Ok(&event));
    }

    // Split the input into "subject \n header lines \n\n body".
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let subject = lines.next().unwrap_or_default();
    let headers: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(':')).collect();
    let _ = binding::decode_binary(headers.clone(), body.as_bytes(), limits);
    let _ = binding::decode_nats(subject, headers, body.as_bytes(), limits);
});

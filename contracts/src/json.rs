//! JSON bytes of plain data.

use serde::Serialize;

/// The JSON bytes of plain data: structs, enums and maps with string keys,
/// which always serialize. A failure would be a bug in a `Serialize` impl;
/// it panics with the reason instead of writing empty or partial bytes.
pub fn bytes<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes,
        Err(error) => panic!("plain data did not serialize to JSON (a bug): {error}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn plain_data_serializes() {
        assert_eq!(super::bytes(&serde_json::json!({"a": [1, "b"]})), br#"{"a":[1,"b"]}"#);
        assert_eq!(super::bytes(&BTreeMap::from([("k", 1)])), br#"{"k":1}"#);
    }

    #[test]
    #[should_panic(expected = "did not serialize")]
    fn a_failure_is_loud_not_empty() {
        // Non-string map keys are the classic way serde_json refuses.
        super::bytes(&BTreeMap::from([((1, 2), 3)]));
    }
}

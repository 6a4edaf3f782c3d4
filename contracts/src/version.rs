//! Contract version policy.
//!
//! * Every payload type starts at version 1. The version of an event is carried
//!   in its `dataschema` attribute as `urn:conv:schema:<type>:v<N>`; an event
//!   without `dataschema` (or with a schema URI that is not ours, as third-party
//!   producers may send) is read as version 1.
//! * **Compatible changes keep the version**: adding an optional field (with a
//!   serde default) or a new event type. Readers ignore unknown fields, so a
//!   v1 reader keeps working when a writer starts sending the new field.
//! * **Breaking changes bump the version** (renaming or removing a field,
//!   changing its meaning or JSON type, making it required). A reader refuses
//!   a version newer than it knows with [`crate::Rejection::UnsupportedVersion`]
//!   — the event is terminated into the DLQ, not misread — so the rollout order
//!   is: deploy readers that accept vN+1 (a new struct, converted to the
//!   in-memory type), then writers that emit it. Readers keep accepting every
//!   older version for as long as the journal may hold it (replay reads old
//!   events forever).

use crate::types::EventType;

pub const SCHEMA_PREFIX: &str = "urn:conv:schema:";

/// Highest payload version this build reads and writes for `ty`.
pub fn current(ty: EventType) -> u32 {
    // All types are at v1. When a type gets a v2, match on it here and add its
    // decoder in `payload.rs`.
    let _ = ty;
    1
}

/// The `dataschema` URI of version `version` of `ty`.
pub fn schema_uri(ty: EventType, version: u32) -> String {
    format!("{SCHEMA_PREFIX}{}:v{version}", ty.as_str())
}

/// What a `dataschema` says about the version of an event of type `ty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaVersion {
    /// Not a conv schema URI (or absent): read as version 1.
    Foreign,
    Conv(u32),
}

/// Interprets `dataschema`. Returns `Err(detail)` for a conv URI that is
/// malformed or names another type.
pub fn parse_schema(ty: EventType, dataschema: &str) -> Result<SchemaVersion, crate::Invalid> {
    let Some(rest) = dataschema.strip_prefix(SCHEMA_PREFIX) else {
        return Ok(SchemaVersion::Foreign);
    };
    let (named_type, version) =
        rest.rsplit_once(":v").ok_or_else(|| format!("dataschema {dataschema:?} is not {SCHEMA_PREFIX}<type>:v<N>"))?;
    if named_type != ty.as_str() {
        return Err(format!("dataschema {dataschema:?} names type {named_type:?}, the event is {ty}").into());
    }
    let version: u32 = version.parse().map_err(|_| format!("dataschema {dataschema:?} has no numeric version"))?;
    if version == 0 {
        return Err(format!("dataschema {dataschema:?}: versions start at 1").into());
    }
    Ok(SchemaVersion::Conv(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_uris() {
        let ty = EventType::MessageReceived;
        let uri = schema_uri(ty, 1);
        assert_eq!(uri, "urn:conv:schema:conv.in.message.received:v1");
        assert_eq!(parse_schema(ty, &uri), Ok(SchemaVersion::Conv(1)));
        assert_eq!(parse_schema(ty, "https://example.com/x.json"), Ok(SchemaVersion::Foreign));
        assert!(parse_schema(ty, "urn:conv:schema:conv.in.timer.fired:v1").is_err());
        assert!(parse_schema(ty, "urn:conv:schema:conv.in.message.received:vx").is_err());
    }
}

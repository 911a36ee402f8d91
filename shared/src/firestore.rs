//! Rust types ↔ Firestore's typed JSON (REST `Document.fields`).
//!
//! The edge (over REST, in WASM) and the worker both store job records through this mapping,
//! so a record written by one side reads back identically on the other. Any `Serialize` type
//! maps through `serde_json::Value`: strings, integers (as `integerValue` strings), floats,
//! booleans, null, arrays and maps. Fields named in `timestamps` become `timestampValue`
//! (needed for Firestore's TTL policy), and read back as RFC 3339 strings.

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};

/// A document that does not map to the expected type.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("the Firestore document has no `fields` object")]
    NoFields,
    #[error("unsupported Firestore value {0}")]
    Unsupported(String),
    #[error("the Firestore document does not match the record type: {0}")]
    Shape(#[from] serde_json::Error),
}

/// `{"fields": {...}}` for a record whose JSON form is an object.
pub fn to_document<T: Serialize>(record: &T, timestamps: &[&str]) -> Result<Value, MappingError> {
    let Value::Object(map) = serde_json::to_value(record)? else {
        return Err(MappingError::Unsupported(
            "a record that is not a JSON object".into(),
        ));
    };
    Ok(json!({ "fields": to_fields(&map, timestamps) }))
}

/// The `fields` object for a JSON map (top-level `timestamps` become `timestampValue`).
pub fn to_fields(map: &Map<String, Value>, timestamps: &[&str]) -> Value {
    let mut fields = Map::with_capacity(map.len());
    for (k, v) in map {
        let typed = match v {
            Value::String(s) if timestamps.contains(&k.as_str()) => json!({ "timestampValue": s }),
            other => to_value(other),
        };
        fields.insert(k.clone(), typed);
    }
    Value::Object(fields)
}

/// One JSON value as a Firestore `Value`.
pub fn to_value(v: &Value) -> Value {
    match v {
        Value::Null => json!({ "nullValue": null }),
        Value::Bool(b) => json!({ "booleanValue": b }),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => json!({ "integerValue": i.to_string() }),
            (None, Some(u)) => json!({ "integerValue": u.to_string() }),
            _ => json!({ "doubleValue": n.as_f64().unwrap_or(0.0) }),
        },
        Value::String(s) => json!({ "stringValue": s }),
        Value::Array(items) => {
            json!({ "arrayValue": { "values": items.iter().map(to_value).collect::<Vec<_>>() } })
        }
        Value::Object(map) => json!({ "mapValue": { "fields": to_fields(map, &[]) } }),
    }
}

/// A Firestore `Value` as plain JSON.
pub fn from_value(v: &Value) -> Result<Value, MappingError> {
    let Some((kind, inner)) = v.as_object().and_then(|o| o.iter().next()) else {
        return Err(MappingError::Unsupported(v.to_string()));
    };
    Ok(match kind.as_str() {
        "nullValue" => Value::Null,
        "booleanValue" => Value::Bool(inner.as_bool().unwrap_or(false)),
        "integerValue" => {
            let n = match inner {
                Value::String(s) => s.parse::<i64>().ok(),
                Value::Number(n) => n.as_i64(),
                _ => None,
            };
            json!(n.ok_or_else(|| MappingError::Unsupported(v.to_string()))?)
        }
        "doubleValue" => match inner {
            Value::Number(_) => inner.clone(),
            // Firestore writes NaN/Infinity as strings; no record field holds them.
            _ => return Err(MappingError::Unsupported(v.to_string())),
        },
        "stringValue" | "timestampValue" | "referenceValue" => inner.clone(),
        "arrayValue" => {
            let values = inner.get("values").and_then(Value::as_array);
            Value::Array(
                values
                    .map(|vs| vs.iter().map(from_value).collect::<Result<Vec<_>, _>>())
                    .transpose()?
                    .unwrap_or_default(),
            )
        }
        "mapValue" => from_fields(inner.get("fields").unwrap_or(&Value::Null))?,
        _ => return Err(MappingError::Unsupported(v.to_string())),
    })
}

/// A `fields` object as a plain JSON object (missing fields: empty object).
pub fn from_fields(fields: &Value) -> Result<Value, MappingError> {
    let mut out = Map::new();
    if let Some(map) = fields.as_object() {
        for (k, v) in map {
            out.insert(k.clone(), from_value(v)?);
        }
    }
    Ok(Value::Object(out))
}

/// Whether Firestore refused a write because another writer got there first: a create of a
/// document that exists, or a precondition (`updateTime`, `exists`) that no longer holds.
/// Such a refusal is an answer, not a fault.
pub fn write_conflict(status: u16, body: &str) -> bool {
    matches!(status, 400 | 404 | 409)
        && ["FAILED_PRECONDITION", "ALREADY_EXISTS", "NOT_FOUND"]
            .iter()
            .any(|s| body.contains(s))
}

/// Whether Firestore aborted a request under contention (`409 ABORTED`, "too much
/// contention"): nothing was written, and the same request may simply be sent again, as
/// after a 429 or a 503. Read as a conflict, it would pass for another writer's change.
pub fn aborted(status: u16, body: &str) -> bool {
    status == 409 && body.contains("ABORTED")
}

/// Whether an answer of Firestore (or Pub/Sub) is worth sending the same request again for:
/// 408 (the server's own timeout), 429, any 5xx, and 409 `ABORTED` (contention). The edge and
/// the worker both retry exactly these.
pub fn transient(status: u16, body: &str) -> bool {
    matches!(status, 408 | 429 | 500..=599) || aborted(status, body)
}

/// A REST `Document` as a record.
pub fn from_document<T: DeserializeOwned>(doc: &Value) -> Result<T, MappingError> {
    let fields = doc.get("fields").ok_or(MappingError::NoFields)?;
    Ok(serde_json::from_value(from_fields(fields)?)?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[test]
    fn write_conflicts_are_told_from_faults() {
        for (status, body) in [
            (400, r#"{"error":{"status":"FAILED_PRECONDITION"}}"#),
            (409, r#"{"error":{"status":"ALREADY_EXISTS"}}"#),
            (404, r#"{"error":{"status":"NOT_FOUND"}}"#),
        ] {
            assert!(write_conflict(status, body), "{status} {body}");
            assert!(!aborted(status, body), "{status} {body}");
        }
        let contention = r#"{"error":{"code":409,"status":"ABORTED","message":"Too much contention on these documents. Please try again."}}"#;
        assert!(aborted(409, contention) && !write_conflict(409, contention));
        for (status, body) in [
            (400, r#"{"error":{"status":"INVALID_ARGUMENT"}}"#),
            (403, r#"{"error":{"status":"PERMISSION_DENIED"}}"#),
            (503, r#"{"error":{"status":"ABORTED"}}"#),
        ] {
            assert!(!write_conflict(status, body), "{status} {body}");
        }
    }

    #[test]
    fn transient_answers_are_the_ones_to_send_again() {
        let contention = r#"{"error":{"status":"ABORTED"}}"#;
        for (status, body) in [(408, ""), (429, ""), (500, ""), (503, ""), (599, "")] {
            assert!(transient(status, body), "{status}");
        }
        assert!(transient(409, contention));
        for (status, body) in [
            (200, ""),
            (400, r#"{"error":{"status":"INVALID_ARGUMENT"}}"#),
            (403, ""),
            (404, r#"{"error":{"status":"NOT_FOUND"}}"#),
            (409, r#"{"error":{"status":"ALREADY_EXISTS"}}"#),
            (600, ""),
        ] {
            assert!(!transient(status, body), "{status} {body}");
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        name: String,
        n: u64,
        neg: i64,
        f: f64,
        ok: bool,
        none: Option<String>,
        list: Vec<u32>,
        nested: Nested,
        at: String,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Nested {
        inner: String,
    }

    #[test]
    fn record_round_trips_and_timestamps_are_typed() {
        let rec = Rec {
            name: "안녕 🍜".into(),
            n: 42,
            neg: -7,
            f: 0.25,
            ok: true,
            none: None,
            list: vec![1, 2, 3],
            nested: Nested { inner: "x".into() },
            at: "2026-11-27T14:35:54.123Z".into(),
        };
        let doc = to_document(&rec, &["at"]).expect("maps");
        assert_eq!(doc["fields"]["n"], json!({"integerValue": "42"}));
        assert_eq!(
            doc["fields"]["at"],
            json!({"timestampValue": "2026-11-27T14:35:54.123Z"})
        );
        assert_eq!(doc["fields"]["none"], json!({"nullValue": null}));
        assert_eq!(
            doc["fields"]["nested"],
            json!({"mapValue": {"fields": {"inner": {"stringValue": "x"}}}})
        );
        let back: Rec = from_document(&doc).expect("reads back");
        assert_eq!(back, rec);
    }

    #[test]
    fn empty_containers_as_firestore_returns_them() {
        // Firestore omits `values` for an empty array and `fields` for an empty map.
        let v = from_value(&json!({"arrayValue": {}})).expect("array");
        assert_eq!(v, json!([]));
        let v = from_value(&json!({"mapValue": {}})).expect("map");
        assert_eq!(v, json!({}));
    }

    #[test]
    fn unknown_value_kinds_are_errors_not_panics() {
        for bad in [
            json!({"geoPointValue": {}}),
            json!({}),
            json!("x"),
            json!({"integerValue": "x"}),
        ] {
            assert!(from_value(&bad).is_err(), "{bad}");
        }
        assert!(matches!(
            from_document::<Rec>(&json!({})),
            Err(MappingError::NoFields)
        ));
    }

    proptest! {
        #[test]
        fn any_json_round_trips(v in arb_json()) {
            prop_assert_eq!(from_value(&to_value(&v)).expect("round trip"), v);
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            (-1e9f64..1e9).prop_map(|f| json!(f)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}

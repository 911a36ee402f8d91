//! Request bodies as JSON: the declared type, size and encoding checked, the text parsed; and
//! two measures of JSON taken without building it (its size as text, its count of values).

use serde_json::Value;
use shared::wire::UTF8_BOM;

use crate::http::{ApiError, Request};

/// The body of `req`, at most `limit` bytes, as JSON (see [`json_text`]).
pub fn json_body(req: &Request, limit: usize) -> Result<Value, ApiError> {
    parse_json(json_text(req, limit)?)
}

/// `text` as JSON, or `400 invalid_json` saying where it stops being JSON.
pub fn parse_json(text: &str) -> Result<Value, ApiError> {
    serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))
}

/// The body as text, once its declared type, size and encoding are checked.
pub fn json_text(req: &Request, limit: usize) -> Result<&str, ApiError> {
    let Some(ct) = req.header("content-type") else {
        return Err(ApiError::new(
            415,
            "unsupported_media_type",
            "the request has no Content-Type: send `Content-Type: application/json`",
        ));
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        // `curl -d` and HTML forms send this one by default.
        let hint = if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            " (curl's `-d` sends it unless told otherwise: add `-H 'content-type: application/json'`)"
        } else {
            ""
        };
        return Err(ApiError::new(
            415,
            "unsupported_media_type",
            format!("send `Content-Type: application/json`, got {ct:?}{hint}"),
        ));
    }
    // JSON is UTF-8 (RFC 8259); a body declared in another charset (EUC-KR, CP949, …) is
    // refused by name rather than read as broken UTF-8.
    let charset = ct.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches('"'))
    });
    if let Some(cs) =
        charset.filter(|cs| !cs.eq_ignore_ascii_case("utf-8") && !cs.eq_ignore_ascii_case("utf8"))
    {
        return Err(ApiError::new(
            415,
            "unsupported_media_type",
            format!("JSON bodies are UTF-8; got charset={cs:?}: re-encode the body as UTF-8"),
        ));
    }
    if req.body.len() > limit {
        return Err(ApiError::new(
            413,
            "payload_too_large",
            // The adapter may have stopped reading past the limit: the size is not known.
            format!("the body is larger than {limit} bytes, the most allowed here"),
        ));
    }
    // A UTF-8 byte-order mark before the JSON (some Windows tools write one) is not part of it.
    let body = req.body.strip_prefix(UTF8_BOM).unwrap_or(&req.body);
    std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_utf8",
            format!(
                "the body is not UTF-8 (byte {}); JSON is always UTF-8: re-encode it (EUC-KR and CP949 are not accepted)",
                e.valid_up_to()
            ),
        )
    })
}

/// Bytes of `value` as JSON, counted without building the text.
pub fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Strings always serialize, and counting cannot fail.
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// Whether the JSON `text` holds more than `max` values (an array's elements, an object's
/// values and the containers themselves), counted as it is read, building nothing. A
/// `serde_json::Value` takes 32 bytes or more, so a body of 8 MiB of `0,` would grow a tree of
/// ~128 MiB: more than a Worker isolate or a small Lambda function has. Text that is not JSON
/// counts as not too large (the parse that follows says what is wrong with it).
pub fn more_values_than(text: &str, max: usize) -> bool {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;

    #[derive(Clone, Copy)]
    struct Counter<'a> {
        left: &'a Cell<usize>,
        over: &'a Cell<bool>,
    }
    impl Counter<'_> {
        fn take<E: serde::de::Error>(self) -> Result<(), E> {
            match self.left.get().checked_sub(1) {
                Some(left) => {
                    self.left.set(left);
                    Ok(())
                }
                None => {
                    self.over.set(true);
                    Err(E::custom("too many values"))
                }
            }
        }
    }
    impl<'de> DeserializeSeed<'de> for Counter<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Counter<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
            self.take()
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
            self.take()
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
            self.take()
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
            self.take()
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            self.take()
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            self.take()
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
            self.take()?;
            while seq.next_element_seed(self)?.is_some() {}
            Ok(())
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
            self.take()?;
            while map.next_key::<IgnoredAny>()?.is_some() {
                map.next_value_seed(self)?;
            }
            Ok(())
        }
    }
    let (left, over) = (Cell::new(max), Cell::new(false));
    let mut de = serde_json::Deserializer::from_str(text);
    let _ = Counter {
        left: &left,
        over: &over,
    }
    .deserialize(&mut de);
    over.get()
}

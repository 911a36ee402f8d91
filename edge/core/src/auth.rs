//! API keys: stored only as salted SHA-256 hashes, compared in constant time.
//!
//! The `API_KEYS` secret holds entries `name:salt_hex:hash_hex`, separated by commas or
//! whitespace, where `hash = sha256(salt ‖ key)`. `name` is who owns the jobs a key creates.
//! `cargo xtask api-key NAME` prints a fresh key and its entry.

use shared::apikey::digest;
pub use shared::apikey::entry;

use crate::http::ApiError;

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    salt: Vec<u8>,
    hash: [u8; 32],
}

/// The parsed `API_KEYS` secret.
#[derive(Clone, Debug, Default)]
pub struct KeyStore {
    entries: Vec<Entry>,
}

impl KeyStore {
    /// Parses the secret; errors name the bad entry by position, never its content.
    pub fn parse(secret: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, raw) in secret
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let bad = || format!("API_KEYS entry {} is not name:salt_hex:sha256_hex", i + 1);
            let mut parts = raw.split(':');
            let (Some(name), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let salt = hex::decode(salt).map_err(|_| bad())?;
            let hash: [u8; 32] = hex::decode(hash)
                .ok()
                .and_then(|h| h.try_into().ok())
                .ok_or_else(bad)?;
            if name.is_empty() || salt.len() < 8 {
                return Err(bad());
            }
            entries.push(Entry {
                name: name.to_owned(),
                salt,
                hash,
            });
        }
        if entries.is_empty() {
            return Err("API_KEYS holds no key entries".into());
        }
        Ok(Self { entries })
    }

    /// The owner of `key`, checking every entry in constant time per entry.
    pub fn owner(&self, key: &str) -> Option<&str> {
        let mut found = None;
        for e in &self.entries {
            if ct_eq(&digest(&e.salt, key), &e.hash) && found.is_none() {
                found = Some(e.name.as_str());
            }
        }
        found
    }

    /// Checks `Authorization: Bearer <key>` and returns the owner.
    pub fn authorize(&self, header: Option<&str>) -> Result<&str, ApiError> {
        let Some(value) = header else {
            return Err(ApiError::new(
                401,
                "missing_api_key",
                "send `Authorization: Bearer <api key>`",
            ));
        };
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let key = value
            .trim_start()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    401,
                    "invalid_authorization",
                    "the Authorization header must be `Bearer <api key>`",
                )
            })?;
        self.owner(key)
            .ok_or_else(|| ApiError::new(401, "invalid_api_key", "the API key is not valid"))
    }
}

/// Constant-time equality of two digests.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from short-circuiting the fold.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> KeyStore {
        let s = format!(
            "{}, {}",
            entry("alice", "key-a", b"saltsalt1"),
            entry("bob", "key-b", b"saltsalt2")
        );
        KeyStore::parse(&s).expect("parses")
    }

    #[test]
    fn keys_map_to_their_owner() {
        let s = store();
        assert_eq!(s.owner("key-a"), Some("alice"));
        assert_eq!(s.owner("key-b"), Some("bob"));
        assert_eq!(s.owner("key-c"), None);
        assert_eq!(s.owner(""), None);
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let header = format!("{scheme} key-b");
            assert_eq!(s.authorize(Some(&header)), Ok("bob"), "{header}");
        }
    }

    #[test]
    fn bad_headers_are_401_with_distinct_codes() {
        let s = store();
        for (h, code) in [
            (None, "missing_api_key"),
            (Some("key-a"), "invalid_authorization"),
            (Some("Basic a2V5"), "invalid_authorization"),
            (Some("Bearer "), "invalid_authorization"),
            (Some("Bearer"), "invalid_authorization"),
            (Some("Bearerkey-a"), "invalid_authorization"),
            (Some("Bearer nope"), "invalid_api_key"),
        ] {
            let e = s.authorize(h).expect_err("rejected");
            assert_eq!((e.status, e.code), (401, code), "{h:?}");
        }
    }

    #[test]
    fn malformed_secrets_are_rejected_without_echoing_them() {
        for bad in [
            "",
            "a:b",
            "a:zz:00",
            "a:0011223344556677:00",
            ":0011223344556677:",
        ] {
            let e = KeyStore::parse(bad).expect_err("rejected");
            assert!(!e.contains("0011"), "{e}");
        }
    }
}

//! API-key hashing: the `API_KEYS` secret holds `name:salt_hex:sha256_hex` entries with
//! `hash = sha256(salt ‖ key)`. Shared by the edge (verification) and `cargo xtask api-key`.

use sha2::{Digest, Sha256};

/// `sha256(salt ‖ key)`.
pub fn digest(salt: &[u8], key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(key.as_bytes());
    h.finalize().into()
}

/// One `API_KEYS` entry for `key` under `name` with `salt`.
pub fn entry(name: &str, key: &str, salt: &[u8]) -> String {
    format!(
        "{name}:{}:{}",
        hex::encode(salt),
        hex::encode(digest(salt, key))
    )
}

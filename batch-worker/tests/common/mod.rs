//! Helpers shared by the integration tests.

/// `models/intent` of this source tree.
pub const INTENT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/intent");

/// The texts of the intent model's test split.
pub fn test_split_texts() -> Vec<String> {
    std::fs::read_to_string(format!("{INTENT_DIR}/data/test.jsonl"))
        .expect("test split")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["text"]
                .as_str()
                .expect("text")
                .to_owned()
        })
        .collect()
}

/// `text` as Notepad saves "Unicode": UTF-16 LE after its byte-order mark.
#[allow(dead_code)] // The embedded and serve tests use it; each test binary compiles this module.
pub fn utf16_with_bom(text: &str) -> Vec<u8> {
    [0xFF, 0xFE]
        .into_iter()
        .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
        .collect()
}

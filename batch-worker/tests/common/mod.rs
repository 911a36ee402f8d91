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

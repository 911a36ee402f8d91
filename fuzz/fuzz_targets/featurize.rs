//! Any bytes as a chat message through the featurizer, the model and the routing decision:
//! see `edge_core::testing::fuzz_featurize`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_core::testing::fuzz_featurize(data));

//! Any bytes as one HTTP request to the edge core: see `edge_core::testing::fuzz_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_core::testing::fuzz_request(data));

//! The fuzz targets' committed seeds (and any regression inputs saved beside them) replayed
//! as ordinary tests, so CI checks the fuzz invariants without a fuzzer.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("seed folder") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("seed");
        body(&data);
        n += 1;
    }
    n
}

#[test]
fn request_seeds_keep_the_invariants() {
    assert!(replay("request", edge_core::testing::fuzz_request) >= 10);
}

#[test]
fn featurize_seeds_keep_the_invariants() {
    assert!(replay("featurize", edge_core::testing::fuzz_featurize) >= 5);
}

#[test]
fn the_request_body_builds_every_kind_of_request() {
    // Every method × path selector, with and without a key and a body: no panic.
    for head in 0..=255u8 {
        edge_core::testing::fuzz_request(&[head]);
        let mut data = vec![head];
        data.extend_from_slice(b"x\0wait=3\0{\"message\":\"hi\"}");
        edge_core::testing::fuzz_request(&data);
    }
}

//! The worker (ONNX Runtime) and the edge (tract) run the same model and must agree.

use batch_worker::engine::{Classifier, Device};
use edge_core::model::IntentModel;

#[test]
fn onnx_runtime_and_tract_agree_on_the_test_split() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/intent");
    let mut ort =
        Classifier::load(std::path::Path::new(dir), Device::Cpu).expect("ORT loads the model");
    let tract = IntentModel::embedded().expect("tract loads the model");
    let texts: Vec<String> = std::fs::read_to_string(format!("{dir}/data/test.jsonl"))
        .expect("test split")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["text"]
                .as_str()
                .expect("text")
                .to_owned()
        })
        .collect();
    assert!(texts.len() > 1000);
    let mut worst = 0.0f32;
    for batch in texts.chunks(128) {
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        let probs = ort.probabilities(&refs).expect("ORT runs");
        for (text, p_ort) in batch.iter().zip(probs) {
            let p_tract = tract.probabilities(text).expect("tract runs");
            let d_ort = ort.policy().decide(&p_ort);
            let d_tract = tract.policy().decide(&p_tract);
            assert_eq!(d_ort.intent, d_tract.intent, "{text}");
            for (a, b) in p_ort.iter().zip(&p_tract) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(worst <= 1e-5, "largest probability difference {worst}");
}

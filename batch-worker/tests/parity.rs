//! The worker (ONNX Runtime) and the edge (tract) run the same model and must agree.

mod common;

use batch_worker::engine::{Classifier, Device};
use edge_core::model::IntentModel;

#[test]
fn onnx_runtime_and_tract_agree_on_the_test_split() {
    let mut ort = Classifier::load(std::path::Path::new(common::INTENT_DIR), Device::Cpu, 0)
        .expect("ORT loads the model");
    let tract = IntentModel::embedded().expect("tract loads the model");
    let texts = common::test_split_texts();
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

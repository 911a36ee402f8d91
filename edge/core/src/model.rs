//! The intent model: featurize → tract → routing policy.
//!
//! The model and its metadata are embedded in the binary (`include_bytes!`), so the edge, the
//! `route` CLI and the worker's parity test all run exactly the committed model. The edge
//! embeds the NNEF form (`model.nnef.tar`, written from `model.onnx` by
//! `cargo xtask train-intent`), so tract's ONNX parser stays out of the Worker; the worker's
//! parity test checks it against ONNX Runtime on `model.onnx`.

use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};
use shared::intent::{Decision, MetaError, Policy};
use tract_nnef::prelude::*;

/// `models/intent/model.nnef.tar`, embedded.
pub static MODEL_NNEF: &[u8] = include_bytes!("../../../models/intent/model.nnef.tar");
/// `models/intent/model.json`, embedded.
pub static MODEL_JSON: &str = include_str!("../../../models/intent/model.json");

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(
        "model.nnef.tar has sha256 {actual} but model.json expects {expected}; retrain with `cargo xtask train-intent`"
    )]
    Checksum { expected: String, actual: String },
    #[error("model.nnef.tar cannot be loaded by tract: {0}")]
    Tract(String),
}

type Plan = Arc<TypedRunnableModel>;

/// NNEF with the standard operators only. `tract_nnef::nnef()` would also register every
/// `tract_core` operator (FFT, STFT, …), and their code would then ship in the Worker.
fn standard_nnef() -> tract_nnef::framework::Nnef {
    use tract_nnef::internal::{DatLoader, GraphNnefLoader, ResourceLoader};
    tract_nnef::framework::Nnef {
        stdlib: tract_nnef::framework::stdlib(),
        registries: vec![tract_nnef::ops::tract_nnef()],
        resource_loaders: vec![GraphNnefLoader.into_boxed(), DatLoader.into_boxed()],
        allow_extended_identifier_syntax: false,
        extern_all_constants: false,
    }
}

/// Reads the NNEF tar (`graph.nnef` plus `.dat` tensors) without `Framework::model_for_read`,
/// whose sub-model support instantiates the full registry.
fn proto_model(tar_bytes: &[u8]) -> TractResult<tract_nnef::ast::ProtoModel> {
    use std::io::Read;
    use tract_nnef::ast::{Identifier, ProtoModel};
    let mut doc = None;
    let mut tensors = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(std::io::Cursor::new(tar_bytes));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        if path == "graph.nnef" {
            let mut text = String::new();
            entry.read_to_string(&mut text)?;
            doc = Some(tract_nnef::ast::parse::parse_document(&text)?);
        } else if let Some(id) = path.strip_suffix(".dat") {
            let tensor = tract_nnef::tensors::read_tensor(&mut entry)?;
            tensors.insert(Identifier::from(id), Arc::new(tensor));
        } else {
            return Err(tract_nnef::internal::format_err!(
                "unexpected file {path} in the NNEF archive"
            ));
        }
    }
    Ok(ProtoModel {
        doc: doc.ok_or_else(|| {
            tract_nnef::internal::format_err!("the NNEF archive has no graph.nnef")
        })?,
        tensors,
        quantization: None,
        resources: Default::default(),
    })
}

/// A loaded, optimised intent model.
#[derive(Debug)]
pub struct IntentModel {
    policy: Policy,
    plan: Plan,
    sha256: String,
}

impl IntentModel {
    /// Loads a model from its NNEF tar bytes and `model.json` text.
    pub fn load(nnef: &[u8], meta_json: &str) -> Result<Self, LoadError> {
        let policy = Policy::from_json(meta_json)?;
        let actual = hex::encode(Sha256::digest(nnef));
        if actual != policy.meta().nnef_sha256 {
            return Err(LoadError::Checksum {
                expected: policy.meta().nnef_sha256.clone(),
                actual,
            });
        }
        // The model's identity is its ONNX file; the NNEF tar was verified to come from it.
        let sha256 = policy.meta().onnx_sha256.clone();
        let dim = policy.featurizer().dim();
        let tract = |e: TractError| LoadError::Tract(format!("{e:#}"));
        let proto = proto_model(nnef).map_err(tract)?;
        let model = standard_nnef()
            .model_for_proto_model(&proto)
            .map_err(tract)?;
        let want: TypedFact = f32::fact([1, dim]);
        if model.input_fact(0).map_err(tract)? != &want {
            return Err(LoadError::Tract(format!(
                "the model input is not [1, {dim}] f32"
            )));
        }
        let plan = model
            .into_optimized()
            .map_err(tract)?
            .into_runnable()
            .map_err(tract)?;
        Ok(Self {
            policy,
            plan,
            sha256,
        })
    }

    /// The embedded model, loaded once per process (per isolate on Workers).
    pub fn embedded() -> Result<&'static IntentModel, &'static LoadError> {
        static MODEL: OnceLock<Result<IntentModel, LoadError>> = OnceLock::new();
        MODEL
            .get_or_init(|| IntentModel::load(MODEL_NNEF, MODEL_JSON))
            .as_ref()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn name(&self) -> &str {
        &self.policy.meta().name
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The label probabilities for `text`.
    pub fn probabilities(&self, text: &str) -> Result<Vec<f32>, TractError> {
        let featurizer = self.policy.featurizer();
        let mut input = Tensor::zero::<f32>(&[1, featurizer.dim()])?;
        featurizer.featurize_into(text, input.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        let out = self.plan.run(tvec!(input.into()))?;
        let probs = out[0].to_plain_array_view::<f32>()?;
        Ok(probs.iter().copied().collect())
    }

    /// Classifies `text` and decides where it goes. A model fault routes to the queue.
    pub fn classify(&self, text: &str) -> Decision {
        match self.probabilities(text) {
            Ok(p) => self.policy.decide(&p),
            Err(_) => self.policy.decide(&[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::intent::Route;

    use super::*;

    fn model() -> &'static IntentModel {
        IntentModel::embedded().expect("embedded model loads")
    }

    /// The model contract: one float input [batch, buckets], one probability output per label.
    #[test]
    fn embedded_model_has_the_expected_interface() {
        let m = model();
        let meta = m.policy().meta();
        assert_eq!(meta.input, "features");
        assert_eq!(meta.output, "probs");
        let p = m.probabilities("안녕").expect("runs");
        assert_eq!(p.len(), meta.labels.len());
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn corrupted_model_is_rejected_by_checksum() {
        let mut bytes = MODEL_NNEF.to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            IntentModel::load(&bytes, MODEL_JSON),
            Err(LoadError::Checksum { .. })
        ));
    }

    /// Fails unless the model routes every one of `texts` to `route`.
    fn assert_routed(texts: &[&str], route: Route) {
        for text in texts {
            let d = model().classify(text);
            assert_eq!(d.route, route, "{text}: {d:?}");
        }
    }

    /// Fails unless the model answers every one of `texts` at the edge with `intent`'s reply.
    fn assert_answered(texts: &[&str], intent: &str) {
        for text in texts {
            let d = model().classify(text);
            assert_eq!(
                (d.route, d.intent.as_str()),
                (Route::Edge, intent),
                "{text}: {d:?}"
            );
        }
    }

    #[test]
    fn common_trivial_messages_are_answered_at_the_edge() {
        assert_routed(
            &[
                "안녕하세요",
                "hello",
                "고마워",
                "thank you",
                "ㅎㅇ",
                "ㄱㅅ",
                "잘가",
                "ㅃㅇ",
                "bye",
                "뭐 할 수 있어?",
                "너 누구야?",
            ],
            Route::Edge,
        );
    }

    /// 도움 ("help") on its own is a call for help. The seeds once held it only in thanks for
    /// help (도움 됐어 고마워), and the edge answered a bare 도움 with "you're welcome".
    #[test]
    fn a_bare_call_for_help_gets_the_help_reply() {
        assert_answered(&["도움", "도움!", "도움요", "help", "헬프"], "help");
    }

    /// A plea of distress may be a joke or an emergency: only the real model, with the
    /// conversation, can tell. A model once answered 살려주세요 with "I am a chatbot".
    #[test]
    fn a_plea_of_distress_is_queued() {
        assert_routed(
            &[
                "살려주세요",
                "살려줘",
                "무서워요 도와주세요",
                "save me",
                "SOS",
            ],
            Route::Queue,
        );
    }

    /// A trivial word negated in two or three words answers the bot back, and a canned reply
    /// to it is wrong: a model once answered 안 고마워 with "you're welcome". A trivial message
    /// that merely contains 안 keeps its reply.
    #[test]
    fn a_trivial_word_negated_in_a_few_words_is_queued() {
        assert_routed(
            &[
                "안 고마워요",
                "안 감사합니다",
                "인사 안 할래",
                "감사하긴 뭘",
                "not happy to meet you",
            ],
            Route::Queue,
        );
        assert_answered(&["덕분에 길 안 잃었어 고마워요"], "thanks");
        assert_answered(&["안녕히 계세요"], "goodbye");
    }

    /// A child telling the bot their age or name is chit-chat, not a question about the bot:
    /// a model once answered 나 10살이야 ("I'm 10") with "I am a chatbot".
    #[test]
    fn a_child_telling_about_themselves_is_queued() {
        assert_routed(
            &[
                "나 9살이야",
                "저는 열한 살이에요",
                "나 4학년이야",
                "내 이름은 하준이야",
                "I'm eleven years old",
            ],
            Route::Queue,
        );
        assert_answered(
            &["너 몇 살이야?", "넌 몇 살이니?", "네 이름은?"],
            "identity",
        );
    }

    /// A question announced with 물어볼게 ("I'll ask") is not a goodbye: a model once answered
    /// 하나만 물어볼게요 ("let me ask one thing") with "bye", after the goodbye seeds' 또
    /// 물어볼게 ("I'll ask again").
    #[test]
    fn a_question_announced_with_i_will_ask_is_not_a_goodbye() {
        assert_routed(
            &["하나만 물어볼게요", "딱 하나만 물어볼게", "질문 하나 할게"],
            Route::Queue,
        );
        assert_answered(&["다음에 또 물어볼게요", "나중에 또 물어볼게"], "goodbye");
    }

    #[test]
    fn mixed_greeting_and_request_is_queued() {
        assert_routed(
            &[
                "안녕! 근처 짜장면집 추천해줘",
                "고마워, 그럼 내일은 뭐 먹을까?",
                "hi, where can I use my meal card?",
                "thanks! any pizza place nearby?",
            ],
            Route::Queue,
        );
    }

    #[test]
    fn code_switching_is_classified() {
        let d = model().classify("hi 안녕하세요");
        assert_eq!(d.intent, "greeting", "{d:?}");
    }

    #[test]
    fn food_requests_are_queued() {
        assert_routed(
            &[
                "떡볶이 맛집 알려줘",
                "급식카드 되는 치킨집 있어?",
                "where can I eat pizza?",
            ],
            Route::Queue,
        );
    }
}

//! Intent labels, the model's metadata file, and the routing policy.
//!
//! The policy is deliberately one-sided: a wrong canned answer costs more than a queued reply,
//! so the edge answers only when the top intent is trivial *and* the model's probability that
//! the message is trivial at all ([`top_intent`]'s confidence, 1 − P(`other`)) reaches that
//! intent's threshold, calibrated on the dev split by training.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::features::{ConfigError, Featurizer, FeaturizerConfig};

/// Intents the edge may answer itself.
pub const TRIVIAL_INTENTS: [&str; 5] = ["greeting", "thanks", "goodbye", "help", "identity"];

/// The label for everything that needs the real model.
pub const OTHER: &str = "other";

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Answered at once by the edge from templates.
    Edge,
    /// Turned into a job for the batch worker.
    Queue,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Edge => "edge",
            Route::Queue => "queue",
        }
    }
}

/// The route a correctly classified message with this intent should take.
pub fn expected_route(intent: &str) -> Route {
    if TRIVIAL_INTENTS.contains(&intent) {
        Route::Edge
    } else {
        Route::Queue
    }
}

/// Whether the edge's reply for `answered` is a right answer to a message whose intent is
/// `actual`: the same intent, or a thank-you and a farewell, which are both closing turns.
/// "Thanks, bye" is labelled `goodbye` and often read as `thanks`; "you're welcome, ask me any
/// time" answers it as well as "bye, see you next time" does, and either answers a bare
/// "thanks!" harmlessly. Training calibrates the thresholds with this rule.
pub fn reply_fits(answered: &str, actual: &str) -> bool {
    const CLOSING: [&str; 2] = ["thanks", "goodbye"];
    answered == actual || (CLOSING.contains(&answered) && CLOSING.contains(&actual))
}

/// The top intent of a probability vector (`other` at index `other`) and its confidence: the
/// probability of the route it stands for. For a trivial intent that is 1 − P(`other`), the
/// probability that the message is trivial at all: a message read as half `help`, half
/// `identity` is still surely no request, and gets the likelier one's reply (training's reply
/// target bounds how often such a reply does not fit). For `other` it is P(`other`).
///
/// `None` when `probs` is empty or has a non-finite value; the first of equal maxima wins.
pub fn top_intent(probs: &[f32], other: usize) -> Option<(usize, f32)> {
    if !probs.iter().all(|p| p.is_finite()) {
        return None;
    }
    let (i, p) = probs
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &p)| match best {
            Some((_, bp)) if bp >= p => best,
            _ => Some((i, p)),
        })?;
    if i == other {
        return Some((i, p));
    }
    Some((i, 1.0 - probs.get(other).copied().unwrap_or(0.0)))
}

/// `models/intent/model.json`: everything needed to use `model.onnx`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// Human-readable model name, reported on `/healthz`.
    pub name: String,
    /// Output labels, in the order of the model's probability vector.
    pub labels: Vec<String>,
    pub featurizer: FeaturizerConfig,
    /// Minimum probability per trivial intent for the edge to answer.
    pub thresholds: BTreeMap<String, f32>,
    /// sha256 of `model.onnx`, hex: the model's identity (reported on `/healthz`).
    pub onnx_sha256: String,
    /// sha256 of `model.nnef.tar`, the same network in tract's NNEF form, which the edge
    /// embeds (it keeps the ONNX parser out of the Worker).
    #[serde(default)]
    pub nnef_sha256: String,
    /// ONNX input and output tensor names.
    pub input: String,
    pub output: String,
    /// Scores measured by training (informational).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// A problem with the model metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("model.json is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Featurizer(#[from] ConfigError),
    #[error("model.json lists no `other` label; retrain with `cargo xtask train-intent`")]
    NoOther,
    #[error("threshold for `{0}` names an intent the model does not have")]
    UnknownThreshold(String),
    #[error("threshold for `{0}` must lie in (0, 1], got {1}")]
    BadThreshold(String, f32),
}

/// Validated metadata plus its featurizer: the routing policy.
#[derive(Clone, Debug)]
pub struct Policy {
    meta: ModelMeta,
    featurizer: Featurizer,
    /// Threshold per label index; `None` for labels the edge never answers.
    thresholds: Vec<Option<f32>>,
    /// Index of [`OTHER`] in the labels.
    other: usize,
}

/// The decision for one message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub intent: String,
    /// Written as the `f64` it widens to, as the API and the worker's output lines write it,
    /// so that `route` and they print the same digits for one message.
    #[serde(serialize_with = "widened")]
    pub confidence: f32,
    pub route: Route,
}

fn widened<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(f64::from(*v))
}

/// One output line of `route eval` and `route classify` (and, with its label added, of
/// `cargo xtask train-intent --dev-report`): `{"text","intent","confidence","route","expected"}`,
/// `expected` being `null` when the message came unlabelled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteLine<'a> {
    pub text: &'a str,
    #[serde(flatten)]
    pub decision: &'a Decision,
    pub expected: Option<Route>,
}

impl Policy {
    /// Parses and validates `model.json`.
    pub fn from_json(json: &str) -> Result<Self, MetaError> {
        Self::new(serde_json::from_str(json)?)
    }

    pub fn new(meta: ModelMeta) -> Result<Self, MetaError> {
        let featurizer = Featurizer::new(meta.featurizer)?;
        let Some(other) = meta.labels.iter().position(|l| l == OTHER) else {
            return Err(MetaError::NoOther);
        };
        let mut thresholds = vec![None; meta.labels.len()];
        for (intent, &t) in &meta.thresholds {
            let Some(i) = meta.labels.iter().position(|l| l == intent) else {
                return Err(MetaError::UnknownThreshold(intent.clone()));
            };
            if !(t > 0.0 && t <= 1.0) {
                return Err(MetaError::BadThreshold(intent.clone(), t));
            }
            if expected_route(intent) == Route::Edge {
                thresholds[i] = Some(t);
            }
        }
        Ok(Self {
            meta,
            featurizer,
            thresholds,
            other,
        })
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    pub fn featurizer(&self) -> &Featurizer {
        &self.featurizer
    }

    /// Decides from the model's probability vector (one entry per label).
    ///
    /// A vector of the wrong length or with non-finite values routes to the queue: the
    /// edge never answers on output it cannot trust.
    pub fn decide(&self, probs: &[f32]) -> Decision {
        let (intent, confidence, route) = self.decide_label(probs);
        Decision {
            intent: intent.to_owned(),
            confidence,
            route,
        }
    }

    /// [`Policy::decide`] as (intent, confidence, route), the intent borrowed from the labels:
    /// no allocation, for callers that decide hundreds of thousands of rows.
    pub fn decide_label(&self, probs: &[f32]) -> (&str, f32, Route) {
        let top = if probs.len() == self.meta.labels.len() {
            top_intent(probs, self.other)
        } else {
            None
        };
        let Some((i, confidence)) = top else {
            return (OTHER, 0.0, Route::Queue);
        };
        let route = match self.thresholds[i] {
            Some(t) if confidence >= t => Route::Edge,
            _ => Route::Queue,
        };
        (&self.meta.labels[i], confidence, route)
    }
}

/// Routing quality over a labelled set: what `route eval` prints last.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scoreboard {
    n: u64,
    correct: u64,
    edge: u64,
    edge_correct: u64,
    expected_edge: u64,
}

/// The summary line of `route eval`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Scores {
    pub n: u64,
    /// Share of messages routed as expected.
    pub accuracy: f64,
    /// Of the messages the edge answered, the share that should have been answered there.
    pub edge_precision: f64,
    /// Of the messages that should be answered at the edge, the share that were.
    pub edge_recall: f64,
}

impl Scoreboard {
    /// How many lines were scored.
    pub fn n(&self) -> u64 {
        self.n
    }

    pub fn add(&mut self, decided: Route, expected: Route) {
        self.n += 1;
        self.correct += u64::from(decided == expected);
        self.expected_edge += u64::from(expected == Route::Edge);
        if decided == Route::Edge {
            self.edge += 1;
            self.edge_correct += u64::from(expected == Route::Edge);
        }
    }

    /// Ratios; an empty denominator gives 1.0 for precision (no wrong answers) and 0.0 otherwise.
    pub fn scores(&self) -> Scores {
        let ratio = |a: u64, b: u64, empty: f64| if b == 0 { empty } else { a as f64 / b as f64 };
        Scores {
            n: self.n,
            accuracy: ratio(self.correct, self.n, 0.0),
            edge_precision: ratio(self.edge_correct, self.edge, 1.0),
            edge_recall: ratio(self.edge_correct, self.expected_edge, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_line_has_the_contract_keys_in_order() -> Result<(), serde_json::Error> {
        let d = Decision {
            intent: "thanks".into(),
            confidence: 0.5,
            route: Route::Queue,
        };
        let line = |expected| RouteLine {
            text: "고마워",
            decision: &d,
            expected,
        };
        assert_eq!(
            serde_json::to_string(&line(Some(Route::Edge)))?,
            r#"{"text":"고마워","intent":"thanks","confidence":0.5,"route":"queue","expected":"edge"}"#
        );
        assert_eq!(
            serde_json::to_string(&line(None))?,
            r#"{"text":"고마워","intent":"thanks","confidence":0.5,"route":"queue","expected":null}"#
        );
        Ok(())
    }

    #[test]
    fn confidence_has_the_digits_the_api_writes() -> Result<(), serde_json::Error> {
        let d = Decision {
            intent: "greeting".into(),
            confidence: 0.999_181,
            route: Route::Edge,
        };
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&d)?)?;
        // The API's body is `json!({…, "confidence": d.confidence, …})`.
        let api = serde_json::json!({ "confidence": d.confidence });
        assert_eq!(v["confidence"].to_string(), api["confidence"].to_string());
        assert_eq!(v["confidence"].to_string(), "0.9991809725761414");
        Ok(())
    }

    fn policy() -> Policy {
        let meta = ModelMeta {
            name: "test".into(),
            labels: ["greeting", "thanks", "other"].map(String::from).to_vec(),
            featurizer: FeaturizerConfig::default(),
            thresholds: [("greeting".to_owned(), 0.9), ("thanks".to_owned(), 0.8)].into(),
            onnx_sha256: String::new(),
            nnef_sha256: String::new(),
            input: "features".into(),
            output: "probs".into(),
            metrics: BTreeMap::new(),
        };
        Policy::new(meta).expect("valid meta")
    }

    #[test]
    fn only_closing_turns_answer_each_other() {
        assert!(reply_fits("thanks", "thanks"));
        assert!(reply_fits("thanks", "goodbye"));
        assert!(reply_fits("goodbye", "thanks"));
        assert!(!reply_fits("greeting", "goodbye"));
        assert!(!reply_fits("help", "identity"));
        assert!(!reply_fits("thanks", OTHER));
        assert!(!reply_fits("goodbye", OTHER));
    }

    #[test]
    fn confident_trivial_intent_goes_to_the_edge() {
        let d = policy().decide(&[0.95, 0.03, 0.02]);
        assert_eq!((d.intent.as_str(), d.route), ("greeting", Route::Edge));
        assert!((d.confidence - 0.98).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn unconfident_trivial_intent_is_queued() {
        let d = policy().decide(&[0.6, 0.25, 0.15]);
        assert_eq!((d.intent.as_str(), d.route), ("greeting", Route::Queue));
        assert!((d.confidence - 0.85).abs() < 1e-6, "{d:?}");
        // Each intent has its own threshold.
        assert_eq!(policy().decide(&[0.25, 0.6, 0.15]).route, Route::Edge);
    }

    #[test]
    fn a_message_surely_trivial_goes_to_the_edge_though_split_between_intents() {
        let d = policy().decide(&[0.5, 0.45, 0.05]);
        assert_eq!((d.intent.as_str(), d.route), ("greeting", Route::Edge));
        assert!((d.confidence - 0.95).abs() < 1e-6, "{d:?}");
        // The same top intent with `other` close behind it is queued.
        let d = policy().decide(&[0.5, 0.05, 0.45]);
        assert_eq!((d.intent.as_str(), d.route), ("greeting", Route::Queue));
    }

    #[test]
    fn other_is_always_queued() {
        assert_eq!(policy().decide(&[0.0, 0.0, 1.0]).route, Route::Queue);
        let d = policy().decide(&[0.3, 0.3, 0.4]);
        assert_eq!(
            (d.intent.as_str(), d.confidence, d.route),
            (OTHER, 0.4, Route::Queue)
        );
    }

    #[test]
    fn the_top_intent_needs_finite_probabilities() {
        assert_eq!(top_intent(&[0.2, 0.2, 0.6], 0), Some((2, 0.8)));
        assert_eq!(top_intent(&[0.5, 0.5, 0.0], 2), Some((0, 1.0)));
        assert_eq!(top_intent(&[], 0), None);
        assert_eq!(top_intent(&[0.5, f32::INFINITY], 0), None);
    }

    #[test]
    fn malformed_probabilities_are_queued() {
        assert_eq!(policy().decide(&[1.0]).route, Route::Queue);
        assert_eq!(policy().decide(&[f32::NAN, 0.0, 0.0]).route, Route::Queue);
    }

    #[test]
    fn scoreboard_counts_precision_and_recall() {
        let mut s = Scoreboard::default();
        s.add(Route::Edge, Route::Edge);
        s.add(Route::Edge, Route::Queue);
        s.add(Route::Queue, Route::Edge);
        s.add(Route::Queue, Route::Queue);
        let r = s.scores();
        assert_eq!(
            (r.n, r.accuracy, r.edge_precision, r.edge_recall),
            (4, 0.5, 0.5, 0.5)
        );
        assert_eq!(Scoreboard::default().scores().edge_precision, 1.0);
    }

    #[test]
    fn invalid_meta_is_rejected() {
        let mut meta = policy().meta().clone();
        meta.thresholds.insert("dance".into(), 0.5);
        assert!(matches!(
            Policy::new(meta),
            Err(MetaError::UnknownThreshold(_))
        ));
        let mut meta = policy().meta().clone();
        meta.thresholds.insert("greeting".into(), 1.5);
        assert!(matches!(
            Policy::new(meta),
            Err(MetaError::BadThreshold(..))
        ));
    }
}

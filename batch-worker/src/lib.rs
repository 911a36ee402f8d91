//! The batch worker: inference with ONNX Runtime over bulk items, checkpointed so that a
//! killed process loses no work.
//!
//! - [`engine`]: ONNX Runtime setup (library discovery, CUDA/CPU selection) and the classifier;
//! - [`generate`]: text generation (KV-cache decoder, tokenizer, chat template, sampling);
//! - [`batching`]: continuous batching of text generation, for `run` and `serve`;
//! - [`embedded`]: `batch-worker run`, the no-cloud mode over local files;
//! - [`serve`]: `batch-worker serve`, shards from Pub/Sub with checkpoints in Firestore
//!   ([`store`]), outputs in object storage ([`outputs`]), GCE preemption notices ([`gce`]),
//!   Prometheus [`metrics`] and a start-up check that its services answer ([`reach`]).

pub mod batching;
pub mod embedded;
pub mod engine;
pub mod gce;
pub mod generate;
pub mod metrics;
pub mod outputs;
pub mod reach;
pub mod serve;
pub mod store;
pub mod tasks;

/// The first 16 hex digits of `hash`'s SHA-256: a fingerprint that tells two inputs, plans or
/// settings apart in a record or a log line (not a security boundary).
pub fn short_digest(hash: sha2::Sha256) -> String {
    use sha2::Digest;
    let mut hex = hex::encode(hash.finalize());
    hex.truncate(16);
    hex
}

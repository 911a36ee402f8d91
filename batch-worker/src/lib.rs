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

//! The batch worker: inference with ONNX Runtime over bulk items, checkpointed so that a
//! killed process loses no work.
//!
//! - [`engine`]: ONNX Runtime setup (library discovery, CUDA/CPU selection) and the models;
//! - [`embedded`]: `batch-worker run`, the no-cloud mode over local files.

pub mod embedded;
pub mod engine;
pub mod tasks;

//! batch-worker

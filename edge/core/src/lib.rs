//! edge-core

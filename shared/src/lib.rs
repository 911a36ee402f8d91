//! Types and pure functions shared by the edge (WASM) and the batch worker (native).
//!
//! Everything here is platform-free: no I/O, no clocks, no randomness. It compiles for
//! `wasm32-unknown-unknown` and for the host.

pub mod apikey;
pub mod b64;
pub mod features;
pub mod firestore;
pub mod intent;
pub mod jobs;
pub mod rng;
pub mod time;
pub mod wire;

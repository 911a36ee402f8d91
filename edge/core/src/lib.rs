//! The platform-free edge.
//!
//! Everything the Cloudflare Worker, the Lambda function and the `route` CLI have in common:
//! the intent model run by `tract`, the routing decision and the canned replies. Platform
//! adapters stay at the rim and only move bytes.

pub mod model;

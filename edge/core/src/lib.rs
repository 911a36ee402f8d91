//! The platform-free edge.
//!
//! Everything the Cloudflare Worker, the Lambda function and the `route` CLI have in common:
//! the intent model run by `tract`, the routing decision, the canned replies, the HTTP API
//! with its validation, auth, masking, and the Pub/Sub and Firestore REST clients. The
//! platform enters only through [`platform::Platform`]; adapters stay at the rim and only
//! move bytes.

pub mod api;
pub mod auth;
pub mod body;
pub mod config;
pub mod gcp;
pub mod http;
pub mod mask;
pub mod model;
pub mod platform;
pub mod replies;
pub mod testing;

pub use api::App;
pub use config::Config;
pub use http::{ApiError, Request, Response};
pub use platform::{HttpRequest, HttpResponse, Platform};

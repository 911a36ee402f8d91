//! What the edge needs from its platform: outbound HTTP, a clock, randomness, sleeping,
//! RS256 signing, a rate limiter and a log line. The Worker implements it on `fetch` and
//! WebCrypto, Lambda on `reqwest` and `ring`, tests on plain Rust.

use std::future::Future;

/// An outbound request (to Pub/Sub, Firestore, or the OAuth2 token endpoint).
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// Its answer.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The platform. Futures need not be `Send`: a Worker isolate is single-threaded.
#[allow(async_fn_in_trait)]
pub trait Platform {
    /// Sends `req`; `Err` only when no HTTP answer came (connection refused, DNS, timeout).
    fn http(&self, req: HttpRequest) -> impl Future<Output = Result<HttpResponse, String>>;
    /// Unix time in milliseconds.
    fn now_ms(&self) -> u64;
    /// Fills `buf` from a cryptographically secure source.
    fn random(&self, buf: &mut [u8]);
    /// Waits `ms` milliseconds.
    fn sleep(&self, ms: u64) -> impl Future<Output = ()>;
    /// RSASSA-PKCS1-v1_5 with SHA-256 over `msg` with a PKCS#8 DER private key.
    fn sign_rs256(
        &self,
        pkcs8_der: &[u8],
        msg: &[u8],
    ) -> impl Future<Output = Result<Vec<u8>, String>>;
    /// The platform's rate limiter for `key`: `Some(allowed)`, or `None` when there is none
    /// (the core then applies its own per-instance limit).
    fn rate_limit(&self, key: &str) -> impl Future<Output = Option<bool>>;
    /// Writes one structured log line (JSON).
    fn log(&self, line: &str);
}

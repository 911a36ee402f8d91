//! Test support, public so that the unit tests, the fuzz targets (`fuzz/`) and the replay of
//! their committed seeds share it: a platform with no network and a fake clock, a
//! runtime-free `block_on`, and the two fuzz bodies. Each fuzz body panics when an invariant
//! breaks; that panic is what the fuzzer reports.

use std::cell::{Cell, RefCell};
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use serde_json::Value;

use crate::model::IntentModel;
use crate::{App, Config, HttpRequest, HttpResponse, Platform, Request};

/// A platform with a fake clock that advances on `sleep`, deterministic "randomness", no
/// network (every upstream call is refused), and its log lines kept.
pub struct Offline {
    pub now: Cell<u64>,
    seq: Cell<u8>,
    pub logs: RefCell<Vec<String>>,
}

impl Default for Offline {
    fn default() -> Self {
        Self::new()
    }
}

impl Offline {
    pub fn new() -> Self {
        Self {
            now: Cell::new(1_795_790_154_000),
            seq: Cell::new(0),
            logs: RefCell::default(),
        }
    }
}

impl Platform for Offline {
    async fn http(&self, _req: HttpRequest) -> Result<HttpResponse, String> {
        Err("connection refused".into())
    }
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
    fn random(&self, buf: &mut [u8]) {
        for b in buf {
            self.seq.set(self.seq.get().wrapping_add(37));
            *b = self.seq.get();
        }
    }
    async fn sleep(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
    async fn sign_rs256(&self, _: &[u8], _: &[u8]) -> Result<Vec<u8>, String> {
        Err("no signer".into())
    }
    async fn rate_limit(&self, _key: &str) -> Option<bool> {
        None
    }
    fn log(&self, line: &str) {
        self.logs.borrow_mut().push(line.to_owned());
    }
}

/// Polls `f` to completion. Enough for the core on [`Offline`], whose futures never wait on
/// anything outside themselves.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// The API key the fuzzed requests may carry.
pub const FUZZ_KEY: &str = "fuzz-key-0123456789";

const METHODS: [&str; 6] = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"];
const PATHS: [&str; 8] = [
    "/v1/chat",
    "/v1/batches",
    "/v1/jobs/",
    "/healthz",
    "/hello",
    "/",
    "/v1/",
    "",
];
const TYPES: [&str; 4] = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "",
];

/// Fuzz body for request parsing and validation: `data` becomes one request (method, path,
/// query, headers and body all taken from it) served by the whole core on [`Offline`].
/// Invariants: no panic; a status the contract allows; every error is the contract's JSON
/// with a `snake_case` code, 4xx for the caller's mistakes and 5xx only for the refused
/// upstream; every response has `x-request-id`.
pub fn fuzz_request(data: &[u8]) {
    static APP: OnceLock<App> = OnceLock::new();
    let app = APP.get_or_init(|| {
        let keys = crate::auth::entry("fuzz", FUZZ_KEY, b"fuzz-salt-0123");
        let vars = [
            ("API_KEYS", keys),
            ("GCP_PROJECT", "fuzz".to_owned()),
            ("PUBSUB_EMULATOR_HOST", "127.0.0.1:9".to_owned()),
            ("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9".to_owned()),
            ("UPSTREAM_DEADLINE_MS", "50".to_owned()),
        ];
        App::new(Config::from_env(move |k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        }))
    });
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    // The rest: `suffix \0 query \0 body`; absent parts are empty.
    let mut parts = rest.splitn(3, |b| *b == 0);
    let suffix = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default().to_vec();
    let pick = |shift: u32, n: usize| (usize::from(head) >> shift) % n;
    let method = METHODS[pick(0, METHODS.len())];
    let path = format!("{}{suffix}", PATHS[pick(3, PATHS.len())]);
    let mut headers = Vec::new();
    match head >> 6 {
        0 => headers.push(("authorization".to_owned(), format!("Bearer {FUZZ_KEY}"))),
        1 => headers.push(("authorization".to_owned(), format!("Bearer {suffix}"))),
        2 => headers.push(("authorization".to_owned(), suffix.clone().into_owned())),
        _ => {}
    }
    let ct = TYPES[(body.len() + suffix.len()) % TYPES.len()];
    if !ct.is_empty() {
        headers.push(("content-type".to_owned(), ct.to_owned()));
    }
    if query.contains("idem") {
        headers.push(("idempotency-key".to_owned(), query.clone()));
    }
    let req = Request {
        method: method.to_owned(),
        path,
        query,
        headers,
        body,
    };
    let resp = block_on(app.handle(&Offline::new(), req.clone()));
    assert!(
        resp.headers.iter().any(|(k, _)| k == "x-request-id"),
        "no x-request-id for {req:?}"
    );
    assert!(
        matches!(
            resp.status,
            200 | 202 | 400 | 401 | 404 | 405 | 409 | 413 | 415 | 422 | 429 | 502 | 503
        ),
        "status {} for {req:?}",
        resp.status
    );
    let json: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}) for {req:?}"));
    if resp.status >= 400 {
        let code = json["error"]["code"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty()
                && code
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "error without a snake_case code for {req:?}: {json}"
        );
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message for {req:?}: {json}"
        );
    }
    if resp.status >= 500 {
        assert!(
            matches!(
                json["error"]["code"].as_str(),
                Some("queue_unavailable" | "store_unavailable" | "upstream_rejected")
            ),
            "a 5xx that is not an upstream fault for {req:?}: {json}"
        );
    }
}

/// Fuzz body for the featurizer and the routing decision: any bytes, read as lossy UTF-8.
/// Invariants: no panic; a fixed-size, finite, non-negative, unit-norm, deterministic feature
/// vector; probabilities that sum to 1; a known intent with a confidence in [0, 1].
pub fn fuzz_featurize(data: &[u8]) {
    let model = IntentModel::embedded().expect("the embedded model loads");
    let text = String::from_utf8_lossy(data);
    let f = model.policy().featurizer();
    let v = f.featurize(&text);
    assert_eq!(v.len(), f.dim());
    assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0), "{text:?}");
    let norm: f32 = v.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-3, "norm {norm} for {text:?}");
    assert_eq!(v, f.featurize(&text), "not deterministic for {text:?}");
    let p = model.probabilities(&text).expect("the model runs");
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-3, "{p:?}");
    let d = model.classify(&text);
    assert!((0.0..=1.0).contains(&d.confidence), "{d:?}");
    assert!(
        model.policy().meta().labels.contains(&d.intent),
        "unknown intent {d:?}"
    );
}

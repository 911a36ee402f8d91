//! Pub/Sub and Firestore over REST, with retries, a total deadline and OAuth2 tokens from a
//! service-account key signed on the platform (WebCrypto on Workers).

use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{Value, json};
use shared::b64;

use crate::http::ApiError;
use crate::platform::{HttpRequest, HttpResponse, Platform};

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Where and how to reach Google Cloud.
#[derive(Clone, Debug)]
pub struct GcpConfig {
    pub project: String,
    /// Where batch jobs' messages go.
    pub topic: String,
    /// Where queued chat messages go (the same as `topic` unless `PUBSUB_CHAT_TOPIC` is set).
    pub chat_topic: String,
    pub database: String,
    /// `http://host:port` of the emulator, or the production endpoint.
    pub pubsub_base: String,
    pub firestore_base: String,
    pub pubsub_emulated: bool,
    pub firestore_emulated: bool,
    /// Total time for one upstream call including retries.
    pub deadline_ms: u64,
}

/// A service-account key (the JSON file Google issues).
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

impl ServiceAccount {
    /// The PKCS#8 DER bytes inside the PEM `private_key`.
    pub fn pkcs8_der(&self) -> Result<Vec<u8>, String> {
        let body: String = self
            .private_key
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("-----") && !l.is_empty())
            .collect();
        b64::unbase64(&body).map_err(|_| "the service-account private_key is not PEM".to_owned())
    }
}

/// Which upstream failed, for the 503 code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    PubSub,
    Firestore,
}

impl Upstream {
    fn unavailable(self, why: &str) -> ApiError {
        match self {
            Upstream::PubSub => ApiError::unavailable(
                "queue_unavailable",
                format!(
                    "the job queue (Pub/Sub) is unavailable, nothing was accepted; retry later ({why})"
                ),
            ),
            Upstream::Firestore => ApiError::unavailable(
                "store_unavailable",
                format!("the job store (Firestore) is unavailable; retry later ({why})"),
            ),
        }
    }
}

/// One message to publish: JSON data and string attributes.
pub type Outgoing<'a> = (Vec<u8>, Vec<(&'a str, String)>);

/// Outcome of a conditional create.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    Yes,
    AlreadyExists,
}

/// The REST client; one per isolate, holding the cached access token.
#[derive(Debug)]
pub struct Gcp {
    pub config: GcpConfig,
    account: Option<ServiceAccount>,
    token: Mutex<Option<(String, u64)>>,
}

impl Gcp {
    pub fn new(config: GcpConfig, account: Option<ServiceAccount>) -> Self {
        Self {
            config,
            account,
            token: Mutex::new(None),
        }
    }

    /// A bearer token for `upstream` (`None` against an emulator that needs none).
    async fn bearer(
        &self,
        p: &impl Platform,
        upstream: Upstream,
    ) -> Result<Option<String>, ApiError> {
        let emulated = match upstream {
            Upstream::PubSub => self.config.pubsub_emulated,
            Upstream::Firestore => self.config.firestore_emulated,
        };
        if emulated {
            // The Firestore emulator treats `owner` as an all-powerful credential.
            return Ok((upstream == Upstream::Firestore).then(|| "owner".to_owned()));
        }
        let now = p.now_ms();
        if let Ok(guard) = self.token.lock()
            && let Some((tok, exp)) = guard.as_ref()
            && *exp > now + 60_000
        {
            return Ok(Some(tok.clone()));
        }
        let Some(sa) = &self.account else {
            return Err(ApiError::unavailable(
                "misconfigured",
                "GCP_SERVICE_ACCOUNT_KEY is not set and no emulator host is configured",
            ));
        };
        let (tok, ttl_s) = fetch_token(p, sa, self.config.deadline_ms)
            .await
            .map_err(|e| upstream.unavailable(&e))?;
        if let Ok(mut guard) = self.token.lock() {
            // Google's tokens last an hour; a longer lifetime is not believed.
            *guard = Some((tok.clone(), now.saturating_add(ttl_s.min(3600) * 1000)));
        }
        Ok(Some(tok))
    }

    /// One call with retries on 429/5xx/transport errors, exponential backoff with jitter,
    /// bounded by the configured deadline. Other statuses are returned to the caller.
    async fn call(
        &self,
        p: &impl Platform,
        upstream: Upstream,
        method: &'static str,
        url: String,
        body: Option<Value>,
    ) -> Result<HttpResponse, ApiError> {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(tok) = self.bearer(p, upstream).await? {
            headers.push(("authorization".to_owned(), format!("Bearer {tok}")));
        }
        let req = HttpRequest {
            method,
            url,
            headers,
            body: body.map(|b| b.to_string().into_bytes()),
        };
        with_retries(p, self.config.deadline_ms, req)
            .await
            .map_err(|e| upstream.unavailable(&e))
    }

    fn doc_url(&self, collection: &str, id: &str) -> String {
        format!(
            "{}/v1/projects/{}/databases/{}/documents/{collection}/{id}",
            self.config.firestore_base, self.config.project, self.config.database
        )
    }

    /// Creates `collection/id`; `AlreadyExists` when it is there.
    pub async fn create(
        &self,
        p: &impl Platform,
        collection: &str,
        id: &str,
        doc: Value,
    ) -> Result<Created, ApiError> {
        let url = format!(
            "{}/v1/projects/{}/databases/{}/documents/{collection}?documentId={id}",
            self.config.firestore_base, self.config.project, self.config.database
        );
        let r = self
            .call(p, Upstream::Firestore, "POST", url, Some(doc))
            .await?;
        match r.status {
            200 => Ok(Created::Yes),
            409 => Ok(Created::AlreadyExists),
            s => Err(rejected(Upstream::Firestore, s, &r.body)),
        }
    }

    /// Reads `collection/id` (the REST `Document`), `None` when absent.
    pub async fn get(
        &self,
        p: &impl Platform,
        collection: &str,
        id: &str,
    ) -> Result<Option<Value>, ApiError> {
        let r = self
            .call(
                p,
                Upstream::Firestore,
                "GET",
                self.doc_url(collection, id),
                None,
            )
            .await?;
        match r.status {
            200 => serde_json::from_slice(&r.body)
                .map(Some)
                .map_err(|e| Upstream::Firestore.unavailable(&format!("unreadable document: {e}"))),
            404 => Ok(None),
            s => Err(rejected(Upstream::Firestore, s, &r.body)),
        }
    }

    /// Sets the fields in `doc` named by `mask` on an existing document.
    pub async fn update(
        &self,
        p: &impl Platform,
        collection: &str,
        id: &str,
        doc: Value,
        mask: &[&str],
    ) -> Result<bool, ApiError> {
        let mut url = self.doc_url(collection, id);
        url.push_str("?currentDocument.exists=true");
        for f in mask {
            url.push_str("&updateMask.fieldPaths=");
            url.push_str(f);
        }
        let r = self
            .call(p, Upstream::Firestore, "PATCH", url, Some(doc))
            .await?;
        match r.status {
            200 => Ok(true),
            404 => Ok(false),
            s => Err(rejected(Upstream::Firestore, s, &r.body)),
        }
    }

    /// Replaces `collection/id` with `doc` only if its `updateTime` is still `update_time`:
    /// `false` when another writer changed or removed it first. (A `documents:commit`, as the
    /// emulator ignores `currentDocument.updateTime` given to `PATCH` as a query parameter.)
    pub async fn replace_if(
        &self,
        p: &impl Platform,
        collection: &str,
        id: &str,
        mut doc: Value,
        update_time: &str,
    ) -> Result<bool, ApiError> {
        let url = format!(
            "{}/v1/projects/{}/databases/{}/documents:commit",
            self.config.firestore_base, self.config.project, self.config.database
        );
        doc["name"] = Value::String(format!(
            "projects/{}/databases/{}/documents/{collection}/{id}",
            self.config.project, self.config.database
        ));
        let body = serde_json::json!({"writes": [{
            "update": doc,
            "currentDocument": {"updateTime": update_time},
        }]});
        let r = self
            .call(p, Upstream::Firestore, "POST", url, Some(body))
            .await?;
        match r.status {
            200 => Ok(true),
            s if shared::firestore::write_conflict(s, &String::from_utf8_lossy(&r.body)) => {
                Ok(false)
            }
            s => Err(rejected(Upstream::Firestore, s, &r.body)),
        }
    }

    pub async fn delete(
        &self,
        p: &impl Platform,
        collection: &str,
        id: &str,
    ) -> Result<(), ApiError> {
        let r = self
            .call(
                p,
                Upstream::Firestore,
                "DELETE",
                self.doc_url(collection, id),
                None,
            )
            .await?;
        match r.status {
            200 | 404 => Ok(()),
            s => Err(rejected(Upstream::Firestore, s, &r.body)),
        }
    }

    /// Publishes `messages` (JSON data, string attributes) to `topic`; returns once Pub/Sub
    /// gave a message id for each.
    pub async fn publish(
        &self,
        p: &impl Platform,
        topic: &str,
        messages: &[Outgoing<'_>],
    ) -> Result<Vec<String>, ApiError> {
        let url = format!(
            "{}/v1/projects/{}/topics/{topic}:publish",
            self.config.pubsub_base, self.config.project
        );
        let body = json!({
            "messages": messages.iter().map(|(data, attrs)| json!({
                "data": b64::base64(data),
                "attributes": attrs.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>()
        });
        let r = self
            .call(p, Upstream::PubSub, "POST", url, Some(body))
            .await?;
        if r.status != 200 {
            return Err(rejected(Upstream::PubSub, r.status, &r.body));
        }
        let ids: Vec<String> = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("messageIds")?.clone()).ok())
            .unwrap_or_default();
        if ids.len() != messages.len() {
            return Err(Upstream::PubSub.unavailable("publish returned no message ids"));
        }
        Ok(ids)
    }
}

/// A non-retryable upstream answer: our request or our permissions are wrong.
fn rejected(upstream: Upstream, status: u16, body: &[u8]) -> ApiError {
    let what = match upstream {
        Upstream::PubSub => "Pub/Sub",
        Upstream::Firestore => "Firestore",
    };
    let detail: String = String::from_utf8_lossy(body).chars().take(300).collect();
    ApiError::new(
        502,
        "upstream_rejected",
        format!("{what} answered {status}: {detail}"),
    )
}

fn retryable(r: &HttpResponse) -> bool {
    shared::firestore::transient(r.status, &String::from_utf8_lossy(&r.body))
}

/// Sends `req`, retrying transport errors, 408/429/5xx and Firestore's 409 `ABORTED`
/// (contention: nothing was written) with exponential backoff and ±50 % jitter until
/// `deadline_ms` has passed. Returns the first non-retryable answer.
pub async fn with_retries(
    p: &impl Platform,
    deadline_ms: u64,
    req: HttpRequest,
) -> Result<HttpResponse, String> {
    let start = p.now_ms();
    let mut backoff = 100u64;
    loop {
        let why = match p.http(req.clone()).await {
            Ok(r) if !retryable(&r) => return Ok(r),
            Ok(r) => format!("HTTP {}", r.status),
            Err(e) => e,
        };
        let mut b = [0u8; 1];
        p.random(&mut b);
        let wait = backoff / 2 + backoff * u64::from(b[0]) / 255;
        if p.now_ms().saturating_sub(start) + wait > deadline_ms {
            return Err(why);
        }
        p.sleep(wait).await;
        backoff = (backoff * 2).min(2_000);
    }
}

/// base64url without padding (JWT segments).
pub fn b64url(data: &[u8]) -> String {
    b64::base64(data)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// Exchanges a signed JWT for an access token: `(token, lifetime seconds)`.
async fn fetch_token(
    p: &impl Platform,
    sa: &ServiceAccount,
    deadline_ms: u64,
) -> Result<(String, u64), String> {
    let iat = p.now_ms() / 1000;
    let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = b64url(
        json!({"iss": sa.client_email, "scope": SCOPE, "aud": sa.token_uri, "iat": iat, "exp": iat + 3600})
            .to_string()
            .as_bytes(),
    );
    let signing_input = format!("{header}.{claims}");
    let sig = p
        .sign_rs256(&sa.pkcs8_der()?, signing_input.as_bytes())
        .await?;
    let assertion = format!("{signing_input}.{}", b64url(&sig));
    let body = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
    );
    let req = HttpRequest {
        method: "POST",
        url: sa.token_uri.clone(),
        headers: vec![(
            "content-type".into(),
            "application/x-www-form-urlencoded".into(),
        )],
        body: Some(body.into_bytes()),
    };
    let r = with_retries(p, deadline_ms, req).await?;
    #[derive(Deserialize)]
    struct Token {
        access_token: String,
        #[serde(default = "hour")]
        expires_in: u64,
    }
    fn hour() -> u64 {
        3600
    }
    if r.status != 200 {
        return Err(format!("token endpoint answered {}", r.status));
    }
    let t: Token =
        serde_json::from_slice(&r.body).map_err(|e| format!("token endpoint answer: {e}"))?;
    Ok((t.access_token, t.expires_in))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::testing::{Offline, block_on};

    /// Answers from a script, one per call, on [`Offline`]'s fake clock.
    struct Scripted {
        clock: Offline,
        answers: RefCell<Vec<(u16, &'static str)>>,
    }

    impl Platform for Scripted {
        async fn http(&self, _req: HttpRequest) -> Result<HttpResponse, String> {
            let (status, body) = self.answers.borrow_mut().remove(0);
            Ok(HttpResponse {
                status,
                body: body.as_bytes().to_vec(),
            })
        }
        fn now_ms(&self) -> u64 {
            self.clock.now_ms()
        }
        fn random(&self, buf: &mut [u8]) {
            self.clock.random(buf);
        }
        async fn sleep(&self, ms: u64) {
            self.clock.sleep(ms).await;
        }
        async fn sign_rs256(&self, _: &[u8], _: &[u8]) -> Result<Vec<u8>, String> {
            Err("no signer".into())
        }
        async fn rate_limit(&self, _key: &str) -> Option<bool> {
            None
        }
        fn log(&self, _line: &str) {}
    }

    fn send(answers: Vec<(u16, &'static str)>) -> (Result<u16, String>, usize) {
        let p = Scripted {
            clock: Offline::new(),
            answers: RefCell::new(answers),
        };
        let req = HttpRequest {
            method: "POST",
            url: "http://127.0.0.1:9/v1/projects/p/databases/(default)/documents:commit".into(),
            headers: Vec::new(),
            body: None,
        };
        let r = block_on(with_retries(&p, 8_000, req)).map(|r| r.status);
        (r, p.answers.borrow().len())
    }

    #[test]
    fn contention_is_retried_and_a_conflict_is_an_answer() {
        let aborted = r#"{"error":{"code":409,"status":"ABORTED","message":"Too much contention on these documents. Please try again."}}"#;
        let exists = r#"{"error":{"code":409,"status":"ALREADY_EXISTS"}}"#;
        // Contention: sent again, and the next answer counts.
        assert_eq!(
            send(vec![(409, aborted), (409, aborted), (200, "{}")]),
            (Ok(200), 0)
        );
        // A document that exists is an answer, given at once.
        assert_eq!(send(vec![(409, exists), (200, "{}")]), (Ok(409), 1));
    }
}

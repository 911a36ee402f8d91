//! The HTTP API of the contract, platform-free.
//!
//! [`App::handle`] takes a [`Request`] and a [`Platform`] and returns a [`Response`]; it never
//! panics on input and maps every failure to the contract's JSON error. The Worker and the
//! Lambda function only convert their request and response types.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use shared::firestore;
use shared::intent::Route;
use shared::jobs::{
    ChatRequest, IDEMPOTENCY_COLLECTION, IDEMPOTENCY_TTL_MS, IdempotencyRecord, JOB_TTL_MS,
    JOBS_COLLECTION, JobKind, JobMessage, JobRecord, JobView, TIMESTAMP_FIELDS,
};
use shared::time::{parse_rfc3339, rfc3339};
use shared::wire::{InputItem, MAX_CUSTOM_ID_CHARS, MAX_ITEM_CHARS, Task};

use crate::auth::KeyStore;
use crate::body::{json_body, json_len, json_text, more_values_than, parse_json};
use crate::config::Config;
use crate::gcp::{Created, Gcp, Outgoing};
use crate::http::{ApiError, Request, Response};
use crate::mask::mask;
use crate::model::IntentModel;
use crate::platform::Platform;
use crate::replies::{Locale, reply};

/// An `Idempotency-Key` whose first request has not finished after this long (or after four
/// upstream deadlines, if longer) is taken as abandoned, and the next request with it runs.
pub const PENDING_ABANDONED_MS: u64 = 60_000;

/// Checks that `uri` names an object under `INPUT_URI_PREFIX` (`template`, `{key}` standing
/// for the caller's key name `owner`) by plain path segments: no `.`, `..` or empty segment
/// and no `%` escape, any of which a reader could resolve to an object outside it.
fn input_uri_under(template: &str, owner: &str, uri: &str) -> Result<(), ApiError> {
    if template.contains("{key}") && (owner.contains('/') || owner == "." || owner == "..") {
        return Err(ApiError::new(
            422,
            "invalid_input_uri",
            format!(
                "the name of this API key ({owner:?}) cannot name a folder, so it has none under INPUT_URI_PREFIX; ask for a key whose name has no `/`, or give `items`"
            ),
        ));
    }
    let prefix = template.replace("{key}", owner);
    let plain = uri.strip_prefix(&prefix).is_some_and(|rest| {
        !rest.contains('%')
            && rest
                .split('/')
                .all(|segment| !matches!(segment, "" | "." | ".."))
    });
    if plain {
        Ok(())
    } else {
        Err(ApiError::new(
            422,
            "invalid_input_uri",
            format!(
                "`input_uri` must name an object under {prefix} (path segments without `%`, `.` or `..`), got {uri:?}"
            ),
        ))
    }
}

/// The request's `Idempotency-Key`, if it has one that can be used. Checked before anything
/// else, so that a key the API refuses is refused for a chat message answered at the edge as
/// well, not only once a message is queued.
fn idempotency_key(req: &Request) -> Result<Option<&str>, ApiError> {
    match req.header("idempotency-key") {
        Some(key)
            if key.is_empty()
                || key.len() > 255
                || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) =>
        {
            Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1..=255 printable ASCII characters without spaces",
            ))
        }
        key => Ok(key),
    }
}

/// `path` without its trailing slashes (`/` stays `/`).
fn normalize(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
}

/// The methods the API serves on `path` (normalized), `None` for a path it does not serve.
fn methods(path: &str) -> Option<&'static str> {
    match (path, path.strip_prefix("/v1/jobs/")) {
        ("/healthz", _) => Some("GET, HEAD"),
        ("/v1/chat" | "/v1/batches", _) => Some("POST"),
        (_, Some(id)) if !id.is_empty() && !id.contains('/') => Some("GET, DELETE"),
        _ => None,
    }
}

/// Whether `path` is one of the API's routes (`/healthz`, `/v1/…`), trailing slashes aside.
pub fn is_route(path: &str) -> bool {
    methods(normalize(path)).is_some()
}

/// The id of the idempotency record of `key` sent by `owner` to `route` (`chat`, `batches`).
pub fn idempotency_doc_id(owner: &str, route: &str, key: &str) -> String {
    hex::encode(Sha256::digest(format!("{owner}\0{route}\0{key}")))
}

/// Request limits (documented in the README).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub chat_body_bytes: usize,
    pub message_chars: usize,
    pub batch_body_bytes: usize,
    pub batch_items: usize,
    pub item_chars: usize,
    pub custom_id_chars: usize,
    /// A shard message holds at most this many items …
    pub shard_items: usize,
    /// … and at most this many bytes of JSON (Pub/Sub allows 10 MB).
    pub shard_bytes: usize,
    pub wait_seconds: u64,
}

/// The largest body any route takes (a batch's). Adapters read at most one byte more of a
/// request's body, so that a larger one costs no memory before it is refused with 413.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            chat_body_bytes: 16 * 1024,
            message_chars: 2000,
            batch_body_bytes: MAX_BODY_BYTES,
            batch_items: 10_000,
            item_chars: MAX_ITEM_CHARS,
            custom_id_chars: MAX_CUSTOM_ID_CHARS,
            shard_items: 1000,
            shard_bytes: 512 * 1024,
            wait_seconds: 25,
        }
    }
}

/// One per isolate / process: the model, the configuration, the REST client, the fallback
/// rate limiter.
#[derive(Debug)]
pub struct App {
    model: Result<&'static IntentModel, String>,
    keys: Result<KeyStore, String>,
    gcp: Result<Gcp, String>,
    limits: Limits,
    rate_limit_per_minute: u32,
    log_all: bool,
    /// `INPUT_URI_PREFIX`: where `input_uri` files may be.
    input_uri_prefix: Option<String>,
    /// What is wrong with the settings that are neither keys nor GCP (rate limit, logging,
    /// input prefix): `/healthz` lists them and `/v1` refuses to serve until they are fixed.
    settings: Result<(), String>,
    classify_repeat: u32,
    windows: Mutex<HashMap<String, (u64, u32)>>,
}

/// What a handler learned, for the log line.
#[derive(Default)]
struct Trace {
    owner: Option<String>,
    route: Option<Route>,
    intent: Option<String>,
    confidence: Option<f32>,
    job_id: Option<String>,
}

impl App {
    pub fn new(config: Config) -> Self {
        Self::with_limits(config, Limits::default())
    }

    pub fn with_limits(config: Config, limits: Limits) -> Self {
        Self {
            model: IntentModel::embedded().map_err(|e| e.to_string()),
            keys: config.keys,
            gcp: config.gcp.map(|(c, sa)| Gcp::new(c, sa)),
            limits,
            rate_limit_per_minute: *config.rate_limit_per_minute.as_ref().unwrap_or(&600),
            log_all: *config.log_all.as_ref().unwrap_or(&true),
            input_uri_prefix: config.input_uri_prefix.clone().unwrap_or(None),
            settings: [
                config.rate_limit_per_minute.err(),
                config.log_all.err(),
                config.input_uri_prefix.err(),
            ]
            .into_iter()
            .flatten()
            .reduce(|a, b| format!("{a}; {b}"))
            .map_or(Ok(()), Err),
            classify_repeat: config.classify_repeat,
            windows: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves one request. Every response carries `x-request-id`; one log line per request
    /// (never the message text).
    pub async fn handle(&self, p: &impl Platform, req: Request) -> Response {
        let start = p.now_ms();
        let request_id = request_id(p, &req);
        let mut trace = Trace::default();
        let response = match self.route(p, &req, &mut trace).await {
            Ok(r) => r,
            Err(e) => e.to_response(),
        };
        if !self.log_all && response.status < 400 {
            return response.with_header("x-request-id", request_id);
        }
        let mut line = json!({
            "level": if response.status >= 500 { "error" } else { "info" },
            "ts": rfc3339(p.now_ms()),
            "request_id": request_id,
            "method": req.method,
            "path": req.path,
            "status": response.status,
            "latency_ms": p.now_ms().saturating_sub(start),
        });
        if let Value::Object(m) = &mut line {
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            };
            put("owner", trace.owner.map(Value::from));
            put("route", trace.route.map(|r| Value::from(r.as_str())));
            put("intent", trace.intent.map(Value::from));
            put("confidence", trace.confidence.map(|c| json!(c)));
            put("job_id", trace.job_id.map(Value::from));
            if response.status >= 400 {
                put(
                    "code",
                    response.json_body()["error"]["code"]
                        .as_str()
                        .map(Value::from),
                );
            }
        }
        p.log(&line.to_string());
        response.with_header("x-request-id", request_id)
    }

    async fn route(
        &self,
        p: &impl Platform,
        req: &Request,
        trace: &mut Trace,
    ) -> Result<Response, ApiError> {
        let path = normalize(&req.path);
        let Some(methods) = methods(path) else {
            return Err(ApiError::not_found(format!(
                "no route {path}; see /v1/chat, /v1/batches, /v1/jobs/{{id}}, /healthz"
            )));
        };
        if !methods.split(", ").any(|m| m == req.method) {
            return Ok(method_not_allowed(req, path, methods));
        }
        if path == "/healthz" {
            return Ok(self.healthz());
        }
        let job_id = path.strip_prefix("/v1/jobs/");
        let keys = self
            .keys
            .as_ref()
            .map_err(|e| ApiError::unavailable("misconfigured", e.clone()))?;
        self.settings
            .as_ref()
            .map_err(|e| ApiError::unavailable("misconfigured", e.clone()))?;
        let owner = keys.authorize(req.header("authorization"))?.to_owned();
        trace.owner = Some(owner.clone());
        self.rate_limit(p, &owner).await?;
        match (req.method.as_str(), path, job_id) {
            ("POST", "/v1/chat", _) => self.chat(p, req, &owner, trace).await,
            ("POST", "/v1/batches", _) => self.batches(p, req, &owner, trace).await,
            ("GET", _, Some(id)) => self.get_job(p, req, &owner, id).await,
            ("DELETE", _, Some(id)) => self.cancel_job(p, &owner, id).await,
            _ => Err(ApiError::not_found("no such route")),
        }
    }

    fn healthz(&self) -> Response {
        match (&self.model, &self.gcp, &self.keys, &self.settings) {
            (Ok(m), Ok(_), Ok(_), Ok(())) => Response::json(
                200,
                &json!({"status": "ok", "model": {"name": m.name(), "sha256": m.sha256()}}),
            ),
            (model, gcp, keys, settings) => {
                let problems: Vec<&str> = [
                    model.as_ref().err(),
                    gcp.as_ref().err(),
                    keys.as_ref().err(),
                    settings.as_ref().err(),
                ]
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
                Response::json(
                    503,
                    &json!({"status": "misconfigured", "problems": problems}),
                )
            }
        }
    }

    async fn rate_limit(&self, p: &impl Platform, owner: &str) -> Result<(), ApiError> {
        let allowed = match p.rate_limit(owner).await {
            Some(allowed) => allowed,
            None => {
                let window = p.now_ms() / 60_000;
                // Counters only: after a panic elsewhere they are still counters.
                let mut w = self
                    .windows
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let e = w.entry(owner.to_owned()).or_insert((window, 0));
                if e.0 != window {
                    *e = (window, 0);
                }
                e.1 += 1;
                e.1 <= self.rate_limit_per_minute
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::new(
                429,
                "rate_limited",
                "too many requests for this API key; retry in a minute",
            ))
        }
    }

    fn gcp(&self) -> Result<&Gcp, ApiError> {
        self.gcp
            .as_ref()
            .map_err(|e| ApiError::unavailable("misconfigured", e.clone()))
    }

    // ---- POST /v1/chat ------------------------------------------------------------------

    async fn chat(
        &self,
        p: &impl Platform,
        req: &Request,
        owner: &str,
        trace: &mut Trace,
    ) -> Result<Response, ApiError> {
        let body = json_body(req, self.limits.chat_body_bytes)?;
        let key = idempotency_key(req)?;
        let fields = object_fields(&body, &["message", "locale"])?;
        let message = required_str(fields, "message")?;
        let n = message.chars().count();
        // Spaces, control characters (NUL, …) and invisible format characters (zero-width
        // space, word joiner, BOM) alone say nothing: queuing them would only spend the GPU.
        let invisible = |c: char| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}')
        };
        if message.chars().all(invisible) {
            return Err(ApiError::new(
                422,
                "message_empty",
                "`message` must hold at least one visible character (not only spaces, \
                 control or zero-width characters)",
            ));
        }
        if n > self.limits.message_chars {
            return Err(ApiError::new(
                422,
                "message_too_long",
                format!(
                    "`message` has {n} characters; at most {} are allowed",
                    self.limits.message_chars
                ),
            ));
        }
        let locale = match optional_str(fields, "locale")? {
            None => Locale::detect(message),
            Some(l) => Locale::parse(l).ok_or_else(|| {
                ApiError::new(
                    422,
                    "invalid_locale",
                    format!("`locale` must be \"ko\" or \"en\", got {l:?}"),
                )
            })?,
        };
        let model = self.model.as_ref().ok();
        let decision = model.map(|m| {
            for _ in 1..self.classify_repeat {
                std::hint::black_box(m.classify(std::hint::black_box(message)));
            }
            m.classify(message)
        });
        if let Some(d) = &decision {
            trace.intent = Some(d.intent.clone());
            trace.confidence = Some(d.confidence);
        }
        if let Some(d) = &decision
            && d.route == Route::Edge
            && let Some(text) = reply(&d.intent, locale, message)
        {
            trace.route = Some(Route::Edge);
            return Ok(Response::json(
                200,
                &json!({"route": "edge", "intent": d.intent, "confidence": d.confidence, "reply": text}),
            ));
        }
        trace.route = Some(Route::Queue);
        let masked = mask(message);
        self.idempotent(p, req, key, owner, "chat", async {
            let now = p.now_ms();
            let job_id = random_hex(p, 16);
            let chat = ChatRequest {
                message: masked,
                locale: locale.as_str().to_owned(),
            };
            let record = new_record(&job_id, owner, JobKind::Chat, Task::Generate, (1, 1), now);
            let record = JobRecord {
                chat: Some(chat.clone()),
                ..record
            };
            let msg = JobMessage::chat(&job_id, chat);
            self.enqueue(p, &record, &[msg]).await?;
            let url = format!("/v1/jobs/{job_id}");
            Ok(Response::json(
                202,
                &json!({"route": "queue", "job_id": job_id, "status_url": url}),
            )
            .with_header("location", url))
        })
        .await
        .inspect(|r| trace.job_id = r.json_body()["job_id"].as_str().map(str::to_owned))
    }

    // ---- POST /v1/batches ---------------------------------------------------------------

    async fn batches(
        &self,
        p: &impl Platform,
        req: &Request,
        owner: &str,
        trace: &mut Trace,
    ) -> Result<Response, ApiError> {
        let text = json_text(req, self.limits.batch_body_bytes)?;
        let max_values = batch_values(&self.limits);
        if more_values_than(text, max_values) {
            return Err(ApiError::new(
                413,
                "too_many_items",
                format!(
                    "the body holds more than {max_values} JSON values; a batch has at most {} inline items of `custom_id` and `input`: use `input_uri` for larger batches",
                    self.limits.batch_items
                ),
            ));
        }
        let body = parse_json(text)?;
        let fields = object_fields(&body, &["task", "items", "input_uri"])?;
        let task_s = required_str(fields, "task")?;
        let task: Task = task_s
            .parse()
            .map_err(|e: String| ApiError::new(422, "invalid_task", e))?;
        // One of the two is given; the other may be absent or `null`.
        let given = |f: &str| fields.get(f).filter(|v| !v.is_null());
        let items = match (given("items"), given("input_uri")) {
            (Some(items), None) => Some(self.items(items)?),
            (None, Some(_)) => None,
            _ => {
                return Err(ApiError::new(
                    422,
                    "items_or_input_uri",
                    "give exactly one of `items` (inline) or `input_uri` (gs://bucket/file.jsonl)",
                ));
            }
        };
        let input_uri = match items {
            Some(_) => None,
            None => {
                let uri = required_str(fields, "input_uri")?;
                // URL parsers drop tabs and line breaks anywhere and then resolve `..`: a
                // name with them would be read as another than the one checked below.
                if let Some(c) = uri
                    .chars()
                    .find(|&c| c.is_control() || matches!(c, '\\' | '?' | '#'))
                {
                    return Err(ApiError::new(
                        422,
                        "invalid_input_uri",
                        format!(
                            "`input_uri` must not contain control characters, `\\`, `?` or `#`, got {c:?} in {uri:?}"
                        ),
                    ));
                }
                // Against the emulators (local development) the worker's own files can be
                // named too, so that `input_uri` jobs can be tried without a bucket.
                let local = self
                    .gcp
                    .as_ref()
                    .is_ok_and(|g| g.config.pubsub_emulated && g.config.firestore_emulated);
                let gs = uri
                    .strip_prefix("gs://")
                    .and_then(|rest| rest.split_once('/'))
                    .is_some_and(|(bucket, object)| !bucket.is_empty() && !object.is_empty());
                let file = local
                    && uri
                        .strip_prefix("file:///")
                        .is_some_and(|path| !path.is_empty() && !path.ends_with('/'));
                if !(gs || file) {
                    let expected = if local {
                        "gs://bucket/object or, against the emulators, file:///absolute/path.jsonl"
                    } else {
                        "gs://bucket/object"
                    };
                    return Err(ApiError::new(
                        422,
                        "invalid_input_uri",
                        format!("`input_uri` must be {expected}, got {uri:?}"),
                    ));
                }
                if let Some(prefix) = &self.input_uri_prefix {
                    input_uri_under(prefix, owner, uri)?;
                }
                Some(uri.to_owned())
            }
        };
        let key = idempotency_key(req)?;
        self.idempotent(p, req, key, owner, "batches", async {
            let now = p.now_ms();
            let job_id = random_hex(p, 16);
            let (messages, total) = match &items {
                Some(items) => {
                    let shards = shard(items, &self.limits);
                    let n = u32::try_from(shards.len()).unwrap_or(u32::MAX);
                    let msgs = shards
                        .into_iter()
                        .enumerate()
                        .map(|(i, items)| JobMessage {
                            job_id: job_id.clone(),
                            kind: JobKind::Batch,
                            task,
                            shard: i as u32,
                            shards: n,
                            items,
                            input_uri: None,
                            range: None,
                            chat: None,
                        })
                        .collect::<Vec<_>>();
                    (msgs, items.len() as u64)
                }
                // Without items there is an `input_uri`: its one plan message.
                None => (
                    input_uri
                        .iter()
                        .map(|uri| JobMessage::input_file(&job_id, task, uri))
                        .collect(),
                    0,
                ),
            };
            // Every message of a job carries the job's shard count (0: the worker shards).
            let shards = messages.first().map_or(0, |m| m.shards);
            let record = JobRecord {
                input_uri: input_uri.clone(),
                ..new_record(&job_id, owner, JobKind::Batch, task, (total, shards), now)
            };
            self.enqueue(p, &record, &messages).await?;
            let url = format!("/v1/jobs/{job_id}");
            Ok(Response::json(
                202,
                &json!({"job_id": job_id, "status_url": url, "counts": {"total": total}}),
            )
            .with_header("location", url))
        })
        .await
        .inspect(|r| trace.job_id = r.json_body()["job_id"].as_str().map(str::to_owned))
    }

    /// Validates inline items and masks their inputs.
    fn items(&self, v: &Value) -> Result<Vec<InputItem>, ApiError> {
        let Value::Array(raw) = v else {
            return Err(type_error(
                "items",
                "an array of {\"custom_id\", \"input\"} objects",
            ));
        };
        if raw.is_empty() {
            return Err(ApiError::new(
                422,
                "no_items",
                "`items` must hold at least one item",
            ));
        }
        if raw.len() > self.limits.batch_items {
            return Err(ApiError::new(
                413,
                "too_many_items",
                format!(
                    "{} items; at most {} inline, use `input_uri` for larger batches",
                    raw.len(),
                    self.limits.batch_items
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(raw.len());
        let mut items = Vec::with_capacity(raw.len());
        for (i, item) in raw.iter().enumerate() {
            let at = |e: ApiError| ApiError {
                message: format!("items[{i}]: {}", e.message),
                ..e
            };
            let f = object_fields(item, &["custom_id", "input"]).map_err(at)?;
            let custom_id = required_str(f, "custom_id").map_err(at)?;
            let input = required_str(f, "input").map_err(at)?;
            let n = custom_id.chars().count();
            if n == 0 || n > self.limits.custom_id_chars {
                return Err(at(ApiError::new(
                    422,
                    "invalid_custom_id",
                    format!(
                        "`custom_id` must have 1..={} characters",
                        self.limits.custom_id_chars
                    ),
                )));
            }
            if input.chars().count() > self.limits.item_chars {
                return Err(at(ApiError::new(
                    422,
                    "input_too_long",
                    format!(
                        "`input` has more than {} characters",
                        self.limits.item_chars
                    ),
                )));
            }
            if !seen.insert(custom_id) {
                return Err(at(ApiError::new(
                    422,
                    "duplicate_custom_id",
                    format!("custom_id {custom_id:?} appears more than once; each must be unique"),
                )));
            }
            items.push(InputItem {
                custom_id: custom_id.to_owned(),
                input: mask(input),
            });
        }
        Ok(items)
    }

    /// Creates the job record, then publishes its messages. Returns only once Pub/Sub has
    /// given an id for every message; on failure nothing stays `queued`.
    async fn enqueue(
        &self,
        p: &impl Platform,
        record: &JobRecord,
        messages: &[JobMessage],
    ) -> Result<(), ApiError> {
        let gcp = self.gcp()?;
        let doc = firestore::to_document(record, TIMESTAMP_FIELDS)
            .map_err(|e| ApiError::internal("encode the job record", e))?;
        // A random 128-bit id: "already exists" can only be our own retried create.
        gcp.create(p, JOBS_COLLECTION, &record.job_id, doc).await?;
        let topic = match record.kind {
            JobKind::Chat => &gcp.config.chat_topic,
            JobKind::Batch => &gcp.config.topic,
        };
        let mut published = 0;
        for batch in publish_batches(messages) {
            let result = gcp.publish(p, topic, &batch).await;
            if let Err(e) = result {
                self.abandon(p, gcp, record, published).await;
                return Err(e);
            }
            published += batch.len();
        }
        Ok(())
    }

    /// After a failed publish: remove the record when no message went out, else mark it
    /// failed so workers skip the shards that did.
    async fn abandon(&self, p: &impl Platform, gcp: &Gcp, record: &JobRecord, published: usize) {
        let now = rfc3339(p.now_ms());
        if published == 0 && gcp.delete(p, JOBS_COLLECTION, &record.job_id).await.is_ok() {
            return;
        }
        let failed = json!({
            "status": "failed",
            "updated_at": now,
            "error": {"code": "enqueue_failed", "message": "the job queue was unavailable; resubmit the job"},
        });
        let doc = fields(failed);
        let _ = gcp
            .update(
                p,
                JOBS_COLLECTION,
                &record.job_id,
                doc,
                &["status", "updated_at", "error"],
            )
            .await;
    }

    /// Runs `work` at most once per `Idempotency-Key` `key` (per owner and route, 24 h; see
    /// [`idempotency_key`]); a replay with the same body returns the first answer, one with
    /// another body is refused (422).
    async fn idempotent(
        &self,
        p: &impl Platform,
        req: &Request,
        key: Option<&str>,
        owner: &str,
        route: &str,
        work: impl Future<Output = Result<Response, ApiError>>,
    ) -> Result<Response, ApiError> {
        let Some(key) = key else {
            return work.await;
        };
        let gcp = self.gcp()?;
        let id = idempotency_doc_id(owner, route, key);
        let now = p.now_ms();
        let request_sha256 = hex::encode(Sha256::digest(&req.body));
        let pending = IdempotencyRecord {
            owner: owner.to_owned(),
            state: "pending".into(),
            status: 0,
            body: String::new(),
            request_sha256: request_sha256.clone(),
            created_at: rfc3339(now),
            expire_at: rfc3339(now + IDEMPOTENCY_TTL_MS),
        };
        let doc = firestore::to_document(&pending, &["expire_at"])
            .map_err(|e| ApiError::internal("encode the idempotency record", e))?;
        let in_use = || {
            ApiError::new(
                409,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being processed; retry in a moment",
            )
        };
        // A record still pending after this long was left by a request that never finished
        // (its isolate or function died, or its last write failed): the key is taken over,
        // conditioned on the record as read, so that of two requests only one runs.
        let abandoned_after = PENDING_ABANDONED_MS.max(4 * gcp.config.deadline_ms);
        let mut taken = false;
        for _ in 0..3 {
            if gcp
                .create(p, IDEMPOTENCY_COLLECTION, &id, doc.clone())
                .await?
                == Created::Yes
            {
                taken = true;
                break;
            }
            let Some(existing) = gcp.get(p, IDEMPOTENCY_COLLECTION, &id).await? else {
                continue; // removed meanwhile: try to take it again
            };
            let rec: IdempotencyRecord = firestore::from_document(&existing)
                .map_err(|e| ApiError::unavailable("store_unavailable", e.to_string()))?;
            let expired = parse_rfc3339(&rec.expire_at).is_none_or(|t| t <= now);
            let abandoned = rec.state != "done"
                && parse_rfc3339(&rec.created_at).is_none_or(|t| t + abandoned_after <= now);
            if expired || abandoned {
                let seen = existing["updateTime"].as_str().unwrap_or_default();
                if gcp
                    .replace_if(p, IDEMPOTENCY_COLLECTION, &id, doc.clone(), seen)
                    .await?
                {
                    taken = true;
                    break;
                }
                continue; // another request took it first: read what it wrote
            }
            if !rec.request_sha256.is_empty() && rec.request_sha256 != request_sha256 {
                return Err(ApiError::new(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used within 24 h for a request with another \
                     body; a retry must repeat the body byte for byte, a new request needs \
                     a new key",
                ));
            }
            if rec.state == "done" {
                let body: Value = serde_json::from_str(&rec.body).unwrap_or(Value::Null);
                let mut r =
                    Response::json(rec.status, &body).with_header("idempotent-replayed", "true");
                if let Some(url) = body["status_url"].as_str() {
                    r = r.with_header("location", url);
                }
                return Ok(r);
            }
            return Err(in_use());
        }
        if !taken {
            return Err(in_use());
        }
        match work.await {
            Ok(r) => {
                let done = json!({"state": "done", "status": r.status, "body": String::from_utf8_lossy(&r.body)});
                let doc = fields(done);
                // The job exists either way; a record left pending only means that a replay
                // after `abandoned_after` runs again.
                let _ = gcp
                    .update(
                        p,
                        IDEMPOTENCY_COLLECTION,
                        &id,
                        doc,
                        &["state", "status", "body"],
                    )
                    .await;
                Ok(r)
            }
            Err(e) => {
                let _ = gcp.delete(p, IDEMPOTENCY_COLLECTION, &id).await;
                Err(e)
            }
        }
    }

    // ---- /v1/jobs/{id} ------------------------------------------------------------------

    async fn read_job(
        &self,
        p: &impl Platform,
        owner: &str,
        id: &str,
    ) -> Result<JobRecord, ApiError> {
        let not_found = || {
            ApiError::new(
                404,
                "job_not_found",
                format!("no job {id:?} for this API key"),
            )
        };
        if !valid_job_id(id) {
            return Err(not_found());
        }
        let doc = self
            .gcp()?
            .get(p, JOBS_COLLECTION, id)
            .await?
            .ok_or_else(not_found)?;
        let rec: JobRecord = firestore::from_document(&doc).map_err(|e| {
            ApiError::unavailable("store_unavailable", format!("job record unreadable: {e}"))
        })?;
        if rec.owner != owner {
            return Err(not_found());
        }
        Ok(rec)
    }

    async fn get_job(
        &self,
        p: &impl Platform,
        req: &Request,
        owner: &str,
        id: &str,
    ) -> Result<Response, ApiError> {
        let wait = match req.query_param("wait") {
            None => 0,
            Some(w) => match w.parse::<u64>() {
                Ok(n) if n <= self.limits.wait_seconds => n,
                _ => {
                    return Err(ApiError::new(
                        422,
                        "invalid_wait",
                        format!(
                            "`wait` must be whole seconds 0..={}, got {w:?}",
                            self.limits.wait_seconds
                        ),
                    ));
                }
            },
        };
        let started = p.now_ms();
        let deadline = started + wait * 1000;
        let mut rec = self.read_job(p, owner, id).await?;
        loop {
            let now = p.now_ms();
            let interval = poll_interval(now.saturating_sub(started));
            if rec.status.is_final() || now + interval > deadline {
                break;
            }
            p.sleep(interval).await;
            rec = self.read_job(p, owner, id).await?;
        }
        let view = serde_json::to_value(JobView::from(&rec))
            .map_err(|e| ApiError::internal("encode the job", e))?;
        Ok(Response::json(200, &view))
    }

    async fn cancel_job(
        &self,
        p: &impl Platform,
        owner: &str,
        id: &str,
    ) -> Result<Response, ApiError> {
        let rec = self.read_job(p, owner, id).await?;
        if rec.status.is_final() {
            return Err(ApiError::new(
                409,
                "job_finished",
                format!(
                    "job {id} already ended as {}",
                    json!(rec.status).as_str().unwrap_or("?")
                ),
            ));
        }
        let doc = fields(json!({"cancel_requested": true, "updated_at": rfc3339(p.now_ms())}));
        self.gcp()?
            .update(
                p,
                JOBS_COLLECTION,
                id,
                doc,
                &["cancel_requested", "updated_at"],
            )
            .await?;
        Ok(Response::json(
            202,
            &json!({"job_id": id, "status": rec.status, "cancel_requested": true}),
        ))
    }
}

/// A Firestore document with the given fields (a JSON object), for partial updates.
fn fields(object: Value) -> Value {
    match &object {
        Value::Object(m) => json!({"fields": firestore::to_fields(m, &[])}),
        _ => json!({"fields": {}}),
    }
}

/// A new job's record: queued at `now`, expiring `JOB_TTL_MS` later.
fn new_record(
    job_id: &str,
    owner: &str,
    kind: JobKind,
    task: Task,
    size: (u64, u32),
    now: u64,
) -> JobRecord {
    let (total, shards) = size;
    JobRecord {
        expire_at: Some(rfc3339(now + JOB_TTL_MS)),
        ..JobRecord::queued(job_id, owner, kind, task, total, shards, &rfc3339(now))
    }
}

/// Milliseconds between two reads of a job during `GET /v1/jobs/{id}?wait=N`, `elapsed` ms
/// after the first read. A queued chat reply usually comes within a few seconds, so those are
/// read closely (a reply is seen at most 250 ms late), later ones less often: a 25 s wait
/// takes 39 reads, under the 50 subrequests a Worker may make per request on the Free plan.
pub fn poll_interval(elapsed_ms: u64) -> u64 {
    match elapsed_ms {
        0..3_000 => 250,
        3_000..7_000 => 500,
        _ => 1_000,
    }
}

/// Splits items into shards of at most `shard_items` items and `shard_bytes` bytes of items as
/// JSON (escapes included: a control character takes six), a shard of one item excepted.
pub fn shard(items: &[InputItem], limits: &Limits) -> Vec<Vec<InputItem>> {
    let mut shards = Vec::new();
    let mut cur: Vec<InputItem> = Vec::new();
    // A shard's items as JSON: `[`, each item and the `,` or `]` after it.
    let mut bytes = 1usize;
    for item in items {
        let size = json_len(item).saturating_add(1);
        if !cur.is_empty()
            && (cur.len() >= limits.shard_items || bytes.saturating_add(size) > limits.shard_bytes)
        {
            shards.push(std::mem::take(&mut cur));
            bytes = 1;
        }
        bytes = bytes.saturating_add(size);
        cur.push(item.clone());
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// Groups messages into publish requests under Pub/Sub's per-request limits.
fn publish_batches(messages: &[JobMessage]) -> Vec<Vec<Outgoing<'static>>> {
    let mut out: Vec<Vec<Outgoing<'static>>> = Vec::new();
    let mut bytes = 0;
    for m in messages {
        let data = serde_json::to_vec(m).unwrap_or_default();
        let attrs = vec![
            ("job_id", m.job_id.clone()),
            (
                "kind",
                json!(m.kind).as_str().unwrap_or_default().to_owned(),
            ),
            ("shard", m.shard.to_string()),
        ];
        // base64 grows data by 4/3; stay well under the 10 MB request limit.
        let size = data.len() * 4 / 3 + 256;
        match out.last_mut() {
            Some(batch) if batch.len() < 1000 && bytes + size <= 7 * 1024 * 1024 => {
                bytes += size;
                batch.push((data, attrs));
            }
            _ => {
                bytes = size;
                out.push(vec![(data, attrs)]);
            }
        }
    }
    out
}

fn method_not_allowed(req: &Request, path: &str, methods: &'static str) -> Response {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("{} is not allowed on {path}; use {methods}", req.method),
    )
    .to_response()
    .with_header("allow", methods)
}

/// The JSON values a batch body may hold: each item is an object and two strings; the rest is
/// room for the envelope and an item or two with an unknown field, said by a better error.
fn batch_values(limits: &Limits) -> usize {
    limits.batch_items.saturating_mul(4).saturating_add(64)
}

fn object_fields<'a>(v: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, ApiError> {
    let Value::Object(m) = v else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        ));
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "unknown_field",
            format!("unknown field {k:?}; allowed: {}", allowed.join(", ")),
        ));
    }
    Ok(m)
}

fn type_error(field: &str, want: &str) -> ApiError {
    ApiError::bad_request("invalid_type", format!("`{field}` must be {want}"))
}

fn required_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    match m.get(field) {
        None => Err(ApiError::bad_request(
            "missing_field",
            format!("`{field}` is required"),
        )),
        Some(v) => v.as_str().ok_or_else(|| type_error(field, "a string")),
    }
}

/// An optional field's string; `null` counts as absent, as many clients write a field they
/// have no value for.
fn optional_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| type_error(field, "a string")),
    }
}

/// The request's `x-request-id` if it is a usable one (1–128 of `[A-Za-z0-9._-]`), else a new
/// random one: what every response carries.
pub fn request_id(p: &impl Platform, req: &Request) -> String {
    match req.header("x-request-id") {
        Some(id) if valid_request_id(id) => id.to_owned(),
        _ => random_hex(p, 8),
    }
}

fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn valid_job_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex(p: &impl Platform, n: usize) -> String {
    let mut b = vec![0u8; n];
    p.random(&mut b);
    hex::encode(b)
}

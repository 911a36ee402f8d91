//! Firestore over REST for job records and shard checkpoints.
//!
//! Documents map to Rust types through `shared::firestore`, the same mapping the edge uses.
//! Writes go through `documents:commit`, so a checkpoint and the job's counters change in one
//! atomic commit, each conditioned on the `updateTime` the worker last read (fencing).

use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use shared::firestore;

use crate::gce::TokenSource;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Firestore unavailable: {0}")]
    Unavailable(String),
    #[error("Firestore rejected the request ({status}): {body}")]
    Rejected { status: u16, body: String },
    #[error("Firestore document {name} does not match its type: {message}")]
    Shape { name: String, message: String },
}

/// A document as read: the record and the `updateTime` to condition the next write on.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub record: T,
    pub update_time: String,
}

/// What a write is conditioned on.
#[derive(Debug, Clone)]
pub enum Precondition {
    None,
    /// The document must not exist yet.
    Missing,
    /// The document must exist (a patch must not create it).
    Exists,
    /// The document must still be at this `updateTime`.
    UpdateTime(String),
}

/// One write of a commit.
#[derive(Debug, Clone)]
pub struct Write {
    collection: &'static str,
    id: String,
    /// Plain JSON values of the fields to set (`None`: no field update, transforms only).
    fields: Option<Map<String, Value>>,
    mask: Option<Vec<String>>,
    precondition: Precondition,
    /// Field transforms applied atomically with the write, in order.
    transforms: Vec<(String, Transform)>,
}

/// A server-side change to one field of a [`Write`].
#[derive(Debug, Clone)]
enum Transform {
    /// Adds `n` to the integer.
    Increment(i64),
    /// Adds the string unless the array holds it: sending the same write again changes
    /// nothing.
    AppendMissing(String),
}

impl Write {
    /// Sets the whole document to `record`.
    pub fn set<T: Serialize>(
        collection: &'static str,
        id: &str,
        record: &T,
        precondition: Precondition,
    ) -> Self {
        let fields = match serde_json::to_value(record) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        Self {
            collection,
            id: id.to_owned(),
            fields: Some(fields),
            mask: None,
            precondition,
            transforms: Vec::new(),
        }
    }

    /// Sets only the top-level fields of `fields` (a JSON object), leaving the rest.
    pub fn patch(
        collection: &'static str,
        id: &str,
        fields: Value,
        precondition: Precondition,
    ) -> Self {
        let fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        Self {
            collection,
            id: id.to_owned(),
            mask: Some(fields.keys().cloned().collect()),
            fields: Some(fields),
            precondition,
            transforms: Vec::new(),
        }
    }

    /// Adds `n` to the integer at `path` (dotted) atomically, as part of this write.
    pub fn increment(mut self, path: &str, n: i64) -> Self {
        self.transforms
            .push((path.to_owned(), Transform::Increment(n)));
        self
    }

    /// Adds `value` to the array at `path` (dotted) unless it holds it already, as part of
    /// this write: an idempotent mark where an increment sent twice would count twice.
    pub fn append_missing(mut self, path: &str, value: &str) -> Self {
        self.transforms
            .push((path.to_owned(), Transform::AppendMissing(value.to_owned())));
        self
    }
}

/// Outcome of a commit.
#[derive(Debug)]
pub enum Committed {
    /// Applied; per write, its result.
    Done(Vec<WriteResult>),
    /// A precondition did not hold; nothing was written.
    Conflict,
}

/// What one applied write produced.
#[derive(Debug, Clone, Default)]
pub struct WriteResult {
    /// The document's new `updateTime`.
    pub update_time: String,
    /// The values its increments produced, in order.
    pub increments: Vec<i64>,
}

/// The REST client.
#[derive(Debug, Clone)]
pub struct Store {
    http: reqwest::Client,
    /// `.../v1/projects/P/databases/D/documents`
    base: String,
    /// `projects/P/databases/D/documents`
    root: String,
    /// `None` against the emulator.
    tokens: Option<Arc<TokenSource>>,
    /// Total time for one call, retries included.
    deadline: Duration,
    /// Reads and commits sent (one per call, however many retries it took).
    operations: Arc<crate::metrics::Counter>,
}

impl Store {
    /// Against the emulator at `host:port`.
    pub fn emulator(http: reqwest::Client, host: &str, project: &str, database: &str) -> Self {
        Self::new(http, format!("http://{host}"), project, database, None)
    }

    /// Against Firestore in production, with tokens from the metadata server.
    pub fn production(
        http: reqwest::Client,
        project: &str,
        database: &str,
        tokens: Arc<TokenSource>,
    ) -> Self {
        Self::new(
            http,
            "https://firestore.googleapis.com".into(),
            project,
            database,
            Some(tokens),
        )
    }

    fn new(
        http: reqwest::Client,
        origin: String,
        project: &str,
        database: &str,
        tokens: Option<Arc<TokenSource>>,
    ) -> Self {
        let root = format!("projects/{project}/databases/{database}/documents");
        Self {
            http,
            base: format!("{origin}/v1/{root}"),
            root,
            tokens,
            deadline: Duration::from_secs(30),
            operations: Arc::default(),
        }
    }

    /// Counts every read and commit in `counter` from now on.
    pub fn counting(mut self, counter: Arc<crate::metrics::Counter>) -> Self {
        self.operations = counter;
        self
    }

    async fn bearer(&self) -> Result<String, StoreError> {
        match &self.tokens {
            // The emulator treats `owner` as an all-powerful credential.
            None => Ok("Bearer owner".into()),
            Some(t) => t
                .token()
                .await
                .map(|tok| format!("Bearer {tok}"))
                .map_err(StoreError::Unavailable),
        }
    }

    /// Sends with retries on transport errors, 408, 429, 5xx and 409 `ABORTED` (contention)
    /// (exponential backoff with jitter, bounded by the deadline). Returns the final status
    /// and body.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), StoreError> {
        self.operations.add(1);
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut req = self
                .http
                .request(method.clone(), url)
                .header("authorization", self.bearer().await?)
                .timeout(Duration::from_secs(10));
            if let Some(b) = body {
                req = req.json(b);
            }
            let why = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    match r.text().await {
                        Ok(text) if firestore::transient(status, &text) => {
                            format!("{status}: {text}")
                        }
                        Ok(text) => return Ok((status, text)),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            if started.elapsed() + backoff > self.deadline {
                return Err(StoreError::Unavailable(why));
            }
            let jitter = rand::random_range(0.5..1.0);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(4));
        }
    }

    /// Reads `collection/id`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let url = format!("{}/{collection}/{id}", self.base);
        let (status, body) = self.send(reqwest::Method::GET, &url, None).await?;
        match status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(StoreError::Rejected { status, body }),
        }
        let shape = |message: String| StoreError::Shape {
            name: format!("{collection}/{id}"),
            message,
        };
        let doc: Value = serde_json::from_str(&body).map_err(|e| shape(e.to_string()))?;
        let record = firestore::from_document(&doc).map_err(|e| shape(e.to_string()))?;
        let update_time = doc["updateTime"].as_str().unwrap_or_default().to_owned();
        Ok(Some(Versioned {
            record,
            update_time,
        }))
    }

    /// Applies `writes` atomically.
    pub async fn commit(&self, writes: &[Write]) -> Result<Committed, StoreError> {
        let writes: Vec<Value> = writes.iter().map(|w| self.encode(w)).collect();
        let url = format!("{}:commit", self.base);
        let (status, body) = self
            .send(
                reqwest::Method::POST,
                &url,
                Some(&json!({ "writes": writes })),
            )
            .await?;
        if status == 200 {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let results = v["writeResults"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .map(|r| WriteResult {
                            update_time: r["updateTime"].as_str().unwrap_or_default().to_owned(),
                            increments: r["transformResults"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|t| {
                                    let n = &t["integerValue"];
                                    n.as_str()
                                        .and_then(|s| s.parse().ok())
                                        .or_else(|| n.as_i64())
                                })
                                .collect(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Ok(Committed::Done(results));
        }
        if firestore::write_conflict(status, &body) {
            Ok(Committed::Conflict)
        } else {
            Err(StoreError::Rejected { status, body })
        }
    }

    fn encode(&self, w: &Write) -> Value {
        let name = format!("{}/{}/{}", self.root, w.collection, w.id);
        let mut out = Map::new();
        match &w.fields {
            Some(fields) => {
                out.insert(
                    "update".into(),
                    json!({"name": name, "fields": firestore::to_fields(fields, shared::jobs::TIMESTAMP_FIELDS)}),
                );
                if let Some(mask) = &w.mask {
                    out.insert("updateMask".into(), json!({ "fieldPaths": mask }));
                }
                if !w.transforms.is_empty() {
                    out.insert("updateTransforms".into(), transforms(&w.transforms));
                }
            }
            None => {
                out.insert(
                    "transform".into(),
                    json!({"document": name, "fieldTransforms": transforms(&w.transforms)}),
                );
            }
        }
        match &w.precondition {
            Precondition::None => {}
            Precondition::Missing => {
                out.insert("currentDocument".into(), json!({"exists": false}));
            }
            Precondition::Exists => {
                out.insert("currentDocument".into(), json!({"exists": true}));
            }
            Precondition::UpdateTime(t) => {
                out.insert("currentDocument".into(), json!({ "updateTime": t }));
            }
        }
        Value::Object(out)
    }
}

fn transforms(transforms: &[(String, Transform)]) -> Value {
    Value::Array(
        transforms
            .iter()
            .map(|(path, t)| match t {
                Transform::Increment(n) => {
                    json!({"fieldPath": path, "increment": {"integerValue": n.to_string()}})
                }
                Transform::AppendMissing(value) => json!({
                    "fieldPath": path,
                    "appendMissingElements": {"values": [{"stringValue": value}]}
                }),
            })
            .collect(),
    )
}

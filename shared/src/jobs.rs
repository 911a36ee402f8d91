//! Jobs: the Firestore job record and the Pub/Sub job message, shared by edge and worker.
//!
//! The edge creates the record (`queued`) before it publishes the message; the worker moves
//! it to `running` and to a final status. The record holds no raw user text: the edge masks
//! personal data before anything leaves it.

use serde::{Deserialize, Serialize};

use crate::wire::{InputItem, Task};

/// Firestore collection of job records.
pub const JOBS_COLLECTION: &str = "jobs";
/// Firestore collection of `Idempotency-Key` records.
pub const IDEMPOTENCY_COLLECTION: &str = "idempotency";
/// Record fields stored as Firestore timestamps (`expire_at` carries the TTL policy).
pub const TIMESTAMP_FIELDS: &[&str] = &["expire_at"];
/// How long an `Idempotency-Key` is honoured.
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 3600 * 1000;
/// How long a finished job record is kept (Firestore TTL on `expire_at`).
pub const JOB_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Chat,
    Batch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// A queued chat message (already masked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub message: String,
    pub locale: String,
}

/// The job record (`jobs/{job_id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    /// The API key name that created the job; no other key sees it.
    pub owner: String,
    pub kind: JobKind,
    pub task: Task,
    pub status: JobStatus,
    pub counts: Counts,
    /// Number of shard messages published (0: the worker shards `input_uri` itself).
    pub shards: u32,
    /// Shards finished so far; the worker that brings it to `shards` finishes the job.
    #[serde(default)]
    pub shards_done: u32,
    /// One token per delivery of an `input_uri` job's plan message that a worker started
    /// planning. Tokens, not a count: a commit sent again after its answer was lost adds
    /// nothing (Firestore's `appendMissingElements`), and its sender finds its token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_started: Vec<String>,
    /// The tokens of those attempts that ended without a crash: planned and published, an
    /// error, or drained.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_ended: Vec<String>,
    /// A digest of an `input_uri` job's plan (its shards' byte ranges): planning again must
    /// cut the file the same way, or one shard's checkpoint would be applied to another range.
    /// For a file read whole (a worker with no jobs topic), a digest of the file itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// When Firestore's TTL policy may delete the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<String>,
}

impl JobRecord {
    /// A `queued` job as the edge writes it before publishing its messages: nothing done yet,
    /// both timestamps `now` (RFC 3339), no expiry.
    pub fn queued(
        job_id: &str,
        owner: &str,
        kind: JobKind,
        task: Task,
        total: u64,
        shards: u32,
        now: &str,
    ) -> Self {
        Self {
            job_id: job_id.to_owned(),
            owner: owner.to_owned(),
            kind,
            task,
            status: JobStatus::Queued,
            counts: Counts {
                total,
                done: 0,
                failed: 0,
            },
            shards,
            shards_done: 0,
            plan_started: Vec::new(),
            plan_ended: Vec::new(),
            plan: None,
            created_at: now.to_owned(),
            updated_at: now.to_owned(),
            cancel_requested: false,
            chat: None,
            input_uri: None,
            result: None,
            output_uri: None,
            error: None,
            expire_at: None,
        }
    }

    /// Plan deliveries that stopped a worker while it planned (killed, out of memory, a bug).
    pub fn plan_crashes(&self) -> usize {
        self.plan_started
            .iter()
            .filter(|t| !self.plan_ended.contains(t))
            .count()
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What `GET /v1/jobs/{id}` shows: the record minus its internals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: String,
    pub kind: JobKind,
    pub task: Task,
    pub status: JobStatus,
    pub counts: Counts,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

impl From<&JobRecord> for JobView {
    fn from(r: &JobRecord) -> Self {
        Self {
            job_id: r.job_id.clone(),
            kind: r.kind,
            task: r.task,
            status: r.status,
            counts: r.counts,
            created_at: r.created_at.clone(),
            updated_at: r.updated_at.clone(),
            result: r.result.clone(),
            output_uri: r.output_uri.clone(),
            error: r.error.clone(),
        }
    }
}

/// The Pub/Sub message for one shard of a job (JSON in the message `data`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMessage {
    pub job_id: String,
    pub kind: JobKind,
    pub task: Task,
    /// This shard's index, `0..shards`.
    pub shard: u32,
    pub shards: u32,
    /// Inline items of this shard (masked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<InputItem>,
    /// A bulk input file. Without `range` (`shards` 0, as the edge publishes it) the worker
    /// that takes the message plans the job: it cuts the file into ranges and publishes one
    /// message per range; with `range` the message is one of those shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_uri: Option<String>,
    /// This shard's part of `input_uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<InputRange>,
    /// A queued chat message (masked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatRequest>,
}

/// One shard's part of an `input_uri` file, as the worker that planned the job cut it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRange {
    /// First byte of the range: the start of a line.
    pub start: u64,
    /// One past the last byte: the end of a line (after its `\n`) or of the file.
    pub end: u64,
    /// Line number (from 1) of the line at `start`: error lines and duplicates name it.
    pub first_line: u64,
    /// The object's version (ETag) the plan was made from; a shard that finds another version
    /// fails the job instead of mixing two files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Line numbers in the range whose `custom_id` an earlier line of the file already used:
    /// they become `duplicate_custom_id` error lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<u64>,
    /// Line numbers of lines longer than [`crate::wire::MAX_LINE_BYTES`]: they become
    /// `line_too_long` error lines. A range that has them holds no other line, and is not read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub too_long: Vec<u64>,
}

impl JobMessage {
    /// The one message of an `input_uri` batch job, as the edge publishes it: no shards yet
    /// (`shards` 0) and no range; the worker that takes it plans the shards.
    pub fn input_file(job_id: &str, task: Task, input_uri: &str) -> Self {
        Self {
            job_id: job_id.to_owned(),
            kind: JobKind::Batch,
            task,
            shard: 0,
            shards: 0,
            items: Vec::new(),
            input_uri: Some(input_uri.to_owned()),
            range: None,
            chat: None,
        }
    }

    /// The one message of a queued chat job: a single `generate` shard carrying `chat`.
    pub fn chat(job_id: &str, chat: ChatRequest) -> Self {
        Self {
            job_id: job_id.to_owned(),
            kind: JobKind::Chat,
            task: Task::Generate,
            shard: 0,
            shards: 1,
            items: Vec::new(),
            input_uri: None,
            range: None,
            chat: Some(chat),
        }
    }
}

/// Firestore collection of shard checkpoints (`shards/{job_id}-{shard:05}`).
pub const SHARDS_COLLECTION: &str = "shards";

/// Where a shard stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    Running,
    Done,
    /// Stopped the worker too often without finishing; its message went to the dead-letter
    /// topic and the job failed.
    Quarantined,
}

/// A shard's checkpoint and lease (`shards/{id}`), written only by workers.
///
/// Every write is conditioned on the `updateTime` the writer last read, so a worker whose
/// lease was taken over (the epoch moved on) can no longer advance the cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub job_id: String,
    pub shard: u32,
    pub state: ShardState,
    /// Items of this shard.
    pub total: u64,
    /// Items done (an output line committed for each), in input order.
    pub cursor: u64,
    /// Of those, error lines.
    pub failed: u64,
    /// Incremented by every lease take-over.
    pub epoch: u64,
    /// `WORKER_ID` of the lease holder ("" when released).
    pub owner: String,
    /// The holder's process instance (a new one after every restart).
    pub instance: String,
    /// Drawn afresh by every lease take-over: a worker whose lease commit landed but whose
    /// answer was lost, so that the commit was sent again and refused, tells by it that the
    /// lease is its own ("" in records written before it was kept).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease_token: String,
    /// Unix ms after which another worker may take the lease.
    pub lease_expires_ms: u64,
    /// Leases taken, and how many of them ended in a drain (preemption is not a failure).
    pub deliveries: u32,
    pub drains: u32,
    /// Leases that ended in an error the worker lived through (object storage or Firestore
    /// failing, a full disk): given back like a drain, since the shard is not at fault.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub errors: u32,
    /// The last of those errors, for operators ("" when none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// Committed output chunks (object names under the output root), in order.
    pub chunks: Vec<String>,
    /// Done, but its output file not yet written from `chunks`, nor the shard counted in the
    /// job's `shards_done`: a batch shard between its last two commits, or one whose worker
    /// stopped there (the next delivery of its message does both).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpublished: bool,
    pub updated_at: String,
}

impl ShardRecord {
    /// The document id of shard `shard` of `job_id`.
    pub fn id(job_id: &str, shard: u32) -> String {
        format!("{job_id}-{shard:05}")
    }

    /// Deliveries that ended neither in a drain nor in an error given back: crashes, kills,
    /// lost leases.
    pub fn crashes(&self) -> u32 {
        self.deliveries
            .saturating_sub(self.drains)
            .saturating_sub(self.errors)
    }
}

/// A stored `Idempotency-Key` answer (`idempotency/{sha256(owner, route, key)}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub owner: String,
    /// `pending` while the first request runs, then `done`.
    pub state: String,
    pub status: u16,
    /// The first answer's JSON body.
    pub body: String,
    /// SHA-256 (hex) of the first request's body: the same key with another body is refused.
    /// Empty in records written before it was kept (then any body replays).
    #[serde(default)]
    pub request_sha256: String,
    pub created_at: String,
    pub expire_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firestore;

    #[test]
    fn shard_errors_are_neither_crashes_nor_needed_in_older_records() {
        let old = serde_json::json!({
            "job_id": "j1", "shard": 0, "state": "running", "total": 10, "cursor": 4,
            "failed": 0, "epoch": 3, "owner": "", "instance": "i", "lease_expires_ms": 0,
            "deliveries": 3, "drains": 1, "chunks": [], "updated_at": "",
        });
        let mut r: ShardRecord = serde_json::from_value(old).expect("an older record reads");
        assert_eq!((r.errors, r.last_error.as_str(), r.crashes()), (0, "", 2));
        r.errors = 1;
        r.last_error = "disk full".into();
        assert_eq!(r.crashes(), 1);
        let doc = firestore::to_document(&r, TIMESTAMP_FIELDS).expect("maps");
        let back: ShardRecord = firestore::from_document(&doc).expect("reads");
        assert_eq!(back, r);
    }

    #[test]
    fn a_record_with_the_old_plan_counters_still_reads() {
        let mut old = serde_json::to_value(JobRecord::queued(
            "j1",
            "team",
            JobKind::Batch,
            Task::Classify,
            0,
            0,
            "2026-11-27T00:00:00.000Z",
        ))
        .expect("json");
        old["plan_attempts"] = 2.into();
        old["plan_finished"] = 1.into();
        let back: JobRecord = serde_json::from_value(old).expect("reads");
        assert!(back.plan_started.is_empty() && back.plan_crashes() == 0);
    }

    #[test]
    fn job_record_round_trips_through_firestore() {
        let rec = JobRecord {
            job_id: "j1".into(),
            owner: "team".into(),
            kind: JobKind::Chat,
            task: Task::Generate,
            status: JobStatus::Queued,
            counts: Counts {
                total: 1,
                done: 0,
                failed: 0,
            },
            shards: 1,
            shards_done: 0,
            plan_started: vec!["a".into(), "b".into(), "c".into()],
            plan_ended: vec!["b".into()],
            plan: Some("0123456789abcdef".into()),
            created_at: "2026-11-27T00:00:00.000Z".into(),
            updated_at: "2026-11-27T00:00:00.000Z".into(),
            cancel_requested: false,
            chat: Some(ChatRequest {
                message: "짜장면 추천".into(),
                locale: "ko".into(),
            }),
            input_uri: None,
            result: Some(serde_json::json!({"reply": "..."})),
            output_uri: None,
            error: None,
            expire_at: Some("2026-12-04T00:00:00.000Z".into()),
        };
        let doc = firestore::to_document(&rec, TIMESTAMP_FIELDS).expect("maps");
        assert!(doc["fields"]["expire_at"]["timestampValue"].is_string());
        let back: JobRecord = firestore::from_document(&doc).expect("reads");
        assert_eq!(back, rec);
        let view = serde_json::to_value(JobView::from(&back)).expect("view");
        assert!(view.get("owner").is_none() && view.get("chat").is_none());
        assert!(view.get("plan_started").is_none() && view.get("plan_ended").is_none());
        assert_eq!(back.plan_crashes(), 2);
        assert_eq!(view["status"], "queued");
    }
}

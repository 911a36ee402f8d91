//! The items of a shard, and the plan of an `input_uri` file: a worker that takes a file's
//! plan message reads the file once, as a stream, cuts it into shards of at most
//! `INPUT_SHARD_ITEMS` lines on line boundaries (noting the lines that repeat an earlier
//! `custom_id`), records the plan on the job and publishes one message per shard; each shard
//! then reads only its byte range. Planning is counted like a shard's deliveries, so a file
//! that stops workers every time is quarantined.

use std::sync::atomic::Ordering;

use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use serde_json::json;
use shared::jobs::{InputRange, JOBS_COLLECTION, JobKind, JobMessage, JobRecord};
use shared::time::rfc3339;
use shared::wire::{
    InputItem, MAX_LINE_BYTES, OutputLine, Task, duplicate_id_line, line_too_long,
    parse_input_bytes,
};

use super::{
    Ctx, Final, Outcome, WorkError, commit_losing_answer, dead_letter, finish_job, now_ms,
};
use crate::outputs;
use crate::store::{Committed, Precondition, StoreError, Versioned, Write};

/// What [`WorkError::Publish`] says planning was publishing.
const SHARDS_OF_A_FILE: &str = "the shards of an input file";

/// How a job whose `input_uri` cannot be read, or cannot be JSONL in UTF-8, ends.
fn input_unreadable(message: String) -> Final {
    Final::Failed {
        code: "input_unreadable".into(),
        message,
    }
}

/// Why `uri` is not read here:
/// - a `file://` input is read only against the Pub/Sub emulator, as the edge accepts one only
///   then: in production a message naming one would have the worker read its VM's own files
///   into a job's outputs;
/// - nothing under `output_root`: every job's outputs are there, and a job reading them would
///   show its caller another key's results.
fn input_refused(uri: &str, emulated: bool, output_root: &str) -> Option<Final> {
    let local = uri
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("file:"));
    if local && !emulated {
        return Some(input_unreadable(format!(
            "{uri}: file:// inputs are read only against the emulators (PUBSUB_EMULATOR_HOST); use gs://bucket/file.jsonl"
        )));
    }
    let root = output_root.trim_end_matches('/');
    let outputs = uri
        .strip_prefix(root)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    outputs.then(|| {
        input_unreadable(format!(
            "{uri} is among the job outputs ({output_root}), which are not read as input; copy the file elsewhere"
        ))
    })
}

/// How a failed read of the input `uri` ends: a job whose input is missing, forbidden, not a
/// usable name or replaced fails (`Ok`); any other error (a storage outage, a connection cut
/// short) is one the worker lives through (`Err`): the message goes back and is tried again.
fn read_failed(uri: &str, e: outputs::OutputError) -> Result<Final, WorkError> {
    use object_store::Error as E;
    match e {
        outputs::OutputError::Changed(_) => Ok(Final::Failed {
            code: "input_changed".into(),
            message: e.to_string(),
        }),
        outputs::OutputError::Config(_)
        | outputs::OutputError::Store(
            E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. },
        ) => Ok(input_unreadable(format!("reading {uri}: {e}"))),
        e => Err(WorkError::Output(e)),
    }
}

/// Why [`load_items`] gave no items.
pub(super) enum Ended {
    /// The job ends so.
    Job(Final),
    /// An error the worker lives through: the message goes back and is tried again.
    Retry(WorkError),
}

/// A shard's items as [`load_items`] gives them.
pub(super) struct Loaded {
    pub items: Vec<Result<InputItem, OutputLine>>,
    /// For an input file read whole (no jobs topic to plan it on): 16 hex digits of its
    /// SHA-256, which the job's first lease keeps as its `plan`. A later delivery refuses
    /// another file: the checkpoint counts lines of the file as it was.
    pub file_digest: Option<String>,
}

impl From<Vec<Result<InputItem, OutputLine>>> for Loaded {
    fn from(items: Vec<Result<InputItem, OutputLine>>) -> Self {
        Self {
            items,
            file_digest: None,
        }
    }
}

/// The shard's items: inline, or read from `input_uri` (malformed lines become error lines).
pub(super) async fn load_items(
    ctx: &Ctx,
    msg: &JobMessage,
    job: &JobRecord,
) -> Result<Loaded, Ended> {
    if msg.task == Task::Generate && ctx.generate.is_none() {
        return Err(Ended::Job(Final::Failed {
            code: "model_unavailable".into(),
            message: "this worker has no text-generation model (MODEL_DIR/lm); classify jobs run, generate and queued chat jobs need one".into(),
        }));
    }
    if msg.kind == JobKind::Chat {
        let Some(chat) = msg.chat.as_ref().or(job.chat.as_ref()) else {
            return Err(Ended::Job(Final::Failed {
                code: "invalid_job".into(),
                message: "a chat job without its message".into(),
            }));
        };
        return Ok(vec![Ok(InputItem {
            custom_id: msg.job_id.clone(),
            input: chat.message.clone(),
        })]
        .into());
    }
    let Some(uri) = msg.input_uri.as_ref().or(job.input_uri.as_ref()) else {
        return Ok(msg.items.iter().cloned().map(Ok).collect::<Vec<_>>().into());
    };
    if let Some(refused) =
        input_refused(uri, ctx.cfg.pubsub_emulator.is_some(), &ctx.cfg.output_root)
    {
        return Err(Ended::Job(refused));
    }
    let unreadable = |e| match read_failed(uri, e) {
        Ok(why) => Ended::Job(why),
        Err(e) => Ended::Retry(e),
    };
    if let Some(range) = &msg.range {
        if !range.too_long.is_empty() {
            // The planner gives such lines ranges of their own: nothing else to read.
            return Ok(range
                .too_long
                .iter()
                .map(|&n| Err(line_too_long(n)))
                .collect::<Vec<_>>()
                .into());
        }
        let bytes = outputs::read_uri_range(uri, range.start..range.end, range.version.as_deref())
            .await
            .map_err(unreadable)?;
        let duplicates: std::collections::HashSet<u64> = range.duplicates.iter().copied().collect();
        return Ok(parse_lines(&bytes, range.first_line, |line_no, _| {
            duplicates.contains(&line_no)
        })
        .into());
    }
    // No jobs topic to publish shards on: the whole file is this one shard.
    let bytes = outputs::read_uri(uri).await.map_err(unreadable)?;
    if let Some(why) = shared::wire::unusable_encoding(&bytes) {
        return Err(Ended::Job(input_unreadable(format!("{uri} {why}"))));
    }
    let digest = {
        use sha2::Digest;
        crate::short_digest(sha2::Sha256::new_with_prefix(&bytes))
    };
    if job.shards != 0 && job.plan.as_ref().is_some_and(|d| *d != digest) {
        return Err(Ended::Job(Final::Failed {
            code: "input_changed".into(),
            message: format!(
                "{uri} changed since this job began: its checkpoint counts lines of the file \
                 as it was then; submit the new file as a new job"
            ),
        }));
    }
    let mut seen = crate::embedded::SeenIds::with_capacity(0);
    Ok(Loaded {
        items: parse_lines(&bytes, 1, |_, id| !seen.insert(id)),
        file_digest: Some(digest),
    })
}

/// The items of the input lines in `bytes`, the first numbered `first_line`: malformed lines
/// and those `duplicate` says repeat an earlier `custom_id` become error lines; blank lines
/// are skipped.
fn parse_lines(
    bytes: &[u8],
    first_line: u64,
    mut duplicate: impl FnMut(u64, &str) -> bool,
) -> Vec<Result<InputItem, OutputLine>> {
    let mut items = Vec::new();
    for (line_no, line) in (first_line..).zip(bytes.split(|b| *b == b'\n')) {
        if line.trim_ascii().is_empty() {
            continue;
        }
        if line.len() > MAX_LINE_BYTES {
            items.push(Err(line_too_long(line_no)));
            continue;
        }
        items.push(match parse_input_bytes(line, line_no) {
            Ok(item) if duplicate(line_no, &item.custom_id) => {
                Err(duplicate_id_line(item, line_no))
            }
            other => other,
        });
    }
    items
}

/// An `input_uri` file cut into shards.
#[derive(Debug, PartialEq)]
struct InputPlan {
    ranges: Vec<InputRange>,
    /// Non-blank lines: the job's items.
    total: u64,
    /// Why the file cannot be JSONL in UTF-8, when its first bytes say so.
    unusable: Option<&'static str>,
}

/// Cuts an input file, fed in pieces as storage delivers it, into ranges of at most
/// `per_shard` non-blank lines, on line boundaries, and lists in each range the lines whose
/// `custom_id` an earlier line of the file used. Always at least one range (an empty file's is
/// empty). Deterministic: the same bytes, however they are split into pieces, give the same
/// shards, so planning again after a crash publishes the same ones.
struct Planner {
    per_shard: u64,
    version: Option<String>,
    /// 128 bits of each id's SHA-256, not the ids themselves: a file of millions of lines is
    /// planned in a fraction of its size, and a collision is out of reach.
    seen: std::collections::HashSet<[u8; 16]>,
    ranges: Vec<InputRange>,
    /// The range being filled: its first byte and line, its items and duplicates so far.
    start: u64,
    first_line: u64,
    in_range: u64,
    duplicates: Vec<u64>,
    /// Items in the whole file so far.
    total: u64,
    /// Bytes and lines consumed (whole lines only).
    end: u64,
    lines: u64,
    /// The bytes of a line not yet ended by `\n`, unless it is longer than
    /// [`MAX_LINE_BYTES`]: then only its length and whether it is blank so far are kept.
    partial: Vec<u8>,
    long: Option<LongLine>,
    /// The file's first two bytes.
    head: Vec<u8>,
}

/// A line longer than [`MAX_LINE_BYTES`], as far as the [`Planner`] has read it.
#[derive(Clone, Copy)]
struct LongLine {
    bytes: u64,
    filled: bool,
}

impl Planner {
    fn new(per_shard: u64, version: Option<String>) -> Self {
        Self {
            per_shard: per_shard.max(1),
            version,
            seen: Default::default(),
            ranges: Vec::new(),
            start: 0,
            first_line: 1,
            in_range: 0,
            duplicates: Vec::new(),
            total: 0,
            end: 0,
            lines: 0,
            partial: Vec::new(),
            long: None,
            head: Vec::new(),
        }
    }

    /// The next bytes of the file.
    fn feed(&mut self, mut bytes: &[u8]) {
        let wanted = 2usize.saturating_sub(self.head.len()).min(bytes.len());
        self.head.extend_from_slice(&bytes[..wanted]);
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            let (line, rest) = bytes.split_at(i + 1);
            if let Some(long) = self.long.take() {
                self.long_line(LongLine {
                    bytes: long.bytes + line.len() as u64,
                    filled: long.filled || !line.trim_ascii().is_empty(),
                });
            } else if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole);
                whole.clear();
                self.partial = whole;
            }
            bytes = rest;
        }
        self.hold(bytes);
    }

    /// Keeps `bytes`, the start of a line not ended yet, or only their count and whether they
    /// are blank once the line is longer than [`MAX_LINE_BYTES`].
    fn hold(&mut self, bytes: &[u8]) {
        let filled = || !bytes.trim_ascii().is_empty();
        if let Some(long) = &mut self.long {
            long.bytes += bytes.len() as u64;
            long.filled |= filled();
        } else if self.partial.len() + bytes.len() > MAX_LINE_BYTES {
            self.long = Some(LongLine {
                bytes: (self.partial.len() + bytes.len()) as u64,
                filled: !self.partial.trim_ascii().is_empty() || filled(),
            });
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// A line longer than [`MAX_LINE_BYTES`] (with its `\n` if it has one), not held. It gets
    /// a range of its own, which the shard that takes it need not read; a blank one is left
    /// out of every range, so that no shard reads it either.
    fn long_line(&mut self, line: LongLine) {
        if self.in_range > 0 {
            self.close();
        }
        self.lines += 1;
        if line.filled {
            self.total += 1;
            self.ranges.push(InputRange {
                start: self.end,
                end: self.end + line.bytes,
                first_line: self.lines,
                version: self.version.clone(),
                duplicates: Vec::new(),
                too_long: vec![self.lines],
            });
        }
        self.end += line.bytes;
        (self.start, self.first_line, self.in_range) = (self.end, self.lines + 1, 0);
    }

    /// One line, with its `\n` if it has one.
    fn line(&mut self, line: &[u8]) {
        if line.strip_suffix(b"\n").unwrap_or(line).len() > MAX_LINE_BYTES {
            return self.long_line(LongLine {
                bytes: line.len() as u64,
                filled: !line.trim_ascii().is_empty(),
            });
        }
        self.lines += 1;
        self.end += line.len() as u64;
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        if content.trim_ascii().is_empty() {
            return;
        }
        if let Ok(item) = parse_input_bytes(content, self.lines) {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(item.custom_id.as_bytes());
            let mut key = [0u8; 16];
            key.copy_from_slice(&digest[..16]);
            if !self.seen.insert(key) {
                self.duplicates.push(self.lines);
            }
        }
        self.in_range += 1;
        self.total += 1;
        if self.in_range == self.per_shard {
            self.close();
            (self.start, self.first_line, self.in_range) = (self.end, self.lines + 1, 0);
        }
    }

    /// Ends the range being filled at the bytes consumed so far.
    fn close(&mut self) {
        self.ranges.push(InputRange {
            start: self.start,
            end: self.end,
            first_line: self.first_line,
            version: self.version.clone(),
            duplicates: std::mem::take(&mut self.duplicates),
            too_long: Vec::new(),
        });
    }

    /// The plan, once the whole file was fed.
    fn finish(mut self) -> InputPlan {
        if let Some(long) = self.long.take() {
            self.long_line(long);
        } else if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.line(&last);
        }
        // The last lines, or nothing at all (blank lines after the last cut add none).
        if self.in_range > 0 || self.ranges.is_empty() {
            self.close();
        }
        InputPlan {
            ranges: self.ranges,
            total: self.total,
            unusable: shared::wire::unusable_encoding(&self.head),
        }
    }
}

/// Plans an `input_uri` job (its message has no range): reads the file, records the number of
/// shards and items on the job, and publishes one message per range, so that several workers
/// share the file. Safe to repeat (a redelivery after a crash): the same file gives the same
/// plan, a shard published twice is fenced like any redelivered one, and a shard already done
/// is only acked.
pub(super) async fn plan_job(
    ctx: &Ctx,
    msg: &JobMessage,
    raw: &Message,
    uri: &str,
    jobs: &Publisher,
    job: Versioned<JobRecord>,
) -> Result<Outcome, WorkError> {
    if ctx.drain.is_cancelled() {
        return Ok(Outcome::Nack);
    }
    // A plan that stops its worker every time (too little memory, a bug) ends like a poison
    // shard instead of keeping its job `queued` until the subscription gives up on it.
    if job.record.plan_crashes() >= ctx.cfg.poison_limit as usize {
        quarantine_plan(ctx, msg, raw, uri, &job.record).await?;
        return Ok(Outcome::Ack);
    }
    let attempt = PlanAttempt(format!("{:016x}", rand::random::<u64>()));
    let Some(job) = attempt.start(ctx, &msg.job_id, job).await? else {
        // Finished, cancelled or gone meanwhile: the next delivery sorts it out.
        return Ok(Outcome::Nack);
    };
    let planned = plan_counted(ctx, msg, uri, jobs, job, &attempt).await;
    if let Err(e) = &planned {
        // An error (an outage of Pub/Sub or Firestore) is not a crash: the attempt ended,
        // and the message goes back to be tried again. Should this write fail as well, the
        // attempt stays counted as a crash.
        tracing::warn!(error = %e, "planning failed; the plan message goes back");
        let _ = attempt.end(ctx, &msg.job_id).await;
    }
    planned
}

/// 16 hex digits of the SHA-256 of a plan's ranges: two plans of a file are the same plan only
/// if they cut it the same way.
fn plan_digest(ranges: &[InputRange]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for r in ranges {
        for n in [r.start, r.end, r.first_line] {
            h.update(n.to_le_bytes());
        }
    }
    crate::short_digest(h)
}

/// [`plan_job`] once the attempt is counted: reads the file, records the plan on the job and
/// publishes its shards.
async fn plan_counted(
    ctx: &Ctx,
    msg: &JobMessage,
    uri: &str,
    jobs: &Publisher,
    mut job: Versioned<JobRecord>,
    attempt: &PlanAttempt,
) -> Result<Outcome, WorkError> {
    if let Some(refused) =
        input_refused(uri, ctx.cfg.pubsub_emulator.is_some(), &ctx.cfg.output_root)
    {
        finish_job(ctx, &msg.job_id, refused).await?;
        return Ok(Outcome::Ack);
    }
    // The file is read as a stream and never held whole; a drain stops the read.
    let per_shard = ctx.cfg.input_shard_items;
    let read = outputs::read_uri_pieces(
        uri,
        |version| Planner::new(per_shard, version.map(str::to_owned)),
        |planner, piece| {
            !ctx.drain.is_cancelled() && {
                tokio::task::block_in_place(|| {
                    planner.feed(piece);
                    std::thread::sleep(ctx.cfg.failpoints.plan_delay);
                });
                true
            }
        },
    )
    .await;
    let plan = match read {
        Ok(Some(planner)) => planner.finish(),
        Ok(None) => {
            tracing::info!("drained while planning; the plan message goes back");
            attempt.end(ctx, &msg.job_id).await?;
            return Ok(Outcome::Nack);
        }
        // An outage is tried again, not counted (see `plan_job`).
        Err(e) => {
            let why = read_failed(uri, e)?;
            finish_job(ctx, &msg.job_id, why).await?;
            return Ok(Outcome::Ack);
        }
    };
    if let Some(why) = plan.unusable {
        finish_job(ctx, &msg.job_id, input_unreadable(format!("{uri} {why}"))).await?;
        return Ok(Outcome::Ack);
    }
    if ctx.cfg.failpoints.crash_while_planning {
        tracing::error!("failpoint crash-while-planning hit: aborting");
        std::process::abort();
    }
    let errors = &ctx.cfg.failpoints.plan_errors;
    if errors
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(WorkError::Publish(
            SHARDS_OF_A_FILE,
            "failpoint plan-errors".into(),
        ));
    }
    let shards = u32::try_from(plan.ranges.len()).unwrap_or(u32::MAX);
    let digest = plan_digest(&plan.ranges);
    loop {
        // A record planned before digests were kept has only its shard count to compare.
        let same =
            job.record.shards == shards && job.record.plan.as_ref().is_none_or(|d| *d == digest);
        if same {
            break;
        }
        if job.record.shards != 0 {
            let why = Final::Failed {
                code: "input_changed".into(),
                message: format!(
                    "{uri} was planned into {} shards before and into {shards} other ones now: \
                     the file changed during the job, or workers with another \
                     INPUT_SHARD_ITEMS share the subscription",
                    job.record.shards
                ),
            };
            finish_job(ctx, &msg.job_id, why).await?;
            return Ok(Outcome::Ack);
        }
        let patch = json!({
            "status": "running",
            "shards": shards,
            "plan": digest,
            "counts": {
                "total": plan.total,
                "done": job.record.counts.done,
                "failed": job.record.counts.failed,
            },
            "updated_at": rfc3339(now_ms()),
        });
        let write = Write::patch(
            JOBS_COLLECTION,
            &msg.job_id,
            patch,
            Precondition::UpdateTime(job.update_time.clone()),
        );
        if let Committed::Done(_) = ctx.store.commit(&[write]).await? {
            break;
        }
        // Changed meanwhile (a cancel, or another worker planned it): look again.
        job = match ctx
            .store
            .get::<JobRecord>(JOBS_COLLECTION, &msg.job_id)
            .await?
        {
            Some(j) if !j.record.status.is_final() && !j.record.cancel_requested => j,
            // Gone, finished or cancelled: this message's next delivery sees it and acks.
            _ => return Ok(Outcome::Nack),
        };
    }
    if ctx.cfg.failpoints.crash_after_plan {
        tracing::error!("failpoint crash-after-plan hit: aborting");
        std::process::abort();
    }
    let mut pending = Vec::with_capacity(plan.ranges.len());
    for (i, range) in plan.ranges.into_iter().enumerate() {
        let shard = JobMessage {
            job_id: msg.job_id.clone(),
            kind: JobKind::Batch,
            task: msg.task,
            shard: i as u32,
            shards,
            items: Vec::new(),
            input_uri: Some(uri.to_owned()),
            range: Some(range),
            chat: None,
        };
        let data = serde_json::to_vec(&shard)
            .map_err(|e| WorkError::Publish(SHARDS_OF_A_FILE, e.to_string()))?;
        pending.push(jobs.publish(Message::new().set_data(data)));
    }
    for p in pending {
        p.await
            .map_err(|e| WorkError::Publish(SHARDS_OF_A_FILE, e.to_string()))?;
    }
    attempt.end(ctx, &msg.job_id).await?;
    tracing::info!(
        shards,
        items = plan.total,
        "input planned, its shards published"
    );
    Ok(Outcome::Ack)
}

/// One delivery of a plan message being planned, by its token on the job record.
struct PlanAttempt(String);

impl PlanAttempt {
    /// Records on the job that a worker starts planning it, before it reads a byte: a crash
    /// from here on counts towards the poison limit. `None`: the job finished, was cancelled
    /// or is gone.
    async fn start(
        &self,
        ctx: &Ctx,
        job_id: &str,
        mut job: Versioned<JobRecord>,
    ) -> Result<Option<Versioned<JobRecord>>, WorkError> {
        loop {
            let write = Write::patch(
                JOBS_COLLECTION,
                job_id,
                json!({}),
                Precondition::UpdateTime(job.update_time.clone()),
            )
            .append_missing("plan_started", &self.0);
            let lose = ctx.cfg.failpoints.lose_plan_answers;
            if let Committed::Done(results) = commit_losing_answer(ctx, &[write], lose).await? {
                if let Some(r) = results.into_iter().next() {
                    job.update_time = r.update_time;
                }
                job.record.plan_started.push(self.0.clone());
                return Ok(Some(job));
            }
            // Changed meanwhile, or this very commit landed and was sent again (the record
            // then holds this attempt's token).
            job = match ctx.store.get::<JobRecord>(JOBS_COLLECTION, job_id).await? {
                Some(j) if j.record.plan_started.contains(&self.0) => return Ok(Some(j)),
                Some(j) if !j.record.status.is_final() && !j.record.cancel_requested => j,
                _ => return Ok(None),
            };
        }
    }

    /// Records that the attempt ended without a crash (published, an error, or drained).
    async fn end(&self, ctx: &Ctx, job_id: &str) -> Result<(), WorkError> {
        let write = Write::patch(JOBS_COLLECTION, job_id, json!({}), Precondition::Exists)
            .append_missing("plan_ended", &self.0);
        // A record deleted meanwhile (Conflict) has nothing left to count.
        commit_losing_answer(ctx, &[write], ctx.cfg.failpoints.lose_plan_answers).await?;
        Ok(())
    }
}

/// Planning the job's input stopped a worker too often: its plan message goes to the
/// dead-letter topic and the job fails with the reason.
async fn quarantine_plan(
    ctx: &Ctx,
    msg: &JobMessage,
    raw: &Message,
    uri: &str,
    job: &JobRecord,
) -> Result<(), WorkError> {
    let reason = format!(
        "planning job {}'s input {uri} stopped a worker {} times without finishing; its message was moved to the dead-letter topic",
        msg.job_id,
        job.plan_crashes(),
    );
    if !dead_letter(ctx, raw, &reason).await {
        return Err(WorkError::Store(StoreError::Unavailable(
            "dead-letter topic unavailable".into(),
        )));
    }
    ctx.metrics.shards_quarantined.add(1);
    finish_job(
        ctx,
        &msg.job_id,
        Final::Failed {
            code: "plan_failed".into(),
            message: reason,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nine lines cut by four and by three are three shards either way, yet not one plan.
    #[test]
    fn plans_with_as_many_shards_differ_when_their_ranges_do() {
        let text: String = (0..9)
            .map(|i| format!("{{\"custom_id\":\"{i}\",\"input\":\"x\"}}\n"))
            .collect();
        let (by4, by3) = (
            plan(text.as_bytes(), 4, None, 7),
            plan(text.as_bytes(), 3, None, 7),
        );
        assert_eq!((by4.ranges.len(), by3.ranges.len()), (3, 3));
        assert_ne!(plan_digest(&by4.ranges), plan_digest(&by3.ranges));
        let again = plan(text.as_bytes(), 4, None, 3);
        assert_eq!(plan_digest(&by4.ranges), plan_digest(&again.ranges));
    }

    /// An input that is missing or forbidden ends its job; an outage is tried again.
    #[test]
    fn a_failed_read_ends_the_job_only_when_trying_again_cannot_help() {
        use object_store::Error as E;
        let store = |e| outputs::OutputError::Store(e);
        for e in [
            store(E::NotFound {
                path: "in.jsonl".into(),
                source: "no such object".into(),
            }),
            store(E::PermissionDenied {
                path: "in.jsonl".into(),
                source: "403".into(),
            }),
            outputs::OutputError::Changed("gs://b/in.jsonl".into()),
        ] {
            match read_failed("gs://b/in.jsonl", e) {
                Ok(Final::Failed { code, .. }) => {
                    assert!(
                        code == "input_unreadable" || code == "input_changed",
                        "{code}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        let outage = store(E::Generic {
            store: "GCS",
            source: "503 Service Unavailable".into(),
        });
        assert!(matches!(
            read_failed("gs://b/in.jsonl", outage),
            Err(WorkError::Output(_))
        ));
    }

    #[test]
    fn local_inputs_and_outputs_are_not_read_as_input() {
        let root = "gs://p-outputs/jobs";
        let refused =
            |uri: &str, emulated: bool, says: &str| match input_refused(uri, emulated, root) {
                Some(Final::Failed { code, message }) => {
                    assert_eq!(code, "input_unreadable");
                    assert!(message.contains(says), "{message}");
                }
                other => panic!("{uri}: {other:?}"),
            };
        for uri in ["file:///etc/passwd", "FILE:///tmp/in.jsonl"] {
            assert!(input_refused(uri, true, root).is_none(), "{uri}");
            refused(uri, false, "use gs://");
        }
        for uri in [
            "gs://p-outputs/jobs/0123/output/shard-00000.jsonl",
            "gs://p-outputs/jobs",
        ] {
            refused(uri, false, "among the job outputs");
        }
        // A dev stack's outputs are local files.
        let dev = "file:///work/.dev/outputs/";
        assert!(input_refused("file:///work/.dev/outputs/j/output/s.jsonl", true, dev).is_some());
        assert!(input_refused("file:///tmp/in.jsonl", true, dev).is_none());
        for uri in [
            "gs://bucket/in.jsonl",
            "gs://p-outputs/jobsx/in.jsonl",
            "gs://p-outputs/in.jsonl",
            "fil",
            "",
        ] {
            assert!(input_refused(uri, false, root).is_none(), "{uri}");
        }
    }

    /// The whole file parsed as one shard, as a worker without a jobs topic does.
    fn whole(bytes: &[u8]) -> Vec<Result<InputItem, OutputLine>> {
        let mut seen = crate::embedded::SeenIds::with_capacity(0);
        parse_lines(bytes, 1, |_, id| !seen.insert(id))
    }

    /// The plan of `bytes` fed in pieces of `piece` bytes.
    fn plan(bytes: &[u8], per_shard: u64, version: Option<&str>, piece: usize) -> InputPlan {
        let mut p = Planner::new(per_shard, version.map(str::to_owned));
        for chunk in bytes.chunks(piece) {
            p.feed(chunk);
        }
        p.finish()
    }

    /// Every range parsed as its shard does, in order.
    fn sharded(bytes: &[u8], plan: &InputPlan) -> Vec<Result<InputItem, OutputLine>> {
        let mut all = Vec::new();
        for r in &plan.ranges {
            if !r.too_long.is_empty() {
                all.extend(r.too_long.iter().map(|&n| Err(line_too_long(n))));
                continue;
            }
            let part = &bytes[r.start as usize..r.end as usize];
            all.extend(parse_lines(part, r.first_line, |n, _| {
                r.duplicates.contains(&n)
            }));
        }
        all
    }

    #[test]
    fn shards_of_a_file_give_the_lines_the_whole_file_gives() {
        let file = concat!(
            "{\"custom_id\":\"a\",\"input\":\"안녕\"}\n",
            "\n",
            "{\"custom_id\":\"b\",\"input\":\"hi\"}\r\n",
            "not json\n",
            "{\"custom_id\":\"a\",\"input\":\"dup of line 1\"}\n",
            "   \n",
            "{\"custom_id\":\"c\",\"input\":\"짜장면\"}\n",
            "{\"custom_id\":\"b\",\"input\":\"dup of line 3\"}\n",
            "{\"input\":\"no id\"}\n",
            "{\"custom_id\":\"d\",\"input\":\"last, no newline\"}",
        )
        .as_bytes()
        .to_vec();
        let mut bad_utf8 = file.clone();
        bad_utf8.splice(0..0, b"\xff\xfe\n".iter().copied());
        // A byte-order mark before line 1 changes no line.
        let mut with_bom = shared::wire::UTF8_BOM.to_vec();
        with_bom.extend_from_slice(&file);
        assert_eq!(whole(&with_bom), whole(&file));
        for bytes in [file, bad_utf8, with_bom] {
            let want = whole(&bytes);
            assert!(want.len() >= 8, "{want:?}");
            assert!(want.iter().filter(|l| l.is_err()).count() >= 4);
            for per_shard in [1, 2, 3, 4, 8, 9, 100] {
                let plan = plan(&bytes, per_shard, Some("v1"), bytes.len().max(1));
                assert_eq!(plan.total, want.len() as u64, "per_shard {per_shard}");
                assert_eq!(
                    plan.ranges.len() as u64,
                    plan.total.div_ceil(per_shard),
                    "per_shard {per_shard}"
                );
                assert_eq!(sharded(&bytes, &plan), want, "per_shard {per_shard}");
                // Contiguous, on line starts, covering every line.
                assert_eq!(plan.ranges[0].start, 0);
                for w in plan.ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert_eq!(bytes[w[1].start as usize - 1], b'\n');
                }
                assert!(
                    plan.ranges
                        .iter()
                        .all(|r| r.version.as_deref() == Some("v1"))
                );
                // However storage splits the file into pieces.
                for piece in [1, 2, 7, 64] {
                    assert_eq!(plan, self::plan(&bytes, per_shard, Some("v1"), piece));
                }
            }
        }
    }

    #[test]
    fn a_utf16_or_gzip_file_is_named_in_its_plan() {
        let text = "{\"custom_id\":\"a\",\"input\":\"hi\"}\n";
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let gzip = b"\x1F\x8B\x08\x00\x00\x00\x00\x00\n\x03".to_vec();
        for (bytes, what) in [(utf16, "UTF-16"), (gzip, "gzip")] {
            for piece in [1, 2, 3, bytes.len()] {
                let p = plan(&bytes, 10, None, piece);
                assert!(
                    p.unusable.is_some_and(|w| w.contains(what)),
                    "{what}, pieces of {piece}: {:?}",
                    p.unusable
                );
            }
        }
        for piece in [1, 64] {
            assert_eq!(plan(text.as_bytes(), 10, None, piece).unusable, None);
        }
    }

    #[test]
    fn a_line_over_the_limit_gets_a_range_of_its_own_and_an_error_line() {
        let long = format!(
            "{{\"custom_id\":\"big\",\"input\":\"{}\"}}",
            "가".repeat(MAX_LINE_BYTES / 3)
        );
        let mut bytes = Vec::new();
        for line in [
            "{\"custom_id\":\"a\",\"input\":\"안녕\"}",
            &long,
            &" ".repeat(MAX_LINE_BYTES + 50),
            &"x".repeat(MAX_LINE_BYTES),
            "{\"custom_id\":\"b\",\"input\":\"hi\"}",
            &long,
        ] {
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        bytes.pop(); // the last line ends the file
        let want = whole(&bytes);
        let codes: Vec<String> = want
            .iter()
            .map(|l| match l {
                Ok(item) => item.custom_id.clone(),
                Err(OutputLine::Err { custom_id, error }) => format!("{custom_id} {}", error.code),
                Err(other) => panic!("{other:?}"),
            })
            .collect();
        // The blank line is skipped; one of exactly the limit is read (and is not JSON).
        assert_eq!(
            codes,
            [
                "a",
                "2 line_too_long",
                "4 invalid_item",
                "b",
                "6 line_too_long"
            ]
        );
        for per_shard in [1, 2, 100] {
            for piece in [4096, 1 << 16, 3 << 20] {
                let plan = plan(&bytes, per_shard, None, piece);
                assert_eq!(plan.total, 5, "per_shard {per_shard}, piece {piece}");
                assert_eq!(sharded(&bytes, &plan), want, "per_shard {per_shard}");
                assert_eq!(plan.ranges[0].start, 0);
                assert_eq!(plan.ranges.last().map(|r| r.end), Some(bytes.len() as u64));
                // In order, with one gap: the long blank line, which no shard reads.
                let gaps: Vec<usize> = plan
                    .ranges
                    .windows(2)
                    .map(|w| w[1].start as usize - w[0].end as usize)
                    .filter(|&g| g > 0)
                    .collect();
                assert_eq!(gaps, [MAX_LINE_BYTES + 51]);
                // Each long line alone in its range: the shard reads none of its bytes.
                let spans: Vec<_> = plan
                    .ranges
                    .iter()
                    .filter(|r| !r.too_long.is_empty())
                    .map(|r| (r.too_long.clone(), r.first_line, r.end - r.start))
                    .collect();
                let n = long.len() as u64;
                assert_eq!(spans, [(vec![2], 2, n + 1), (vec![6], 6, n)]);
            }
        }
    }

    #[test]
    fn a_file_without_items_is_one_empty_shard() {
        for bytes in [&b""[..], b"\n\n  \n"] {
            let plan = plan(bytes, 10, None, 3);
            assert_eq!(plan.total, 0);
            assert_eq!(plan.ranges.len(), 1);
            assert!(sharded(bytes, &plan).is_empty());
        }
    }
}

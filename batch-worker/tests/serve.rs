//! `batch-worker serve` against the real Pub/Sub and Firestore emulators and real ONNX
//! Runtime: kills, drains, fencing, poison shards, cancellation and preemption notices.
//!
//! One emulator pair serves every scenario (each in its own project); the scenarios run one
//! after another and the test reports every one that failed.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use shared::firestore;
use shared::jobs::{
    ChatRequest, Counts, JOBS_COLLECTION, JobKind, JobMessage, JobRecord, JobStatus,
    SHARDS_COLLECTION, ShardRecord, ShardState,
};
use shared::wire::{InputItem, Task};
use stack::emulators::Emulators;
use stack::gcp::{Firestore, PubSub, Topology};
use stack::jobs::Jobs;
use stack::worker::WorkerConfig;

const BIN: &str = env!("CARGO_BIN_EXE_batch-worker");

/// How long a message of a killed worker may take to come back. The Pub/Sub emulator does
/// not notice a closed streaming pull (its log shows `NoSuchMethodError` in
/// `onRstStreamRead`): it keeps sending to the dead stream, and each message sent there
/// returns only when its 10 s ack deadline passes, so a redelivery can take several rounds.
/// Real Pub/Sub redelivers after one ack deadline.
const REDELIVERY: Duration = Duration::from_secs(120);

struct Fixture {
    emu: Emulators,
    dir: PathBuf,
}

/// One scenario's world: its own project, topics, output folder and workers.
struct World<'a> {
    fx: &'a Fixture,
    name: String,
    t: Topology,
    ps: PubSub,
    fs: Firestore,
    out: PathBuf,
}

impl<'a> World<'a> {
    async fn new(fx: &'a Fixture, name: &str) -> anyhow::Result<Self> {
        // Ack deadline 10 s; the subscription's own dead-letter limit above the worker's.
        Self::with_delivery_limit(fx, name, 20).await
    }

    /// A world whose subscription dead-letters after `max_delivery_attempts`.
    async fn with_delivery_limit(
        fx: &'a Fixture,
        name: &str,
        max_delivery_attempts: u32,
    ) -> anyhow::Result<Self> {
        Self::build(fx, name, max_delivery_attempts, true).await
    }

    /// A world whose chat messages go to the jobs topic, with no chat subscription.
    async fn without_chat_subscription(fx: &'a Fixture, name: &str) -> anyhow::Result<Self> {
        Self::build(fx, name, 20, false).await
    }

    async fn build(
        fx: &'a Fixture,
        name: &str,
        max_delivery_attempts: u32,
        chat_subscription: bool,
    ) -> anyhow::Result<Self> {
        let project = stack::unique_name(name);
        let mut t = Topology::unique(&project);
        if !chat_subscription {
            t = t.without_chat_subscription();
        }
        let ps = PubSub::new(&fx.emu.pubsub_host);
        ps.create_topology(&t, 10, max_delivery_attempts).await?;
        let fs = Firestore::new(&fx.emu.firestore_host, &project);
        let out = fx.dir.join(name).join("out");
        let _ = std::fs::remove_dir_all(fx.dir.join(name));
        std::fs::create_dir_all(&out)?;
        Ok(Self {
            fx,
            name: name.to_owned(),
            t,
            ps,
            fs,
            out,
        })
    }

    /// A worker configured for fast tests: short chunks, leases and ack extensions.
    fn worker(&self, id: &str) -> WorkerConfig {
        WorkerConfig::new(Path::new(BIN), id, &self.fx.emu, &self.t, &self.out)
            .with("CHUNK_SECONDS", "0.3")
            .with("LEASE_SECONDS", "4")
            .with("ACK_EXTENSION_SECONDS", "10")
            .with("BATCH_SIZE", "32")
    }

    fn log(&self, file: &str) -> PathBuf {
        self.fx.dir.join(&self.name).join(file)
    }

    /// Waits until worker log `file` says `job` succeeded, finished by its last shard's
    /// commit (`in_shard_commit`) or by a commit of its own.
    async fn logged_success(
        &self,
        file: &str,
        job: &str,
        in_shard_commit: bool,
    ) -> anyhow::Result<()> {
        let field = format!("\"in_shard_commit\":{in_shard_commit}");
        self.wait_log(file, &format!("{job} succeeded with {field}"), |l| {
            l.contains("job succeeded") && l.contains(job) && l.contains(&field)
        })
        .await
    }

    /// Waits until a line of worker log `file` satisfies `found`. A worker logs an event
    /// after the Firestore write that tests watch for, so the line may trail it a moment.
    async fn wait_log(
        &self,
        file: &str,
        what: &str,
        found: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        self.wait_log_for(file, what, Duration::from_secs(5), found)
            .await
    }

    /// [`World::wait_log`] with a time limit of its own.
    async fn wait_log_for(
        &self,
        file: &str,
        what: &str,
        limit: Duration,
        found: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let path = self.log(file);
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        stack::wait_for(what, limit, || async {
            read().lines().any(&found).then_some(())
        })
        .await
        .with_context(|| format!("{file}:\n{}", read()))
    }

    /// The lines of worker log `file` that say `job` succeeded.
    fn success_lines(&self, file: &str, job: &str) -> anyhow::Result<Vec<String>> {
        Ok(std::fs::read_to_string(self.log(file))?
            .lines()
            .filter(|l| l.contains("job succeeded") && l.contains(job))
            .map(str::to_owned)
            .collect())
    }

    fn jobs(&self) -> Jobs {
        Jobs {
            ps: self.ps.clone(),
            fs: self.fs.clone(),
            topology: self.t.clone(),
        }
    }

    /// Creates the job record as the edge does, then publishes its shard messages.
    async fn submit(&self, job_id: &str, shards: &[Vec<InputItem>]) -> anyhow::Result<()> {
        self.jobs().submit(job_id, shards).await
    }

    /// A queued chat message, as the edge creates and publishes it.
    async fn submit_chat(&self, job_id: &str, message: &str) -> anyhow::Result<()> {
        self.jobs().submit_chat(job_id, message).await
    }

    async fn create_record(
        &self,
        job_id: &str,
        total: u64,
        shards: u32,
        input_uri: Option<String>,
    ) -> anyhow::Result<()> {
        self.jobs()
            .create_record(
                job_id,
                JobKind::Batch,
                Task::Classify,
                total,
                shards,
                input_uri,
            )
            .await
    }

    /// Submits a one-shard `generate` batch job of `items` and waits for its first chunk.
    async fn generate_until_a_chunk(
        &self,
        job_id: &str,
        items: Vec<InputItem>,
    ) -> anyhow::Result<()> {
        self.jobs()
            .create_record(
                job_id,
                JobKind::Batch,
                Task::Generate,
                items.len() as u64,
                1,
                None,
            )
            .await?;
        self.publish(&JobMessage {
            job_id: job_id.into(),
            kind: JobKind::Batch,
            task: Task::Generate,
            shard: 0,
            shards: 1,
            items,
            input_uri: None,
            range: None,
            chat: None,
        })
        .await?;
        self.wait_shard(job_id, 0, Duration::from_secs(60), "a first chunk", |s| {
            s.cursor > 0
        })
        .await?;
        Ok(())
    }

    async fn publish(&self, m: &JobMessage) -> anyhow::Result<()> {
        self.jobs().publish(m).await
    }

    /// Sets `cancel_requested` on the job record, as the edge's `DELETE /v1/jobs/{id}` does.
    async fn request_cancel(&self, job_id: &str) -> anyhow::Result<()> {
        let (mut fields, ut) = self
            .fs
            .get(JOBS_COLLECTION, job_id)
            .await?
            .context("job record")?;
        fields["cancel_requested"] = json!({"booleanValue": true});
        self.fs
            .update_if(JOBS_COLLECTION, job_id, &ut, fields)
            .await?;
        Ok(())
    }

    async fn job(&self, job_id: &str) -> anyhow::Result<JobRecord> {
        self.jobs().job(job_id).await
    }

    async fn shard(&self, job_id: &str, shard: u32) -> anyhow::Result<Option<ShardRecord>> {
        Ok(
            match self
                .fs
                .get(SHARDS_COLLECTION, &ShardRecord::id(job_id, shard))
                .await?
            {
                Some((fields, _)) => Some(firestore::from_document(&json!({ "fields": fields }))?),
                None => None,
            },
        )
    }

    async fn wait_job(
        &self,
        job_id: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&JobRecord) -> bool,
    ) -> anyhow::Result<JobRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(job_id).await?;
            if done(&j) {
                return Ok(j);
            }
            // A job in a final state never changes again: say so now, not at the deadline.
            if j.status.is_final() {
                bail!("job {job_id}: {what} not reached, and the job ended; record: {j:?}");
            }
            if Instant::now() > deadline {
                bail!("job {job_id}: {what} not reached after {timeout:?}; record: {j:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_shard(
        &self,
        job_id: &str,
        shard: u32,
        timeout: Duration,
        what: &str,
        done: impl Fn(&ShardRecord) -> bool,
    ) -> anyhow::Result<ShardRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let record = match self.shard(job_id, shard).await? {
                Some(s) if done(&s) => return Ok(s),
                record => record,
            };
            if Instant::now() > deadline {
                bail!(
                    "shard {job_id}/{shard}: {what} not reached after {timeout:?}; record: {record:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A job given as the input file `file` (JSONL of `items`, in this scenario's folder),
    /// as the edge submits one: its record, then its plan message. The file's path and URI.
    async fn submit_input_file(
        &self,
        job_id: &str,
        file: &str,
        items: &[InputItem],
    ) -> anyhow::Result<(PathBuf, String)> {
        let input = self.fx.dir.join(&self.name).join(file);
        write_items(&input, items)?;
        let uri = format!("file://{}", input.display());
        self.create_record(job_id, 0, 0, Some(uri.clone())).await?;
        self.publish(&JobMessage::input_file(job_id, Task::Classify, &uri))
            .await?;
        Ok((input, uri))
    }

    /// Starts `cfg` again each time it stops (as the VM's service does) until `job_id` is
    /// failed; the number of starts and the failed record.
    async fn restart_until_failed(
        &self,
        cfg: &WorkerConfig,
        job_id: &str,
    ) -> anyhow::Result<(usize, JobRecord)> {
        let deadline = Instant::now() + 3 * REDELIVERY;
        let mut starts = 0;
        loop {
            let mut g = cfg.start(&self.log(&format!("{}-{starts}.log", cfg.worker_id)))?;
            starts += 1;
            // Run until it crashes or the job is failed.
            loop {
                if g.try_wait().is_some() {
                    break;
                }
                if self.job(job_id).await?.status == JobStatus::Failed || Instant::now() > deadline
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let job = self.job(job_id).await?;
            if job.status == JobStatus::Failed {
                return Ok((starts, job));
            }
            ensure!(
                Instant::now() < deadline,
                "{job_id} not failed after {starts} starts: {job:?}"
            );
        }
    }

    /// Waits for messages on the dead-letter subscription.
    async fn dead_letters(&self) -> anyhow::Result<Vec<stack::gcp::Received>> {
        stack::wait_for("dead letter", Duration::from_secs(20), || async {
            self.pull_dead_letters()
                .await
                .ok()
                .filter(|m| !m.is_empty())
        })
        .await
    }

    /// The messages on the dead-letter subscription now (none: an empty list).
    async fn pull_dead_letters(&self) -> anyhow::Result<Vec<stack::gcp::Received>> {
        self.ps
            .pull(&self.t.project, &self.t.dead_letter_subscription, 10)
            .await
    }

    /// The job's output files, in name order, and their text concatenated.
    fn output_text(&self, job_id: &str) -> anyhow::Result<(usize, String)> {
        let dir = self.out.join(job_id).join("output");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        let text = files
            .iter()
            .map(std::fs::read_to_string)
            .collect::<Result<_, _>>()?;
        Ok((files.len(), text))
    }

    /// Every output line of the job, in file order.
    fn output_lines(&self, job_id: &str) -> anyhow::Result<Vec<Value>> {
        let (_, text) = self.output_text(job_id)?;
        text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    /// Every output line of the job, by `custom_id`; fails on a duplicate.
    fn outputs(&self, job_id: &str) -> anyhow::Result<BTreeMap<String, Value>> {
        let mut lines = BTreeMap::new();
        for v in self.output_lines(job_id)? {
            let id = v["custom_id"].as_str().context("custom_id")?.to_owned();
            ensure!(
                lines.insert(id.clone(), v).is_none(),
                "custom_id {id} appears twice in the outputs of {job_id}"
            );
        }
        Ok(lines)
    }

    /// Lines written in all chunk objects (committed or not): the work done, redone included.
    fn chunk_lines(&self, job_id: &str) -> usize {
        let mut n = 0;
        let Ok(shards) = std::fs::read_dir(self.out.join(job_id).join("chunks")) else {
            return 0;
        };
        for s in shards.flatten() {
            for c in std::fs::read_dir(s.path()).into_iter().flatten().flatten() {
                n += std::fs::read_to_string(c.path())
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
            }
        }
        n
    }
}

/// `n` items over the intent test split, ids `{prefix}-{i}`.
fn items(prefix: &str, n: usize) -> Vec<InputItem> {
    let texts = common::test_split_texts();
    (0..n)
        .map(|i| InputItem {
            custom_id: format!("{prefix}-{i}"),
            input: texts[i % texts.len()].clone(),
        })
        .collect()
}

/// Writes `items` as JSONL.
fn write_items(path: &Path, items: &[InputItem]) -> anyhow::Result<()> {
    let body: String = items
        .iter()
        .map(|i| serde_json::to_string(i).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    std::fs::write(path, body)?;
    Ok(())
}

fn assert_exactly(outputs: &BTreeMap<String, Value>, items: &[InputItem]) -> anyhow::Result<()> {
    ensure!(
        outputs.len() == items.len(),
        "{} output lines for {} items",
        outputs.len(),
        items.len()
    );
    for i in items {
        ensure!(
            outputs.contains_key(&i.custom_id),
            "no output for {}",
            i.custom_id
        );
    }
    Ok(())
}

/// `batch-worker run --task classify` from `input` to `output`.
fn embedded_run(input: &Path, output: &Path) -> anyhow::Result<()> {
    let st = std::process::Command::new(BIN)
        .args(["run", "--task", "classify", "--device", "cpu", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .env("RUST_LOG", "error")
        .status()?;
    ensure!(st.success(), "embedded run failed: {st}");
    Ok(())
}

/// Plain job: three shards (one message published twice, as Pub/Sub may deliver it), an
/// `input_uri` job with malformed lines, metrics; outputs equal `batch-worker run`'s.
async fn outputs_once_and_equal_to_the_embedded_run(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "plain").await?;
    let metrics_port = stack::free_port()?;
    let _w1 = w
        .worker("w1")
        .with("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .start(&w.log("w1.log"))?;
    let all = items("a", 2500);
    let shards: Vec<Vec<InputItem>> = all.chunks(1000).map(<[InputItem]>::to_vec).collect();
    w.submit("job-a", &shards).await?;
    // A duplicate delivery of shard 1.
    w.publish(&JobMessage {
        job_id: "job-a".into(),
        kind: JobKind::Batch,
        task: Task::Classify,
        shard: 1,
        shards: 3,
        items: shards[1].clone(),
        input_uri: None,
        range: None,
        chat: None,
    })
    .await?;

    // An input_uri job: 300 lines, 3 malformed, 1 duplicate id.
    let file_items = items("f", 300);
    let mut text = String::new();
    for (i, it) in file_items.iter().enumerate() {
        match i {
            10 => text.push_str("{\"custom_id\": \"broken\n"),
            20 => text.push_str("not json at all\n"),
            30 => text.push_str("{\"custom_id\": \"f-30\"}\n"),
            40 => text.push_str(&format!(
                "{}\n",
                json!({"custom_id": "f-0", "input": "dup"})
            )),
            _ => text.push_str(&format!("{}\n", serde_json::to_string(it)?)),
        }
    }
    let input = w.fx.dir.join("plain").join("input.jsonl");
    std::fs::write(&input, &text)?;
    let uri = format!("file://{}", input.display());
    w.create_record("job-f", 0, 0, Some(uri.clone())).await?;
    w.publish(&JobMessage::input_file("job-f", Task::Classify, &uri))
        .await?;

    let a = w
        .wait_job("job-a", Duration::from_secs(60), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        a.counts
            == Counts {
                total: 2500,
                done: 2500,
                failed: 0
            },
        "counts {:?}",
        a.counts
    );
    ensure!(a.shards_done == 3, "shards_done {}", a.shards_done);
    let out_uri = a.output_uri.clone().unwrap_or_default();
    ensure!(
        out_uri == format!("file://{}/job-a/output/", w.out.display()),
        "output_uri {out_uri}"
    );
    let outputs = w.outputs("job-a")?;
    assert_exactly(&outputs, &all)?;

    // The same items through the embedded mode give the same lines.
    let emb_in = w.fx.dir.join("plain").join("a.jsonl");
    let emb_out = w.fx.dir.join("plain").join("a.out.jsonl");
    write_items(&emb_in, &all)?;
    embedded_run(&emb_in, &emb_out)?;
    for l in std::fs::read_to_string(&emb_out)?.lines() {
        let v: Value = serde_json::from_str(l)?;
        let id = v["custom_id"].as_str().unwrap_or_default();
        ensure!(outputs.get(id) == Some(&v), "serve and run differ for {id}");
    }

    let f = w
        .wait_job("job-f", Duration::from_secs(30), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        f.counts
            == Counts {
                total: 300,
                done: 300,
                failed: 4
            },
        "input_uri counts {:?}",
        f.counts
    );
    let fo = w.output_lines("job-f")?;
    ensure!(fo.len() == 300, "{} lines for 300 input lines", fo.len());
    for (i, id, code) in [
        (10, "11", "invalid_item"),
        (20, "21", "invalid_item"),
        (30, "f-30", "invalid_item"),
        (40, "f-0", "duplicate_custom_id"),
    ] {
        ensure!(
            fo[i]["custom_id"] == id && fo[i]["error"]["code"] == code,
            "line {}: {}",
            i + 1,
            fo[i]
        );
    }
    ensure!(fo[0]["output"]["intent"].is_string(), "line 1: {}", fo[0]);

    // The worker counts a shard just after the commit that finished the job.
    wait_metrics(
        &format!("http://127.0.0.1:{metrics_port}/metrics"),
        "2,800 items in 4 shards",
        |m| {
            m.contains("batch_worker_items_total 2800")
                && m.contains("batch_worker_shards_completed_total 4")
                && m.contains("batch_worker_inference_seconds_count")
        },
    )
    .await
}

/// Waits until the worker's metrics at `url` satisfy `ok`: a counter may move just after the
/// Firestore write that a test watched for.
async fn wait_metrics(url: &str, what: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let fetch = || async { reqwest::get(url).await.ok()?.text().await.ok() };
    let shown = stack::wait_for(what, Duration::from_secs(10), || async {
        fetch().await.filter(|m| ok(m)).map(drop)
    })
    .await;
    if let Err(e) = shown {
        bail!("{e}; metrics:\n{}", fetch().await.unwrap_or_default());
    }
    Ok(())
}

/// The value of counter `name` in Prometheus text `metrics`.
fn counter(metrics: &str, name: &str) -> anyhow::Result<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{name} in\n{metrics}"))
}

/// An `input_uri` file of 1,000 lines is cut into shards of 100 by the worker that takes the
/// job (its plan message is delivered twice: a redelivery after a crash plans again). That
/// worker is drained once it has committed a chunk, and a second worker finishes the shards. The
/// job's output files, in order, equal `batch-worker run`'s output on the same file byte for
/// byte: malformed lines, a duplicate id four shards away and a line over the 1 MiB limit (a
/// shard of its own, never read) included.
async fn input_file_is_shared_by_workers(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "input-shards").await?;
    let worker = |id: &str| {
        w.worker(id)
            .with("INPUT_SHARD_ITEMS", "100")
            .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=200")
    };
    let mut w1 = worker("w1").start(&w.log("w1.log"))?;
    let file_items = items("s", 1000);
    let mut text = String::new();
    for (i, it) in file_items.iter().enumerate() {
        match i {
            5 => text.push_str("{\"custom_id\": \"broken\n"),
            150 => text.push('\n'),
            420 => text.push_str(&format!(
                "{}\n",
                json!({"custom_id": "s-7", "input": "dup"})
            )),
            700 => text.push_str(&format!(
                "{}\n",
                json!({"custom_id": "long", "input": "x".repeat(shared::wire::MAX_LINE_BYTES)})
            )),
            999 => text.push_str(&serde_json::to_string(it)?),
            _ => text.push_str(&format!("{}\n", serde_json::to_string(it)?)),
        }
    }
    let dir = w.fx.dir.join("input-shards");
    let input = dir.join("input.jsonl");
    std::fs::write(&input, &text)?;
    let uri = format!("file://{}", input.display());
    w.create_record("job-s", 0, 0, Some(uri.clone())).await?;
    let plan = JobMessage::input_file("job-s", Task::Classify, &uri);
    w.publish(&plan).await?;
    w.publish(&plan).await?;
    w.wait_shard("job-s", 0, Duration::from_secs(60), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    w1.signal(libc::SIGTERM);
    let (status, _) = w1.wait_exit(Duration::from_secs(25)).await?;
    ensure!(status.success(), "drain exit status {status}");
    let _w2 = worker("w2").start(&w.log("w2.log"))?;

    let job = w
        .wait_job("job-s", Duration::from_secs(90), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    // 999 non-blank lines; three error lines (the broken one, the duplicate, the long one).
    ensure!(
        job.counts
            == Counts {
                total: 999,
                done: 999,
                failed: 3
            },
        "counts {:?}",
        job.counts
    );
    // Ranges of 100 items, but the one before the long line (line 701) ends early at 99: 6
    // full ones, 99, the long line alone, then 100, 100 and 99.
    ensure!(
        job.shards == 11 && job.shards_done == 11,
        "shards {} done {}",
        job.shards,
        job.shards_done
    );
    let taken = |log: &str| {
        std::fs::read_to_string(w.log(log)).map(|t| {
            t.lines()
                .filter(|l| l.contains("lease taken") && l.contains("job-s"))
                .count()
        })
    };
    let (by_w1, by_w2) = (taken("w1.log")?, taken("w2.log")?);
    eprintln!("input-shards: leases taken by w1 {by_w1}, by w2 {by_w2}");
    ensure!(
        by_w1 > 0 && by_w2 > 0,
        "both workers must have run shards: w1 {by_w1}, w2 {by_w2}"
    );
    ensure!(
        // Every line in one committed chunk: none written twice.
        w.chunk_lines("job-s") == 999,
        "a drain must redo nothing, chunks hold {} lines",
        w.chunk_lines("job-s")
    );

    let (files, served) = w.output_text("job-s")?;
    ensure!(files == 11, "{files} output files");
    let emb_out = dir.join("run.out.jsonl");
    embedded_run(&input, &emb_out)?;
    let run = std::fs::read_to_string(&emb_out)?;
    ensure!(
        run.lines().count() == 999,
        "run wrote {} lines",
        run.lines().count()
    );
    for (n, (a, b)) in served.lines().zip(run.lines()).enumerate() {
        ensure!(a == b, "output line {}: serve {a} / run {b}", n + 1);
    }
    ensure!(
        served == run,
        "serve wrote {} lines",
        served.lines().count()
    );
    ensure!(
        served.contains("line 421: custom_id already used earlier in the file"),
        "no duplicate error line"
    );
    ensure!(
        served.contains(r#"{"custom_id":"701","error":{"code":"line_too_long""#),
        "no error line for the long line"
    );
    Ok(())
}

/// The worker that plans an input file dies (abort) after the plan is on the job record and
/// before any shard is published. The plan message comes back to a restarted worker, which
/// plans the same shards again from the same bytes and publishes them: the job completes, its
/// output equal to `batch-worker run`'s byte for byte.
async fn plan_survives_a_crash_before_its_shards_are_published(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "plan-crash").await?;
    let mut w1 = w
        .worker("w1")
        .with("INPUT_SHARD_ITEMS", "100")
        .with("BATCH_WORKER_FAILPOINTS", "crash-after-plan=1")
        .start(&w.log("w1.log"))?;
    let (input, _) = w
        .submit_input_file("job-p", "input.jsonl", &items("p", 300))
        .await?;
    let (status, _) = w1.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        !status.success(),
        "the failpoint must abort the worker: {status}"
    );
    let planned = w.job("job-p").await?;
    ensure!(
        planned.shards == 3 && planned.counts.total == 300 && planned.status == JobStatus::Running,
        "the plan must be on the record: {planned:?}"
    );
    ensure!(
        w.shard("job-p", 0).await?.is_none(),
        "no shard may have started before the crash"
    );
    // The same worker restarted without the failpoint (the VM's service restarting it),
    // whose next plan fails with a transient error (as a Pub/Sub outage would make it): an
    // error is not a crash, so with the crash before it does not reach the poison limit.
    let _w1 = w
        .worker("w1")
        .with("INPUT_SHARD_ITEMS", "100")
        .with("POISON_LIMIT", "2")
        .with("BATCH_WORKER_FAILPOINTS", "plan-errors=1")
        .start(&w.log("w1b.log"))?;
    let job = w
        .wait_job("job-p", REDELIVERY, "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        job.shards_done == 3 && job.counts.done == 300 && job.counts.failed == 0,
        "{job:?}"
    );
    ensure!(
        job.plan_started.len() == 3 && job.plan_ended.len() == 2 && job.plan_crashes() == 1,
        "one crashed, one failed and one finished plan attempt: {job:?}"
    );
    let run_out = input.with_file_name("run.out.jsonl");
    embedded_run(&input, &run_out)?;
    let (files, served) = w.output_text("job-p")?;
    ensure!(
        files == 3 && served == std::fs::read_to_string(&run_out)?,
        "serve's output ({files} files) differs from run's"
    );
    Ok(())
}

/// SIGTERM while a worker plans a large input file: the read stops between two pieces, the
/// worker exits 0 well inside the drain budget with nothing planned, the attempt is recorded
/// as finished (so it never counts towards the poison limit), and another worker plans and
/// runs the job. Both workers send each plan-attempt commit twice, as after a lost answer:
/// each attempt still counts once.
async fn drain_while_planning_gives_the_plan_back(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "plan-drain").await?;
    let dir = w.fx.dir.join("plan-drain");
    let input = dir.join("input.jsonl");
    let all = items("d", 2000);
    write_items(&input, &all)?;
    let uri = format!("file://{}", input.display());
    w.create_record("job-d", 0, 0, Some(uri.clone())).await?;
    // Each piece of the file (8 KiB here) takes 500 ms to plan: about 7 s in all.
    let mut w1 = w
        .worker("w1")
        .with("INPUT_SHARD_ITEMS", "1000")
        .with(
            "BATCH_WORKER_FAILPOINTS",
            "plan-delay-ms=500;lose-plan-answers=1",
        )
        .start(&w.log("w1.log"))?;
    w.publish(&JobMessage::input_file("job-d", Task::Classify, &uri))
        .await?;
    stack::wait_for("a plan attempt", Duration::from_secs(30), || async {
        let job = w.job("job-d").await.ok()?;
        (job.plan_started.len() == 1).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    w1.signal(libc::SIGTERM);
    let (status, took) = w1.wait_exit(Duration::from_secs(25)).await?;
    ensure!(status.success(), "drain exit status {status}");
    ensure!(
        took < Duration::from_secs(5),
        "a drain must stop planning between pieces; took {took:?}"
    );
    let drained = w.job("job-d").await?;
    ensure!(
        drained.status == JobStatus::Queued
            && drained.shards == 0
            && drained.plan_started.len() == 1
            && drained.plan_crashes() == 0,
        "after the drain: {drained:?}"
    );
    let _w2 = w
        .worker("w2")
        .with("INPUT_SHARD_ITEMS", "1000")
        .with("BATCH_WORKER_FAILPOINTS", "lose-plan-answers=1")
        .start(&w.log("w2.log"))?;
    let job = w
        .wait_job("job-d", REDELIVERY, "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        job.shards == 2
            && job.counts.done == 2000
            && job.plan_started.len() == 2
            && job.plan_ended.len() == 2
            && job.plan_crashes() == 0,
        "{job:?}"
    );
    assert_exactly(&w.outputs("job-d")?, &all)?;
    Ok(())
}

/// An input file whose planning stops the worker every time (here a failpoint; in production
/// too little memory or a bug) ends like a poison shard: after `POISON_LIMIT` crashed plan
/// attempts its message is on the dead-letter topic and the job is failed with the reason,
/// instead of staying `queued` while the subscription redelivers it.
async fn plan_that_crashes_every_time_is_dead_lettered(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "plan-poison").await?;
    let cfg = w
        .worker("w1")
        .with("POISON_LIMIT", "2")
        .with("BATCH_WORKER_FAILPOINTS", "crash-while-planning=1");
    w.submit_input_file("job-z", "input.jsonl", &items("z", 50))
        .await?;
    let (starts, failed) = w.restart_until_failed(&cfg, "job-z").await?;
    ensure!(
        starts == 3,
        "expected 2 crashed plans then a quarantine, saw {starts} starts"
    );
    ensure!(
        failed.plan_started.len() == 2 && failed.plan_ended.is_empty() && failed.shards == 0,
        "a crashed plan must leave no plan behind: {failed:?}"
    );
    let err = failed.error.context("failed job without error")?;
    ensure!(
        err.code == "plan_failed" && err.message.contains("2 times"),
        "error {err:?}"
    );
    let dead = w.dead_letters().await?;
    let msg: JobMessage = serde_json::from_slice(&dead[0].data)?;
    ensure!(
        msg.job_id == "job-z" && msg.range.is_none(),
        "dead letter {msg:?}"
    );
    Ok(())
}

/// Without `CHAT_SUBSCRIPTION` chat messages come on the jobs subscription like any job (every
/// other scenario publishes them to a chat topic that only the chat subscription reads). A
/// chat subscription that does not exist stops the worker as a jobs subscription that does
/// not exist does, naming it.
async fn chat_without_its_own_subscription_comes_with_the_jobs(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::without_chat_subscription(fx, "chat-on-jobs").await?;
    ensure!(w.t.chat_topic == w.t.topic);
    let mut w1 = w
        .worker("w1")
        .with("MAX_NEW_TOKENS", "8")
        .start(&w.log("w1.log"))?;
    w.submit_chat("chat-1", "김밥집 추천해줘").await?;
    let done = w
        .wait_job("chat-1", Duration::from_secs(60), "succeeded", |j| {
            j.status.is_final()
        })
        .await?;
    ensure!(done.status == JobStatus::Succeeded, "chat job: {done:?}");
    ensure!(
        done.result.as_ref().is_some_and(|r| r["reply"].is_string()),
        "{done:?}"
    );
    let status = w1.stop(Duration::from_secs(20));
    ensure!(
        status.is_some_and(|s| s.success()),
        "the worker exits 0 on SIGTERM: {status:?}\n{}",
        w1.log_tail(20)
    );

    let mut w2 = w
        .worker("w2")
        .with("CHAT_SUBSCRIPTION", "no-such-chat")
        .start(&w.log("w2.log"))?;
    let exited = stack::wait_for(
        "the exit of a worker without its chat subscription",
        Duration::from_secs(30),
        || std::future::ready(w2.try_wait()),
    )
    .await;
    let status = exited.map_err(|e| e.context(w2.log_tail(20)))?;
    let tail = w2.log_tail(5);
    ensure!(
        status.code() == Some(1) && tail.contains("subscriptions/no-such-chat"),
        "{status:?}\n{tail}"
    );
    Ok(())
}

/// Text generation through serve: a queued chat message gets its reply in the job record,
/// a `generate` batch drained mid-way (SIGTERM while a micro-batch decodes) is finished by
/// another worker; outputs equal `batch-worker run --task generate` and nothing committed
/// is redone.
async fn generation_answers_chat_and_batches(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "generate").await?;
    let gen_worker = |id: &str| {
        w.worker(id)
            // Long enough for some texts to stop before their budget, so rows of one
            // micro-batch finish at different steps.
            .with("MAX_NEW_TOKENS", "64")
            .with("GENERATE_BATCH_SIZE", "4")
            // Slow steps, as a large model's: the drain lands mid-shard.
            .with("BATCH_WORKER_FAILPOINTS", "generate-step-delay-ms=5")
            .with("GENERATE_GATHER_MS", "300")
    };
    let w1_port = stack::free_port()?;
    let mut w1 = gen_worker("w1")
        .with("METRICS_ADDR", format!("127.0.0.1:{w1_port}"))
        .start(&w.log("w1.log"))?;

    // A queued chat message, as the edge publishes it.
    let message = "근처에서 급식카드로 먹을 수 있는 김밥집 추천해줘";
    w.submit_chat("chat-1", message).await?;
    let done = w
        .wait_job("chat-1", Duration::from_secs(60), "succeeded", |j| {
            j.status.is_final()
        })
        .await?;
    ensure!(done.status == JobStatus::Succeeded, "chat job: {done:?}");
    // The commit that finished the chat message's only shard finished the job too.
    w.logged_success("w1.log", "chat-1", true).await?;
    // The whole reply took four Firestore operations: read the job and the shard, take the
    // lease, and the last commit (the job is not read again before it).
    let w1_metrics = reqwest::get(format!("http://127.0.0.1:{w1_port}/metrics"))
        .await?
        .text()
        .await?;
    let ops = counter(&w1_metrics, "batch_worker_firestore_operations_total")?;
    ensure!(
        ops == 4,
        "the chat reply took {ops} Firestore operations, not 4"
    );
    // Its wait, from publish to ack, is in the chat histogram (the ack follows the commit).
    let deadline = Instant::now() + Duration::from_secs(5);
    let (count, sum) = loop {
        let m = reqwest::get(format!("http://127.0.0.1:{w1_port}/metrics"))
            .await?
            .text()
            .await?;
        let count = counter(&m, "batch_worker_chat_reply_seconds_count")?;
        let sum: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("batch_worker_chat_reply_seconds_sum "))
            .and_then(|v| v.trim().parse().ok())
            .context("batch_worker_chat_reply_seconds_sum")?;
        if count > 0 || Instant::now() > deadline {
            break (count, sum);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        count == 1 && sum > 0.0 && sum < 60.0,
        "chat reply histogram: count {count}, sum {sum} s"
    );
    let reply = done
        .result
        .as_ref()
        .and_then(|r| r["reply"].as_str())
        .context("result.reply")?
        .to_owned();

    // A generate batch, drained mid-way.
    let all: Vec<InputItem> = common::test_split_texts()
        .into_iter()
        .take(40)
        .enumerate()
        .map(|(i, t)| InputItem {
            custom_id: format!("g-{i}"),
            input: t,
        })
        .collect();
    w.generate_until_a_chunk("gen-1", all.clone()).await?;
    w1.signal(libc::SIGTERM);
    let (status, took) = w1.wait_exit(Duration::from_secs(25)).await?;
    ensure!(
        status.success() && took < Duration::from_secs(20),
        "drain: {status} in {took:?}"
    );
    let s = w.shard("gen-1", 0).await?.context("shard")?;
    ensure!(s.drains == 1 && s.cursor < 40, "after the drain: {s:?}");
    eprintln!(
        "generate: drained in {} ms at item {}",
        took.as_millis(),
        s.cursor
    );
    let metrics_port = stack::free_port()?;
    let _w2 = gen_worker("w2")
        .with("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .start(&w.log("w2.log"))?;
    w.wait_job("gen-1", Duration::from_secs(90), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    // The shard hands over its next micro-batch while one decodes, so items of the next
    // take the rows that finished early instead of waiting for the longest text.
    let merged = |metrics: &str| counter(metrics, "batch_worker_generate_merged_total");
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let bulk = reqwest::get(&metrics_url).await?.text().await?;
    ensure!(
        merged(&bulk)? >= 1,
        "no item of the shard joined rows already decoding:\n{bulk}"
    );

    // Concurrent chat messages share a decoding batch.
    let burst = [
        "떡볶이 먹고 싶어",
        "Where can I eat noodles with my meal card?",
        "오늘 저녁 뭐 먹을까",
        "김밥집 어디 있어?",
    ];
    for (i, m) in burst.iter().enumerate() {
        w.submit_chat(&format!("chat-m{i}"), m).await?;
    }
    let mut burst_replies = Vec::new();
    for i in 0..burst.len() {
        let j = w
            .wait_job(
                &format!("chat-m{i}"),
                Duration::from_secs(60),
                "final",
                |j| j.status.is_final(),
            )
            .await?;
        ensure!(j.status == JobStatus::Succeeded, "chat-m{i}: {j:?}");
        burst_replies.push(j.result.context("result")?["reply"].clone());
    }
    let metrics = reqwest::get(&metrics_url).await?.text().await?;
    ensure!(
        merged(&metrics)? > merged(&bulk)?,
        "no batch joined concurrent chat messages:\n{metrics}"
    );
    let outputs = w.outputs("gen-1")?;
    assert_exactly(&outputs, &all)?;
    ensure!(
        w.chunk_lines("gen-1") == 40,
        "a drain redoes nothing: {} lines",
        w.chunk_lines("gen-1")
    );

    // The embedded run over the same items (and the chat message) gives the same text.
    let dir = fx.dir.join("generate");
    let input = dir.join("in.jsonl");
    let mut lines: Vec<String> = all
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    lines.push(json!({"custom_id": "chat", "input": message}).to_string());
    for (i, m) in burst.iter().enumerate() {
        lines.push(json!({"custom_id": format!("m{i}"), "input": m}).to_string());
    }
    std::fs::write(&input, lines.join("\n") + "\n")?;
    let output = dir.join("embedded.jsonl");
    let run = std::process::Command::new(BIN)
        .args([
            "run",
            "--task",
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "64",
            "--input",
        ])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .env("RUST_LOG", "error")
        .output()?;
    ensure!(
        run.status.success(),
        "embedded run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut embedded = BTreeMap::new();
    for l in std::fs::read_to_string(&output)?.lines() {
        let v: Value = serde_json::from_str(l)?;
        embedded.insert(v["custom_id"].as_str().unwrap_or_default().to_owned(), v);
    }
    ensure!(
        embedded["chat"]["output"]["text"] == reply.as_str(),
        "chat reply {reply:?} vs {}",
        embedded["chat"]
    );
    for (i, r) in burst_replies.iter().enumerate() {
        ensure!(
            embedded[&format!("m{i}")]["output"]["text"] == *r,
            "chat-m{i}: a shared batch changed the reply: {r} vs {}",
            embedded[&format!("m{i}")]
        );
    }
    for (id, v) in &outputs {
        ensure!(
            embedded.get(id) == Some(v),
            "{id}: serve {v} vs run {:?}",
            embedded.get(id)
        );
    }

    // A cancelled generate job: the micro-batch its shard had handed over stops decoding at
    // once (its rows leave the batch), and the worker answers the next chat message.
    let many: Vec<InputItem> = all
        .iter()
        .cycle()
        .take(400)
        .enumerate()
        .map(|(i, item)| InputItem {
            custom_id: format!("c-{i}"),
            input: item.input.clone(),
        })
        .collect();
    w.generate_until_a_chunk("gen-c", many).await?;
    w.request_cancel("gen-c").await?;
    w.wait_job("gen-c", Duration::from_secs(20), "cancelled", |j| {
        j.status == JobStatus::Cancelled
    })
    .await?;
    wait_metrics(
        &metrics_url,
        "a row of the cancelled shard leaving the batch",
        |m| counter(m, "batch_worker_generate_abandoned_total").is_ok_and(|n| n >= 1),
    )
    .await?;
    w.submit_chat("chat-after", burst[0]).await?;
    let j = w
        .wait_job("chat-after", Duration::from_secs(30), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        j.result.as_ref().map(|r| &r["reply"]) == Some(&burst_replies[0]),
        "chat after the cancel: {j:?}"
    );
    Ok(())
}

/// SIGKILL mid-shard, restart: every item once; the redo is at most about one chunk.
async fn sigkill_then_restart_loses_nothing(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "sigkill").await?;
    let cfg = w
        .worker("w1")
        .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=40");
    let mut w1 = cfg.start(&w.log("w1-a.log"))?;
    let all = items("k", 3000);
    w.submit("job-k", std::slice::from_ref(&all)).await?;
    w.wait_shard("job-k", 0, Duration::from_secs(30), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w1.signal(libc::SIGKILL);
    w1.wait_exit(Duration::from_secs(5)).await?;
    let at_kill = w.shard("job-k", 0).await?.context("shard")?;
    ensure!(at_kill.cursor < 3000, "finished before the kill");
    let restarted = Instant::now();
    let _w1 = cfg.start(&w.log("w1-b.log"))?;
    w.wait_shard(
        "job-k",
        0,
        Duration::from_secs(40),
        "a commit after restart",
        |s| s.epoch == 2 && s.cursor > at_kill.cursor,
    )
    .await?;
    let first_commit = restarted.elapsed();
    let j = w
        .wait_job("job-k", Duration::from_secs(60), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(j.counts.done == 3000, "counts {:?}", j.counts);
    assert_exactly(&w.outputs("job-k")?, &all)?;
    // Work lost to the kill is what ran after the last checkpoint: under one 0.3 s chunk
    // (about 240 items at this speed), plus a chunk written but not yet checkpointed.
    let rewritten = w.chunk_lines("job-k") - 3000;
    let log = std::fs::read_to_string(w.log("w1-b.log"))?;
    ensure!(
        log.contains(&format!("\"cursor\":{},", at_kill.cursor)),
        "the restart did not resume at the checkpoint {}:\n{log}",
        at_kill.cursor
    );
    eprintln!(
        "sigkill: resumed at checkpoint {} of 3000, {rewritten} items in chunks written twice, first commit {:.1} s after restart",
        at_kill.cursor,
        first_commit.as_secs_f64()
    );
    ensure!(rewritten <= 300, "rewrote {rewritten} items");
    Ok(())
}

/// SIGTERM: the drain ends inside 20 s with exit 0, and another worker resumes from the
/// checkpoint.
async fn sigterm_drains_and_another_worker_resumes(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "sigterm").await?;
    let slow = |id: &str| {
        w.worker(id)
            .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=40")
    };
    let mut w1 = slow("w1").start(&w.log("w1.log"))?;
    let all = items("d", 3000);
    w.submit("job-d", std::slice::from_ref(&all)).await?;
    w.wait_shard("job-d", 0, Duration::from_secs(30), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    w1.signal(libc::SIGTERM);
    let (status, took) = w1.wait_exit(Duration::from_secs(25)).await?;
    ensure!(status.success(), "drain exit status {status}");
    ensure!(took < Duration::from_secs(20), "drain took {took:?}");
    let s = w.shard("job-d", 0).await?.context("shard")?;
    ensure!(
        s.drains == 1 && s.owner.is_empty() && s.cursor > 0 && s.cursor < 3000,
        "after the drain: {s:?}"
    );
    eprintln!(
        "sigterm: drained in {} ms at cursor {}",
        took.as_millis(),
        s.cursor
    );
    let _w2 = slow("w2").start(&w.log("w2.log"))?;
    w.wait_job("job-d", Duration::from_secs(60), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    assert_exactly(&w.outputs("job-d")?, &all)?;
    ensure!(
        w.chunk_lines("job-d") == 3000,
        "a drain must redo nothing, chunks hold {} lines",
        w.chunk_lines("job-d")
    );
    let end = w.shard("job-d", 0).await?.context("shard")?;
    ensure!(
        end.deliveries == 2 && end.drains == 1,
        "the drain must be recorded (and so not count toward the poison limit): {end:?}"
    );
    Ok(())
}

/// Pub/Sub's own delivery limit counts drains: a shard drained as often as the limit (5,
/// Pub/Sub's least) is moved to the dead-letter topic by Pub/Sub itself. The worker's
/// dead-letter watch puts it back on the jobs topic, since preemptions are not failures, and
/// the job completes with every item once; a chat message goes back to the chat topic.
async fn drained_past_pubsubs_limit_is_requeued(fx: &Fixture) -> anyhow::Result<()> {
    const LIMIT: u32 = 5;
    let w = World::with_delivery_limit(fx, "requeue", LIMIT).await?;
    let all = items("q", 3000);
    w.submit("job-q", std::slice::from_ref(&all)).await?;
    // Workers without the watch, each drained once it holds the shard, until Pub/Sub gives up
    // on the message. (The emulator may also count a delivery to a stream that has closed, so
    // the number of drains that takes is not fixed.)
    let mut letters = Vec::new();
    for n in 1.. {
        ensure!(n <= LIMIT + 1, "no dead letter after {LIMIT} drains");
        let mut g = w
            .worker(&format!("w{n}"))
            .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=40")
            .with("DEAD_LETTER_SUBSCRIPTION", "")
            .start(&w.log(&format!("w{n}.log")))?;
        let before = w.shard("job-q", 0).await?.map_or(0, |s| s.deliveries);
        let deadline = Instant::now() + REDELIVERY;
        let leased = loop {
            letters = w.pull_dead_letters().await?;
            if !letters.is_empty() {
                break false;
            }
            if w.shard("job-q", 0)
                .await?
                .is_some_and(|s| s.deliveries > before && !s.owner.is_empty())
            {
                break true;
            }
            ensure!(
                Instant::now() < deadline,
                "w{n}: neither a delivery nor a dead letter in {REDELIVERY:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        g.signal(libc::SIGTERM);
        let (status, _) = g.wait_exit(Duration::from_secs(25)).await?;
        ensure!(status.success(), "drain {n} exit status {status}");
        if !leased {
            break;
        }
    }
    ensure!(
        letters.len() == 1
            && letters[0]
                .attributes
                .get("CloudPubSubDeadLetterSourceDeliveryCount")
                .and_then(Value::as_str)
                == Some("5"),
        "Pub/Sub itself must have dead-lettered the shard after {LIMIT} deliveries: {letters:?}"
    );
    let s = w.shard("job-q", 0).await?.context("shard")?;
    ensure!(
        s.drains == s.deliveries && s.drains > 0 && s.cursor < 3000,
        "every delivery so far drained: {s:?}"
    );
    ensure!(
        w.job("job-q").await?.status == JobStatus::Running,
        "the job must still be running"
    );
    let _last = w
        .worker("w-last")
        .with("MAX_NEW_TOKENS", "8")
        .start(&w.log("w-last.log"))?;
    w.wait_job("job-q", REDELIVERY, "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    assert_exactly(&w.outputs("job-q")?, &all)?;
    w.wait_log("w-last.log", "the requeue", |l| {
        l.contains("requeued it on the jobs topic") && l.contains("\"requeues\":1")
    })
    .await?;
    let end = w.shard("job-q", 0).await?.context("shard")?;
    ensure!(
        end.drains == s.drains && end.deliveries == s.deliveries + 1,
        "the requeued message is the shard's next delivery: {end:?}"
    );

    // A chat message Pub/Sub dead-lettered goes back to the chat topic, whose subscription
    // has its own flow control, and is answered.
    w.jobs()
        .create_record("chat-q", JobKind::Chat, Task::Generate, 1, 1, None)
        .await?;
    let chat = JobMessage::chat(
        "chat-q",
        ChatRequest {
            message: "안녕".into(),
            locale: "ko".into(),
        },
    );
    w.ps.publish(
        &w.t.project,
        &w.t.dead_letter_topic,
        &serde_json::to_vec(&chat)?,
        &[
            ("job_id", "chat-q"),
            ("CloudPubSubDeadLetterSourceDeliveryCount", "15"),
        ],
    )
    .await?;
    let answered = w
        .wait_job("chat-q", Duration::from_secs(60), "answered", |j| {
            j.status.is_final()
        })
        .await?;
    ensure!(
        answered.status == JobStatus::Succeeded
            && answered
                .result
                .as_ref()
                .is_some_and(|r| r["reply"].is_string()),
        "the requeued chat message must be answered: {answered:?}"
    );
    w.wait_log("w-last.log", "the chat message's requeue", |l| {
        l.contains("requeued it on the chat topic") && l.contains("chat-q")
    })
    .await?;

    // A message on its eleventh round through the dead-letter topic is not requeued again:
    // its job fails with the reason.
    let few = items("r", 3);
    w.create_record("job-r", 3, 1, None).await?;
    let m = JobMessage {
        job_id: "job-r".into(),
        kind: JobKind::Batch,
        task: Task::Classify,
        shard: 0,
        shards: 1,
        items: few,
        input_uri: None,
        range: None,
        chat: None,
    };
    // So is an input file's plan message, whose job fails with `plan_failed`.
    let uri = format!("file://{}", w.log("never-read.jsonl").display());
    w.create_record("job-p", 0, 0, Some(uri.clone())).await?;
    let plan = JobMessage::input_file("job-p", Task::Classify, &uri);
    for (job, m) in [("job-r", &m), ("job-p", &plan)] {
        w.ps.publish(
            &w.t.project,
            &w.t.dead_letter_topic,
            &serde_json::to_vec(m)?,
            &[
                ("job_id", job),
                ("CloudPubSubDeadLetterSourceDeliveryCount", "5"),
                ("requeues", "10"),
            ],
        )
        .await?;
    }
    for (job, code, what) in [
        ("job-r", "shard_failed", "shard 0 of job job-r"),
        ("job-p", "plan_failed", "the plan of job job-p's input file"),
    ] {
        let failed = w
            .wait_job(job, Duration::from_secs(20), "failed", |j| {
                j.status == JobStatus::Failed
            })
            .await?;
        let error = failed.error.context("the failed job's error")?;
        ensure!(
            error.code == code
                && error.message
                    == format!(
                        "Pub/Sub moved {what} to the dead-letter topic: 5 deliveries did not finish it, and it was requeued 10 times already"
                    ),
            "{error:?}"
        );
    }
    Ok(())
}

/// A dead-letter watch subscription that cannot be read is reported, and the worker goes on
/// with its jobs.
async fn missing_watch_subscription_is_reported(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "no-watch").await?;
    let _g = w
        .worker("w1")
        .with("DEAD_LETTER_SUBSCRIPTION", "no-such-watch")
        .start(&w.log("w1.log"))?;
    let all = items("n", 50);
    w.submit("job-n", std::slice::from_ref(&all)).await?;
    w.wait_job("job-n", Duration::from_secs(30), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    assert_exactly(&w.outputs("job-n")?, &all)?;
    w.wait_log("w1.log", "the watch's error", |l| {
        l.contains("\"level\":\"ERROR\"")
            && l.contains("cannot read the dead-letter watch subscription")
            && l.contains("no-such-watch")
    })
    .await
}

/// Worker 1 stalls past its ack deadline and lease (SIGSTOP): the message is redelivered,
/// worker 2 takes the shard; worker 1 wakes and cannot commit. One output per item.
async fn fencing_stops_the_worker_that_lost_its_lease(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "fencing").await?;
    let slow = |id: &str| {
        w.worker(id)
            .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=40")
    };
    let w1 = slow("w1").start(&w.log("w1.log"))?;
    let all = items("x", 4000);
    w.submit("job-x", std::slice::from_ref(&all)).await?;
    w.wait_shard("job-x", 0, Duration::from_secs(30), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    w1.signal(libc::SIGSTOP);
    let _w2 = slow("w2").start(&w.log("w2.log"))?;
    // The epoch stays 2 from w2's take-over on (w1 is stopped and cannot take it back), while
    // `owner` is cleared again when w2 completes the shard, a few seconds later. The emulator
    // redelivers the expired message about every 10 s to either open stream, and w1's stopped
    // one takes it into its socket buffer as readily as w2's: one run saw six deliveries to w1
    // and none to w2 in 60 s. 180 s leaves room for ~18 such draws.
    let taken = w
        .wait_shard(
            "job-x",
            0,
            Duration::from_secs(180),
            "take-over by w2",
            |s| s.epoch >= 2,
        )
        .await;
    w1.signal(libc::SIGCONT);
    let taken = taken?;
    ensure!(
        taken.epoch == 2 && (taken.owner == "w2" || taken.owner.is_empty()),
        "take-over {taken:?}"
    );
    w.wait_job("job-x", Duration::from_secs(60), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    assert_exactly(&w.outputs("job-x")?, &all)?;
    w.wait_log("w1.log", "w1 noticed its lost lease", |l| {
        l.contains("lease lost")
    })
    .await?;
    let log2 = std::fs::read_to_string(w.log("w2.log"))?;
    ensure!(
        log2.contains("lease taken"),
        "w2 never took the lease:\n{log2}"
    );
    Ok(())
}

/// A worker whose lease was taken while it waited to mark its shard done writes its last
/// chunk under its own epoch, nobody lists it, and it leaves the output file alone: the file
/// is written only from a done shard's listed chunks.
async fn stale_worker_leaves_the_output_file_alone(fx: &Fixture) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let w = World::new(fx, "stale-finish").await?;
    let w1 = w
        .worker("w1")
        .with("BATCH_WORKER_FAILPOINTS", "finish-delay-ms=5000")
        .start(&w.log("w1.log"))?;
    let all = items("z", 200);
    let shard = JobMessage {
        job_id: "job-z".into(),
        kind: JobKind::Batch,
        task: Task::Classify,
        shard: 0,
        shards: 1,
        items: all.clone(),
        input_uri: None,
        range: None,
        chat: None,
    };
    w.create_record("job-z", 200, 1, None).await?;
    w.publish(&shard).await?;
    w.wait_log_for(
        "w1.log",
        "w1 before its last commit",
        Duration::from_secs(30),
        |l| l.contains("failpoint finish-delay"),
    )
    .await?;
    // Stopped before its last commit (it waits 5 s there, then writes its last chunk), w1
    // neither extends its message's ack deadline nor pulls another. w2, on a subscription of
    // its own, gets a copy of the shard's message (as a redelivery would hand it over), waits
    // out w1's 4 s lease, takes it and completes the shard.
    w1.signal(libc::SIGSTOP);
    let own = format!("{}-w2", w.t.subscription);
    w.ps.create_jobs_subscription(&w.t, &own).await?;
    w.publish(&shard).await?;
    let mut cfg = w.worker("w2");
    cfg.topology.subscription = own;
    let _w2 = cfg.start(&w.log("w2.log"))?;
    let done = w
        .wait_job("job-z", Duration::from_secs(60), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await;
    w1.signal(libc::SIGCONT);
    done?;
    let file = w.out.join("job-z/output/shard-00000.jsonl");
    let written = std::fs::metadata(&file)?.ino();
    w.wait_log("w1.log", "w1 noticed its lost lease", |l| {
        l.contains("lease lost") && l.contains("last chunk is discarded")
    })
    .await?;
    ensure!(
        w.out
            .join("job-z/chunks/shard-00000/0000000000-e1.jsonl")
            .exists(),
        "w1 wrote no last chunk of its own"
    );
    ensure!(
        std::fs::metadata(&file)?.ino() == written,
        "the worker that lost its lease wrote the output file again"
    );
    assert_exactly(&w.outputs("job-z")?, &all)?;
    let s = w.shard("job-z", 0).await?.context("shard")?;
    ensure!(
        s.epoch == 2 && s.chunks == ["job-z/chunks/shard-00000/0000000000-e2.jsonl"],
        "shard {s:?}"
    );
    Ok(())
}

/// A worker stopped between a done shard's output file and its count on the job: the job is
/// not succeeded meanwhile, and the next delivery counts the shard once and finishes it.
async fn crash_before_publish_is_repaired(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "publish").await?;
    let mut w1 = w
        .worker("w1")
        .with("BATCH_WORKER_FAILPOINTS", "crash-before-publish=1")
        .start(&w.log("w1.log"))?;
    let all = items("p", 300);
    w.submit("job-p", std::slice::from_ref(&all)).await?;
    w1.wait_exit(Duration::from_secs(30)).await?;
    let s = w.shard("job-p", 0).await?.context("shard")?;
    ensure!(s.state == ShardState::Done && s.unpublished, "shard {s:?}");
    let j = w.job("job-p").await?;
    ensure!(
        j.status == JobStatus::Running && j.shards_done == 0 && j.counts.done == 300,
        "before its shard is published: {j:?}"
    );
    let _w2 = w.worker("w2").start(&w.log("w2.log"))?;
    let j = w
        .wait_job("job-p", Duration::from_secs(40), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        j.shards_done == 1 && j.counts.done == 300 && j.counts.failed == 0,
        "after: {j:?}"
    );
    let s = w.shard("job-p", 0).await?.context("shard")?;
    ensure!(!s.unpublished, "shard {s:?}");
    assert_exactly(&w.outputs("job-p")?, &all)?;
    // Published by a later delivery, the job is finished by a commit of its own.
    w.logged_success("w2.log", "job-p", false).await
}

/// A lease commit that landed but whose answer was lost is sent again and refused: the worker
/// tells its own lease by its token and runs the shard at once, with no second take-over and
/// no crash counted.
async fn lease_commit_sent_twice_is_still_ours(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "lease-twice").await?;
    let _w1 = w
        .worker("w1")
        .with("BATCH_WORKER_FAILPOINTS", "lose-lease-answer=1")
        .start(&w.log("w1.log"))?;
    let all = items("t", 100);
    w.submit("job-t", std::slice::from_ref(&all)).await?;
    w.wait_job("job-t", Duration::from_secs(30), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    let s = w.shard("job-t", 0).await?.context("shard")?;
    ensure!(
        s.epoch == 1 && s.deliveries == 1,
        "one lease, taken once: {s:?}"
    );
    assert_exactly(&w.outputs("job-t")?, &all)?;
    w.wait_log("w1.log", "w1 knew its lease", |l| {
        l.contains("sent again after it had landed")
    })
    .await?;
    // The job's only shard finished it in the commit that published its output file.
    w.logged_success("w1.log", "job-t", true).await
}

/// A batch job of one shard done in one chunk takes six Firestore operations: read the job
/// and the shard, take the lease, read the job at the last chunk boundary, the last commit,
/// and the commit that publishes the output file and finishes the job.
async fn one_shard_batch_finishes_as_it_publishes(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "one-shard").await?;
    let port = stack::free_port()?;
    let _w1 = w
        .worker("w1")
        .with("METRICS_ADDR", format!("127.0.0.1:{port}"))
        .start(&w.log("w1.log"))?;
    let all = items("o", 20);
    w.submit("job-o", std::slice::from_ref(&all)).await?;
    let j = w
        .wait_job("job-o", Duration::from_secs(30), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(
        j.shards_done == 1 && j.counts.done == 20 && j.output_uri.is_some(),
        "{j:?}"
    );
    assert_exactly(&w.outputs("job-o")?, &all)?;
    w.logged_success("w1.log", "job-o", true).await?;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let ops = counter(&metrics, "batch_worker_firestore_operations_total")?;
    ensure!(ops == 6, "the job took {ops} Firestore operations, not 6");
    Ok(())
}

/// A shard that crashes the worker every time: after POISON_LIMIT crashes its message is in
/// the dead-letter topic and the job failed with a reason; another job still succeeds.
async fn poison_shard_is_dead_lettered(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "poison").await?;
    let cfg = w
        .worker("w1")
        .with("POISON_LIMIT", "2")
        .with("BATCH_WORKER_FAILPOINTS", "crash-on-input=💥 crash");
    let ok = items("q", 200);
    w.submit("job-q", std::slice::from_ref(&ok)).await?;
    let mut bad = items("p", 100);
    bad[50].input = "💥 crash".into();
    w.submit("job-p", &[bad]).await?;
    let (starts, p) = w.restart_until_failed(&cfg, "job-p").await?;
    let err = p.error.context("failed job without error")?;
    ensure!(err.code == "shard_failed", "error {err:?}");
    ensure!(err.message.contains("dead-letter"), "error {err:?}");
    ensure!(
        starts == 3,
        "expected 2 crashes then a quarantine, saw {starts} starts"
    );
    let dead = w.dead_letters().await?;
    let msg: JobMessage = serde_json::from_slice(&dead[0].data)?;
    ensure!(msg.job_id == "job-p", "dead letter for {}", msg.job_id);
    ensure!(
        dead[0].attributes.contains_key("dead_letter_reason"),
        "attributes {:?}",
        dead[0].attributes
    );
    let q = w
        .wait_job("job-q", Duration::from_secs(30), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(q.counts.done == 200, "{:?}", q.counts);
    assert_exactly(&w.outputs("job-q")?, &ok)?;
    Ok(())
}

/// An error the worker lives through (here: the job's output folder is a file, so no chunk
/// can be written) gives the shard back without counting a crash. With `POISON_LIMIT=1`, one
/// crash would quarantine it; an error does not, and once the folder can be written the job
/// completes, each item once. Errors that go on fail the job at twice the limit, naming the
/// error.
async fn storage_errors_are_not_crashes(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "storage-errors").await?;
    let blocked = w.out.join("job-e");
    std::fs::write(&blocked, "a file where the job's output folder goes")?;
    std::fs::write(w.out.join("job-f"), "and another")?;
    let _w1 = w
        .worker("w1")
        .with("POISON_LIMIT", "1")
        .start(&w.log("w1.log"))?;
    let all = items("e", 300);
    w.submit("job-e", std::slice::from_ref(&all)).await?;
    let s = w
        .wait_shard(
            "job-e",
            0,
            Duration::from_secs(30),
            "an error given back",
            |s| s.errors >= 1,
        )
        .await?;
    ensure!(
        s.crashes() == 0 && s.owner.is_empty() && s.cursor == 0 && !s.last_error.is_empty(),
        "after an output error: {s:?}"
    );
    std::fs::remove_file(&blocked)?;
    let j = w
        .wait_job("job-e", Duration::from_secs(60), "succeeded", |j| {
            j.status == JobStatus::Succeeded
        })
        .await?;
    ensure!(j.counts.done == 300, "{:?}", j.counts);
    assert_exactly(&w.outputs("job-e")?, &all)?;

    w.submit("job-f", &[items("f", 10)]).await?;
    let f = w
        .wait_job("job-f", Duration::from_secs(60), "failed", |j| {
            j.status == JobStatus::Failed
        })
        .await?;
    let err = f.error.context("failed job without error")?;
    ensure!(
        err.code == "shard_failed" && err.message.contains("failed 2 times"),
        "{err:?}"
    );
    let s = w.shard("job-f", 0).await?.context("shard")?;
    ensure!(
        s.errors == 2 && s.crashes() == 0 && err.message.contains(&s.last_error),
        "{s:?} / {err:?}"
    );
    Ok(())
}

/// `cancel_requested` (what `DELETE /v1/jobs/{id}` sets) ends the job at a chunk boundary.
async fn cancel_stops_at_a_chunk_boundary(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "cancel").await?;
    let _w1 = w
        .worker("w1")
        .with(
            "BATCH_WORKER_FAILPOINTS",
            "batch-delay-ms=40;cancel-before-finish=1",
        )
        .start(&w.log("w1.log"))?;
    w.submit("job-c", &[items("c", 4000)]).await?;
    w.wait_shard("job-c", 0, Duration::from_secs(30), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    w.request_cancel("job-c").await?;
    let j = w
        .wait_job("job-c", Duration::from_secs(10), "cancelled", |j| {
            j.status == JobStatus::Cancelled
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = w.shard("job-c", 0).await?.context("shard")?;
    ensure!(s.cursor < 4000, "ran to the end after the cancel: {s:?}");
    ensure!(
        j.counts.done == s.cursor,
        "counts {:?} vs cursor {}",
        j.counts,
        s.cursor
    );

    // A cancel request that comes at the last chunk boundary of a job's only shard, run in
    // one chunk, after the job was read there: the shard's last commit, conditioned on the
    // job as read, fails, and the job ends `cancelled` with nothing counted.
    let few = items("f", 10);
    w.submit("job-f", std::slice::from_ref(&few)).await?;
    let j = w
        .wait_job("job-f", Duration::from_secs(20), "final", |j| {
            j.status.is_final()
        })
        .await?;
    ensure!(
        j.status == JobStatus::Cancelled && j.counts.done == 0 && j.output_uri.is_none(),
        "job-f: {j:?}"
    );
    // A chat message's last commit, which would finish its job, is conditioned on the job
    // record as the lease left it: the cancel request makes it fail, then the job is read.
    w.submit_chat("chat-f", "안녕").await?;
    let c = w
        .wait_job("chat-f", Duration::from_secs(20), "final", |j| {
            j.status.is_final()
        })
        .await?;
    ensure!(
        c.status == JobStatus::Cancelled && c.result.is_none(),
        "chat-f: {c:?}"
    );
    for job in ["job-f", "chat-f"] {
        let succeeded = w.success_lines("w1.log", job)?;
        ensure!(
            succeeded.is_empty(),
            "{job} was cancelled, yet logged as succeeded: {succeeded:#?}"
        );
    }
    Ok(())
}

/// The emulator delivers more shards than `MAX_OUTSTANDING_MESSAGES` (it ignores the limit,
/// which only the server keeps): the worker works on at most that many
/// at once while the others wait in it, and a chat message is answered meanwhile.
async fn shards_past_the_limit_wait_and_chat_does_not(fx: &Fixture) -> anyhow::Result<()> {
    const LIMIT: usize = 2;
    let w = World::new(fx, "slots").await?;
    let shards: Vec<Vec<InputItem>> = (0..6).map(|s| items(&format!("s{s}"), 640)).collect();
    w.submit("job-s", &shards).await?;
    let _w1 = w
        .worker("w1")
        .with("MAX_OUTSTANDING_MESSAGES", LIMIT.to_string())
        .with("BATCH_SIZE", "64")
        .with("MAX_NEW_TOKENS", "8")
        // Ten micro-batches of 150 ms: each shard runs ~1.5 s.
        .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=150")
        .start(&w.log("w1.log"))?;
    // The chat message, and a shard of a job cancelled before it ran, are published once
    // every slot is taken: neither waits for a slot.
    let mut chat_sent = false;
    let mut chat_done_while_batch_ran = None;
    let mut cancelled_before_a_shard_ended = None;
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        // Shards leased and not done: the ones being worked on.
        let (mut running, mut done) = (0, 0);
        for shard in 0..shards.len() as u32 {
            match w.shard("job-s", shard).await? {
                Some(s) if s.state == ShardState::Running && !s.owner.is_empty() => running += 1,
                Some(s) if s.state == ShardState::Done => done += 1,
                _ => {}
            }
        }
        most = most.max(running);
        ensure!(
            running <= LIMIT,
            "{running} shards worked on at once, with MAX_OUTSTANDING_MESSAGES={LIMIT}"
        );
        if running == LIMIT && !chat_sent {
            w.submit_chat("chat-s", "근처 떡볶이집 알려줘").await?;
            w.create_record("job-c", 10, 1, None).await?;
            w.request_cancel("job-c").await?;
            w.publish(&JobMessage {
                job_id: "job-c".into(),
                kind: JobKind::Batch,
                task: Task::Classify,
                shard: 0,
                shards: 1,
                items: items("c", 10),
                input_uri: None,
                range: None,
                chat: None,
            })
            .await?;
            chat_sent = true;
        }
        if chat_sent && cancelled_before_a_shard_ended.is_none() {
            let c = w.job("job-c").await?;
            if c.status.is_final() {
                ensure!(c.status == JobStatus::Cancelled, "job-c: {c:?}");
                cancelled_before_a_shard_ended = Some(done == 0);
            }
        }
        let job = w.job("job-s").await?;
        if chat_sent && chat_done_while_batch_ran.is_none() {
            let chat = w.job("chat-s").await?;
            if chat.status.is_final() {
                ensure!(chat.status == JobStatus::Succeeded, "chat: {chat:?}");
                chat_done_while_batch_ran = Some(!job.status.is_final());
            }
        }
        if job.status.is_final() {
            ensure!(job.status == JobStatus::Succeeded, "job-s: {job:?}");
            break;
        }
        ensure!(Instant::now() < deadline, "job-s unfinished: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        most == LIMIT,
        "at most {most} shards ran at once, never {LIMIT}"
    );
    ensure!(
        chat_done_while_batch_ran == Some(true),
        "the chat message waited for the batch shards ({chat_done_while_batch_ran:?})"
    );
    ensure!(
        cancelled_before_a_shard_ended == Some(true),
        "the cancelled job's shard waited for a slot ({cancelled_before_a_shard_ended:?})"
    );
    let all: Vec<InputItem> = shards.concat();
    assert_exactly(&w.outputs("job-s")?, &all)
}

/// GCE's preemption notice drains the worker like SIGTERM.
async fn preemption_notice_drains(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "preempt").await?;
    let metadata = stack::metadata::MetadataServer::start().await?;
    let mut w1 = w
        .worker("w1")
        .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=40")
        .with("GCE_METADATA_HOST", &metadata.host)
        .start(&w.log("w1.log"))?;
    let all = items("m", 3000);
    w.submit("job-m", std::slice::from_ref(&all)).await?;
    w.wait_shard("job-m", 0, Duration::from_secs(30), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    metadata.set_preempted(true);
    let (status, took) = w1.wait_exit(Duration::from_secs(25)).await?;
    ensure!(status.success(), "exit {status}");
    ensure!(took < Duration::from_secs(20), "drain took {took:?}");
    let s = w.shard("job-m", 0).await?.context("shard")?;
    ensure!(s.drains == 1 && s.owner.is_empty(), "{s:?}");
    let _w2 = w.worker("w2").start(&w.log("w2.log"))?;
    w.wait_job("job-m", Duration::from_secs(60), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    assert_exactly(&w.outputs("job-m")?, &all)?;
    Ok(())
}

/// An `input_uri` file saved as UTF-16 fails its job with `input_unreadable`, saying so,
/// whether it is planned into shards or read whole (`JOBS_TOPIC=""`).
async fn utf16_input_file_fails_its_job(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "utf16").await?;
    for (job, jobs_topic) in [("job-v", None), ("job-w", Some(""))] {
        let (input, _) = w
            .submit_input_file(job, &format!("{job}.jsonl"), &items("v", 20))
            .await?;
        let text = std::fs::read_to_string(&input)?;
        std::fs::write(&input, common::utf16_with_bom(&text))?;
        let mut cfg = w.worker("w1");
        if let Some(topic) = jobs_topic {
            cfg = cfg.with("JOBS_TOPIC", topic);
        }
        let mut w1 = cfg.start(&w.log(&format!("{job}.log")))?;
        let j = w
            .wait_job(job, Duration::from_secs(30), "failed", |j| {
                j.status == JobStatus::Failed
            })
            .await?;
        let err = j.error.context("failed job without error")?;
        ensure!(
            err.code == "input_unreadable" && err.message.contains("is UTF-16 text"),
            "{job}: {err:?}"
        );
        w1.signal(libc::SIGTERM);
        w1.wait_exit(Duration::from_secs(20)).await?;
    }
    Ok(())
}

/// An input file read whole (`JOBS_TOPIC=""`) and replaced while its job runs: the next
/// delivery fails the job with `input_changed` instead of going on from a checkpoint that
/// counts lines of the old file.
async fn whole_input_file_replaced_fails_its_job(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "replaced").await?;
    let cfg = w
        .worker("w1")
        .with("JOBS_TOPIC", "")
        .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=40");
    let mut w1 = cfg.start(&w.log("w1-a.log"))?;
    let (input, _) = w
        .submit_input_file("job-r", "job-r.jsonl", &items("r", 2000))
        .await?;
    w.wait_shard("job-r", 0, Duration::from_secs(30), "a first chunk", |s| {
        s.cursor > 0
    })
    .await?;
    let first = w.job("job-r").await?;
    ensure!(
        first.shards == 1 && first.plan.as_ref().is_some_and(|d| d.len() == 16),
        "the first lease keeps the file's digest: {first:?}"
    );
    w1.signal(libc::SIGKILL);
    w1.wait_exit(Duration::from_secs(5)).await?;
    write_items(&input, &items("q", 2000))?;
    let _w1 = cfg.start(&w.log("w1-b.log"))?;
    let j = w
        .wait_job(
            "job-r",
            REDELIVERY + Duration::from_secs(20),
            "failed",
            |j| j.status.is_final(),
        )
        .await?;
    let err = j.error.clone().context("failed job without error")?;
    ensure!(
        j.status == JobStatus::Failed
            && err.code == "input_changed"
            && err.message.contains("changed since this job began"),
        "job-r: {j:?}"
    );
    Ok(())
}

/// A worker whose Pub/Sub and Firestore hosts do not answer says so at once (the Pub/Sub
/// client retries in silence), and once they answer it says that too and takes its jobs.
async fn unreachable_services_are_reported_until_they_answer(fx: &Fixture) -> anyhow::Result<()> {
    let w = World::new(fx, "unreachable").await?;
    // Ports nothing listens on yet; forwarders to the emulators open them later.
    let free = || -> anyhow::Result<String> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?.to_string())
    };
    let (ps_addr, fs_addr) = (free()?, free()?);
    let mut cfg = w.worker("w1");
    cfg.pubsub_host = ps_addr.clone();
    cfg.firestore_host = fs_addr.clone();
    let _w1 = cfg.start(&w.log("w1.log"))?;
    let warned = |service: &str, addr: &str| {
        let (service, addr) = (service.to_owned(), addr.to_owned());
        move |l: &str| {
            l.contains("\"WARN\"")
                && l.contains(&format!("cannot reach {service} at {addr}: "))
                && l.contains("refused")
        }
    };
    // The worker loads its models first.
    let start = Duration::from_secs(30);
    let ps_warned = warned("Pub/Sub", &ps_addr);
    w.wait_log_for("w1.log", "the Pub/Sub warning", start, ps_warned)
        .await?;
    let fs_warned = warned("Firestore", &fs_addr);
    w.wait_log_for("w1.log", "the Firestore warning", start, fs_warned)
        .await?;
    let _ps = forward(&ps_addr, &fx.emu.pubsub_host).await?;
    let _fs = forward(&fs_addr, &fx.emu.firestore_host).await?;
    for (service, addr) in [("Pub/Sub", &ps_addr), ("Firestore", &fs_addr)] {
        let line = format!("{service} at {addr} answers");
        w.wait_log("w1.log", &line, |l| l.contains(&line)).await?;
    }
    let all = items("u", 50);
    w.submit("job-u", std::slice::from_ref(&all)).await?;
    // The Pub/Sub client's retries back off to 6.4 s and more between attempts.
    w.wait_job("job-u", Duration::from_secs(90), "succeeded", |j| {
        j.status == JobStatus::Succeeded
    })
    .await?;
    assert_exactly(&w.outputs("job-u")?, &all)?;
    Ok(())
}

/// Accepts connections while it lives.
struct Forward(tokio::task::JoinHandle<()>);

impl Drop for Forward {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on `from` and copies each connection both ways to `to`.
async fn forward(from: &str, to: &str) -> anyhow::Result<Forward> {
    let listener = tokio::net::TcpListener::bind(from)
        .await
        .with_context(|| format!("binding {from} again"))?;
    let to = to.to_owned();
    Ok(Forward(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_every_item_exactly_once_through_faults() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let emu = Emulators::start(&dir).await.expect("emulators start");
    let fx = Fixture { emu, dir };
    let only = std::env::var("SERVE_SCENARIO").unwrap_or_default();
    let mut failures = HashMap::new();
    macro_rules! scenario {
        ($f:ident) => {
            if only.is_empty() || stringify!($f).contains(only.as_str()) {
                let started = Instant::now();
                let r = $f(&fx).await;
                eprintln!(
                    "scenario {}: {} in {:.1} s",
                    stringify!($f),
                    if r.is_ok() { "ok" } else { "FAILED" },
                    started.elapsed().as_secs_f64()
                );
                if let Err(e) = r {
                    failures.insert(stringify!($f), format!("{e:#}"));
                }
            }
        };
    }
    scenario!(outputs_once_and_equal_to_the_embedded_run);
    scenario!(input_file_is_shared_by_workers);
    scenario!(plan_survives_a_crash_before_its_shards_are_published);
    scenario!(plan_that_crashes_every_time_is_dead_lettered);
    scenario!(drain_while_planning_gives_the_plan_back);
    scenario!(sigkill_then_restart_loses_nothing);
    scenario!(sigterm_drains_and_another_worker_resumes);
    scenario!(drained_past_pubsubs_limit_is_requeued);
    scenario!(missing_watch_subscription_is_reported);
    scenario!(fencing_stops_the_worker_that_lost_its_lease);
    scenario!(stale_worker_leaves_the_output_file_alone);
    scenario!(crash_before_publish_is_repaired);
    scenario!(lease_commit_sent_twice_is_still_ours);
    scenario!(one_shard_batch_finishes_as_it_publishes);
    scenario!(poison_shard_is_dead_lettered);
    scenario!(storage_errors_are_not_crashes);
    scenario!(cancel_stops_at_a_chunk_boundary);
    scenario!(preemption_notice_drains);
    scenario!(shards_past_the_limit_wait_and_chat_does_not);
    scenario!(generation_answers_chat_and_batches);
    scenario!(chat_without_its_own_subscription_comes_with_the_jobs);
    scenario!(unreachable_services_are_reported_until_they_answer);
    scenario!(utf16_input_file_fails_its_job);
    scenario!(whole_input_file_replaced_fails_its_job);
    assert!(failures.is_empty(), "failed scenarios: {failures:#?}");
}

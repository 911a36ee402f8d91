//! The chaos run: the whole stack (both emulators, `wrangler dev`, two `batch-worker serve`)
//! takes a classify workload and queued chat messages through the edge's HTTP API while a
//! driver kills workers at random instants — SIGKILL and SIGTERM in turn, plus one GCE
//! preemption notice from the local metadata server — and restarts each one as systemd
//! (`Restart=always`) does. Then every job must have succeeded, every item must be in the
//! outputs exactly once, equal to `batch-worker run` on the same input, and the job records'
//! counts must match.
//!
//! `cargo xtask chaos` runs the full size; `tests/tests/chaos.rs` a short one in CI.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use shared::rng::SplitMix64;
use shared::wire::InputItem;

use crate::emulators::Emulators;
use crate::gcp::{Firestore, PubSub, Topology};
use crate::metadata::MetadataServer;
use crate::process::Group;
use crate::worker::WorkerConfig;
use crate::wrangler::{EdgeConfig, Wrangler};

/// The size of one run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scratch folder: logs, outputs, the reference run.
    pub dir: PathBuf,
    /// The `batch-worker` executable.
    pub worker_bin: PathBuf,
    /// Texts the classify items cycle through.
    pub texts: Vec<String>,
    /// Classify items in all, sent as batches of at most `batch_request_items`.
    pub classify_items: usize,
    /// Items per `POST /v1/batches` (the edge accepts up to 10,000 inline).
    pub batch_request_items: usize,
    /// Queued chat messages.
    pub chats: usize,
    /// Signals sent to workers (SIGKILL and SIGTERM in turn); one preemption notice besides.
    pub kills: usize,
    /// Traffic arrives spread over this long, so that kills meet work in flight.
    pub traffic: Duration,
    /// Pause between two kills: uniform in this range.
    pub kill_gap: (Duration, Duration),
    /// A killed worker comes back after this long (the unit's `RestartSec`).
    pub restart_delay: Duration,
    /// Every job must be finished this long after the last kill.
    pub finish_timeout: Duration,
    /// Before a kill, wait at most this long for the chosen worker to have a shard in flight.
    pub aim: Duration,
    /// Seed of the kill schedule.
    pub seed: u64,
    /// Afterwards, this long a load on `/v1/chat` of the same stack (none: no load).
    pub load: Option<Duration>,
}

/// One fault the driver caused.
#[derive(Debug, Clone)]
pub struct Kill {
    pub kind: &'static str,
    pub worker: usize,
    /// Seconds since the traffic started.
    pub at_s: f64,
    /// Shards the killed process held (leases taken minus shards it finished or released).
    pub in_flight: u64,
    /// Exit status of the killed process, as text.
    pub exit: String,
    /// SIGTERM and preemption: how long the drain took.
    pub drain_ms: Option<u64>,
    /// Items the killed process inferred but never committed: the next owner redoes them.
    pub redone_items: u64,
    /// From the restart to the new process's first committed chunk (none: no work left).
    pub first_commit_s: Option<f64>,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub classify_items: usize,
    pub chats: usize,
    pub jobs: usize,
    pub kills: Vec<Kill>,
    /// From the first request to the last job finished.
    pub elapsed_s: f64,
    /// Items inferred by all processes beyond one per item.
    pub redone_items: u64,
    /// Deliveries of shard messages beyond the first, from the shard records.
    pub redeliveries: u64,
    /// Drains recorded on shard records.
    pub drains: u64,
    /// Latency of the edge's answers to the submissions (ms): p50, p99.
    pub submit_ms: (f64, f64),
    /// The load afterwards, if one was asked for.
    pub load: Option<crate::load::Report>,
}

impl Report {
    /// A Markdown summary: the totals, then one row per fault.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} classify items in {} batch jobs and {} queued chat messages; {} faults (seed {}) on \
             two workers whose micro-batches of 64 are slowed by 20 ms to stand for a heavier model; \
             all {} jobs succeeded, every item exactly once and equal to `batch-worker run`, in {:.1} s.",
            self.classify_items,
            self.jobs - self.chats,
            self.chats,
            self.kills.len(),
            self.seed,
            self.jobs,
            self.elapsed_s
        );
        let _ = writeln!(
            s,
            "Redone items {} in all; {} redeliveries; {} drains recorded; edge answered the submissions in p50 {:.1} ms, p99 {:.1} ms.\n",
            self.redone_items, self.redeliveries, self.drains, self.submit_ms.0, self.submit_ms.1
        );
        s.push_str("| # | fault | worker | at (s) | shards in flight | exit | drain (ms) | redone items | restart → first commit (s) |\n");
        s.push_str("|---:|---|---:|---:|---:|---|---:|---:|---:|\n");
        for (i, k) in self.kills.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | w{} | {:.1} | {} | {} | {} | {} | {} |",
                i + 1,
                k.kind,
                k.worker,
                k.at_s,
                k.in_flight,
                k.exit,
                k.drain_ms.map_or("—".into(), |d| d.to_string()),
                k.redone_items,
                k.first_commit_s.map_or("—".into(), |t| format!("{t:.2}")),
            );
        }
        if let Some(l) = &self.load {
            let _ = writeln!(
                s,
                "\nThen {:.0} s of load on `/v1/chat` ({} connections, 1 in 5 messages queued):\n",
                l.seconds, l.concurrency
            );
            s.push_str(&l.table());
        }
        s
    }
}

/// A uniform duration in `[lo, hi)`.
fn between(rng: &mut SplitMix64, (lo, hi): (Duration, Duration)) -> Duration {
    lo + (hi.saturating_sub(lo)).mul_f64(rng.next_f64())
}

const KEY: &str = "cs_chaos_key";

/// A queued message: a real request (never a trivial intent), numbered.
pub fn chat_message(i: usize) -> String {
    const ASKS: [&str; 4] = [
        "급식카드로 먹을 수 있는 근처 김밥집 추천해줘",
        "내일 점심에 아동급식카드 되는 중국집 알려줘",
        "Which restaurants near the school take the meal card?",
        "매운 거 못 먹는데 급식카드 되는 식당 있어?",
    ];
    format!("{} ({}번)", ASKS[i % ASKS.len()], i + 1)
}

/// The classify items: `c-{i}` over `texts`.
fn classify_items(cfg: &Config) -> Vec<InputItem> {
    (0..cfg.classify_items)
        .map(|i| InputItem {
            custom_id: format!("c-{i}"),
            input: cfg.texts[i % cfg.texts.len().max(1)].clone(),
        })
        .collect()
}

/// A worker slot: its metadata server, its current process and every log it wrote.
struct Slot {
    config: WorkerConfig,
    metadata: MetadataServer,
    process: Option<Group>,
    logs: Vec<PathBuf>,
}

impl Slot {
    fn start(&mut self, dir: &Path, index: usize) -> anyhow::Result<PathBuf> {
        let log = dir.join(format!("w{index}-{}.log", self.logs.len()));
        self.process = Some(self.config.start(&log)?);
        self.logs.push(log.clone());
        Ok(log)
    }
}

/// What one process's log says: items inferred and committed, shards taken and let go.
#[derive(Default, Debug)]
struct LogTally {
    inferred: u64,
    committed: u64,
    taken: u64,
    ended: u64,
    /// Bytes of the log read so far (whole lines only).
    read: u64,
}

impl LogTally {
    fn in_flight(&self) -> u64 {
        self.taken.saturating_sub(self.ended)
    }

    /// Adds the whole lines written to `log` since the last call.
    fn update(&mut self, log: &Path) -> &Self {
        use std::io::{Read, Seek, SeekFrom};
        let mut buf = Vec::new();
        let read = std::fs::File::open(log).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.read))?;
            f.read_to_end(&mut buf)
        });
        let Some(end) = read.ok().and(buf.iter().rposition(|&b| b == b'\n')) else {
            return self;
        };
        self.read += end as u64 + 1;
        for line in String::from_utf8_lossy(&buf[..end]).lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let items = v["fields"]["items"].as_u64().unwrap_or(0);
            match v["fields"]["message"].as_str() {
                Some("micro-batch inferred") => self.inferred += items,
                Some("chunk committed") => self.committed += items,
                Some("lease taken") => self.taken += 1,
                Some(m)
                    if m == "shard done"
                        || m.starts_with("shard checkpointed and released")
                        || m.starts_with("lease lost to another worker") =>
                {
                    self.ended += 1
                }
                _ => {}
            }
        }
        self
    }
}

/// What the whole of `log` says.
fn tally(log: &Path) -> LogTally {
    let mut t = LogTally::default();
    t.update(log);
    t
}

/// Polls `log` until it shows a committed chunk; the time that took, or `None` after `limit`.
async fn first_commit(log: PathBuf, since: Instant, limit: Duration) -> Option<f64> {
    while since.elapsed() < limit {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("\"chunk committed\"")
        {
            return Some(since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A submitted job and what it must hold when it is done.
#[derive(Debug, Clone)]
enum Expect {
    Batch(Vec<InputItem>),
    Chat(String),
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// Runs the chaos scenario; `progress` gets one line per step.
pub async fn run(cfg: &Config, progress: &(dyn Fn(&str) + Sync)) -> anyhow::Result<Report> {
    ensure!(!cfg.texts.is_empty(), "no texts for the classify items");
    let _ = std::fs::remove_dir_all(&cfg.dir);
    let logs = cfg.dir.join("logs");
    let out = cfg.dir.join("out");
    std::fs::create_dir_all(&out)?;
    progress("starting the emulators");
    let mut emu = Emulators::start(&logs).await?;
    let result = with_emulators(cfg, &emu, &logs, &out, progress).await;
    emu.stop();
    result
}

async fn with_emulators(
    cfg: &Config,
    emu: &Emulators,
    logs: &Path,
    out: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Report> {
    let t = Topology::unique("chaos");
    // Ack deadline 10 s; the subscription's dead-letter limit at Pub/Sub's maximum, far above
    // the worker's own poison limit, which does not count drains.
    PubSub::new(&emu.pubsub_host)
        .create_topology(&t, 10, 100)
        .await?;
    let fs = Firestore::new(&emu.firestore_host, &t.project);
    progress("starting wrangler dev");
    let edge = Wrangler::start(
        &cfg.dir.join("wrangler"),
        &EdgeConfig {
            project: t.project.clone(),
            topic: t.topic.clone(),
            chat_topic: t.chat_topic.clone(),
            pubsub_host: emu.pubsub_host.clone(),
            firestore_host: emu.firestore_host.clone(),
            api_keys: shared::apikey::entry("chaos", KEY, b"chaos-salt"),
            vars: vec![("RATE_LIMIT_PER_MINUTE".into(), "1000000".into())],
            rate_limit: Some(1_000_000),
        },
        0,
    )
    .await?;
    let mut slots = Vec::new();
    for i in 0..2 {
        let metadata = MetadataServer::start().await?;
        let config = WorkerConfig::new(&cfg.worker_bin, &format!("w{i}"), emu, &t, out)
            // Leases and ack extensions short enough that a SIGKILLed worker's shards come
            // back within the run; chunks, batch sizes and the rest as deployed.
            .with("LEASE_SECONDS", "10")
            .with("ACK_EXTENSION_SECONDS", "10")
            .with("GCE_METADATA_HOST", &metadata.host)
            // The intent MLP takes ~2.5 µs an item, so a shard is done in a blink and a kill at
            // a random instant would mostly meet an idle worker: each micro-batch of 64 is
            // slowed by 20 ms, standing for a heavier model, and chunks are 1 s.
            .with("BATCH_SIZE", "64")
            .with("CHUNK_SECONDS", "1")
            .with("BATCH_WORKER_FAILPOINTS", "batch-delay-ms=20")
            // One prompt per decoding batch: padded batches are not bitwise batch-invariant
            // (and the random test model has near-ties), so replies compare exactly with
            // `batch-worker run --generate-batch-size 1` only this way.
            .with("GENERATE_BATCH_SIZE", "1")
            .with(
                "RUST_LOG",
                "warn,batch_worker=info,batch_worker::serve=debug",
            );
        let mut slot = Slot {
            config,
            metadata,
            process: None,
            logs: Vec::new(),
        };
        slot.start(logs, i)?;
        slots.push(slot);
    }
    progress("sending traffic and killing workers");
    let started = Instant::now();
    let http = reqwest::Client::new();
    let (submitted, kills) = tokio::join!(
        submit_all(cfg, &http, &edge.url, started),
        drive(cfg, &mut slots, logs, started)
    );
    let (jobs, submit_ms) = submitted?;
    let (mut kills, probes) = kills?;
    progress("waiting for every job to finish");
    wait_finished(&fs, jobs.len(), cfg.finish_timeout).await?;
    let elapsed_s = started.elapsed().as_secs_f64();
    // A restart after the last job finished has nothing to commit: no time for it.
    for (k, p) in kills.iter_mut().zip(probes) {
        if p.is_finished() {
            k.first_commit_s = p.await.ok().flatten();
        } else {
            p.abort();
        }
    }
    progress("checking outputs against `batch-worker run`");
    verify(cfg, &http, &edge.url, &jobs, out).await?;

    // Redone work: per killed process, items inferred but never committed by it.
    let mut redone_items = 0;
    for slot in &slots {
        for log in &slot.logs {
            let t = tally(log);
            redone_items += t.inferred.saturating_sub(t.committed);
        }
    }
    let load = match cfg.load {
        Some(duration) => {
            progress("load on /v1/chat");
            let l = crate::load::run(
                &crate::load::Config {
                    url: edge.url.clone(),
                    key: KEY.into(),
                    duration,
                    concurrency: 16,
                    queued_every: 5,
                },
                &|| edge.group.rss_bytes(),
            )
            .await;
            ensure!(
                l.errors == 0,
                "{} of {} requests failed under load, e.g. {:?}",
                l.errors,
                l.requests,
                l.error_samples
            );
            Some(l)
        }
        None => None,
    };
    let (mut redeliveries, mut drains) = (0, 0);
    for doc in fs.list(shared::jobs::SHARDS_COLLECTION).await? {
        let int = |f: &str| {
            doc["fields"][f]["integerValue"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        };
        redeliveries += int("deliveries").saturating_sub(1);
        drains += int("drains");
    }
    Ok(Report {
        seed: cfg.seed,
        classify_items: cfg.classify_items,
        chats: cfg.chats,
        jobs: jobs.len(),
        kills,
        elapsed_s,
        redone_items,
        redeliveries,
        drains,
        submit_ms,
        load,
    })
}

/// Sends the batches and the chat messages through the edge, spread over `cfg.traffic`.
async fn submit_all(
    cfg: &Config,
    http: &reqwest::Client,
    url: &str,
    started: Instant,
) -> anyhow::Result<(BTreeMap<String, Expect>, (f64, f64))> {
    let items = classify_items(cfg);
    let batches: Vec<&[InputItem]> = items.chunks(cfg.batch_request_items.max(1)).collect();
    // One timeline: batch k at k/B of the window, chat i at i/C of it.
    let mut plan: Vec<(f64, Result<&[InputItem], usize>)> = Vec::new();
    for (k, b) in batches.iter().enumerate() {
        plan.push((k as f64 / batches.len() as f64, Ok(*b)));
    }
    for i in 0..cfg.chats {
        plan.push((i as f64 / cfg.chats as f64, Err(i)));
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut jobs = BTreeMap::new();
    let mut latencies = Vec::new();
    for (at, what) in plan {
        let due = cfg.traffic.mul_f64(at);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let t = Instant::now();
        let (path, body, expect) = match what {
            Ok(batch) => (
                "/v1/batches",
                json!({"task": "classify", "items": batch}),
                Expect::Batch(batch.to_vec()),
            ),
            Err(i) => (
                "/v1/chat",
                json!({"message": chat_message(i)}),
                Expect::Chat(chat_message(i)),
            ),
        };
        let resp = http
            .post(format!("{url}{path}"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(status == 202, "POST {path} answered {status}: {v}");
        let id = v["job_id"].as_str().context("job_id")?.to_owned();
        jobs.insert(id, expect);
    }
    latencies.sort_by(f64::total_cmp);
    Ok((
        jobs,
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
    ))
}

/// Probes of the restarted processes' first commits, one per kill.
type Probes = Vec<tokio::task::JoinHandle<Option<f64>>>;

/// Kills workers at random instants and restarts them; returns what it did.
async fn drive(
    cfg: &Config,
    slots: &mut [Slot],
    logs: &Path,
    started: Instant,
) -> anyhow::Result<(Vec<Kill>, Probes)> {
    let mut rng = SplitMix64(cfg.seed);
    let mut kills = Vec::new();
    let mut probes = Vec::new();
    let preempt_at = cfg.kills / 2;
    let mut signals = 0usize;
    for n in 0..=cfg.kills {
        tokio::time::sleep(between(&mut rng, cfg.kill_gap)).await;
        let worker = (rng.next_u64() % slots.len() as u64) as usize;
        let slot = &mut slots[worker];
        let log_before = slot.logs.last().cloned().unwrap_or_default();
        // Aim at work: wait (bounded) until the worker holds a shard, then a random instant
        // within the next 50 ms (a chat shard is done in tens of milliseconds).
        let aiming = Instant::now();
        let mut seen = LogTally::default();
        while seen.update(&log_before).in_flight() == 0 && aiming.elapsed() < cfg.aim {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 50)).await;
        let in_flight = seen.update(&log_before).in_flight();
        let Some(mut process) = slot.process.take() else {
            bail!("worker {worker} is not running");
        };
        // Signals alternate, SIGKILL first; the preemption notice comes halfway.
        let kind = if n == preempt_at {
            "preemption notice"
        } else {
            signals += 1;
            if signals % 2 == 1 {
                "SIGKILL"
            } else {
                "SIGTERM"
            }
        };
        let at_s = started.elapsed().as_secs_f64();
        match kind {
            "SIGKILL" => process.signal(libc::SIGKILL),
            "SIGTERM" => process.signal(libc::SIGTERM),
            _ => slot.metadata.set_preempted(true),
        }
        let (status, took) = process
            .wait_exit(Duration::from_secs(25))
            .await
            .with_context(|| format!("worker {worker} after a {kind}"))?;
        drop(process);
        if kind != "SIGKILL" {
            ensure!(
                status.success() && took < Duration::from_secs(20),
                "a {kind} must drain with exit 0 inside 20 s: {status} after {took:?}\n{}",
                std::fs::read_to_string(&log_before).unwrap_or_default()
            );
        }
        seen.update(&log_before);
        let t = seen;
        // The unit's RestartSec; a preempted VM boots a fresh instance (flag cleared).
        tokio::time::sleep(cfg.restart_delay).await;
        slot.metadata.set_preempted(false);
        let restarted = Instant::now();
        let log = slot.start(logs, worker)?;
        probes.push(tokio::spawn(first_commit(
            log,
            restarted,
            cfg.finish_timeout,
        )));
        kills.push(Kill {
            kind,
            worker,
            at_s,
            in_flight,
            exit: status.to_string().replace("exit status: ", "exit "),
            drain_ms: (kind != "SIGKILL").then_some(took.as_millis() as u64),
            redone_items: t.inferred.saturating_sub(t.committed),
            first_commit_s: None,
        });
    }
    Ok((kills, probes))
}

/// Waits until `n` job records are all in a final state.
async fn wait_finished(fs: &Firestore, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let docs = fs.list(shared::jobs::JOBS_COLLECTION).await?;
        let mut by_status: HashMap<String, usize> = HashMap::new();
        for d in &docs {
            let s = d["fields"]["status"]["stringValue"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            *by_status.entry(s).or_default() += 1;
        }
        let open = by_status.get("queued").copied().unwrap_or(0)
            + by_status.get("running").copied().unwrap_or(0);
        if docs.len() >= n && open == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("jobs not finished after {timeout:?}: {by_status:?} of {n}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every job succeeded with matching counts; outputs hold each item once and equal the
/// embedded run; chat replies equal the embedded run's texts.
async fn verify(
    cfg: &Config,
    http: &reqwest::Client,
    url: &str,
    jobs: &BTreeMap<String, Expect>,
    out: &Path,
) -> anyhow::Result<()> {
    let reference = reference_run(cfg, jobs)?;
    for (id, expect) in jobs {
        let v: Value = http
            .get(format!("{url}/v1/jobs/{id}"))
            .bearer_auth(KEY)
            .send()
            .await?
            .json()
            .await?;
        ensure!(v["status"] == "succeeded", "job {id}: {v}");
        match expect {
            Expect::Batch(items) => {
                let n = items.len();
                ensure!(
                    v["counts"] == json!({"total": n, "done": n, "failed": 0}),
                    "job {id} counts: {v}"
                );
                let outputs = job_outputs(out, id)?;
                ensure!(
                    outputs.len() == n,
                    "job {id}: {} output lines for {n} items",
                    outputs.len()
                );
                for item in items {
                    let got = outputs
                        .get(&item.custom_id)
                        .with_context(|| format!("job {id}: no output for {}", item.custom_id))?;
                    let want = reference.get(&item.custom_id).context("reference line")?;
                    ensure!(
                        got == want,
                        "job {id}: {} differs from `batch-worker run`: {got} vs {want}",
                        item.custom_id
                    );
                }
            }
            Expect::Chat(_) => {
                let want = reference.get(id).context("reference reply")?;
                ensure!(
                    v["result"]["reply"] == want["output"]["text"],
                    "chat job {id}: reply {} but `batch-worker run` wrote {}",
                    v["result"],
                    want["output"]
                );
            }
        }
    }
    Ok(())
}

/// Every output line of a job, by `custom_id`; fails on a duplicate.
fn job_outputs(out: &Path, job_id: &str) -> anyhow::Result<HashMap<String, Value>> {
    let dir = out.join(job_id).join("output");
    let mut lines = HashMap::new();
    for f in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        for l in std::fs::read_to_string(f?.path())?.lines() {
            let v: Value = serde_json::from_str(l)?;
            let id = v["custom_id"].as_str().context("custom_id")?.to_owned();
            ensure!(
                lines.insert(id.clone(), v).is_none(),
                "{id} appears twice in the outputs of {job_id}"
            );
        }
    }
    Ok(lines)
}

/// `batch-worker run` over the same classify items and chat messages: output lines by
/// `custom_id` (a chat's `custom_id` is its job id, as in the worker).
fn reference_run(
    cfg: &Config,
    jobs: &BTreeMap<String, Expect>,
) -> anyhow::Result<HashMap<String, Value>> {
    let dir = cfg.dir.join("reference");
    std::fs::create_dir_all(&dir)?;
    let mut lines = HashMap::new();
    for task in ["classify", "generate"] {
        let mut input = String::new();
        for (id, e) in jobs {
            match (task, e) {
                ("classify", Expect::Batch(items)) => {
                    for i in items {
                        input.push_str(&serde_json::to_string(i)?);
                        input.push('\n');
                    }
                }
                ("generate", Expect::Chat(message)) => {
                    input.push_str(&json!({"custom_id": id, "input": message}).to_string());
                    input.push('\n');
                }
                _ => {}
            }
        }
        if input.is_empty() {
            continue;
        }
        let (inp, outp) = (
            dir.join(format!("{task}.jsonl")),
            dir.join(format!("{task}.out.jsonl")),
        );
        std::fs::write(&inp, input)?;
        let st = std::process::Command::new(&cfg.worker_bin)
            .args(["run", "--task", task, "--device", "cpu"])
            .args(["--generate-batch-size", "1", "--input"])
            .arg(&inp)
            .arg("--output")
            .arg(&outp)
            .env("RUST_LOG", "error")
            .status()
            .context("starting batch-worker run")?;
        ensure!(st.success(), "batch-worker run --task {task}: {st}");
        for l in std::fs::read_to_string(&outp)?.lines() {
            let v: Value = serde_json::from_str(l)?;
            lines.insert(v["custom_id"].as_str().unwrap_or_default().to_owned(), v);
        }
    }
    Ok(lines)
}

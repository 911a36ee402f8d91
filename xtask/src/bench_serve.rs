//! `cargo xtask bench-serve`: `batch-worker serve` on one `classify` job through the local
//! Pub/Sub and Firestore emulators (the production path: streaming pull, shard leases,
//! checkpoints, chunk objects, job counts), beside `batch-worker run` on the same items.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use shared::jobs::{JobKind, JobMessage, JobStatus};
use shared::wire::{InputItem, Task};
use stack::emulators::Emulators;
use stack::gcp::{PubSub, Topology};
use stack::jobs::Jobs;
use stack::worker::WorkerConfig;

use crate::bench_worker::{intent_texts, worker_run};
use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Items in the job
    #[arg(long, default_value_t = 200_000, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub items: usize,
    /// Shards (Pub/Sub messages) the job is cut into
    #[arg(long, default_value_t = 20, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub shards: usize,
    /// Micro-batch size of the worker, in both modes
    #[arg(long, default_value_t = 256, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Jobs per mode, each with a fresh worker; the table shows the fastest (the emulators'
    /// JVMs compile their hot code during the first)
    #[arg(long, default_value_t = 3, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub repeat: usize,
    /// Give up on a job after this many seconds
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Submit the job as an input file (`input_uri`) that the worker plans into the shards
    /// itself (`INPUT_SHARD_ITEMS` = items / shards), instead of inline shard messages; the
    /// clock includes the planning
    #[arg(long)]
    pub input_uri: bool,
}

/// What was measured.
pub struct Report {
    /// The job was an input file the worker planned (else inline shard messages).
    pub input_uri: bool,
    pub items: usize,
    pub shards: usize,
    pub batch: usize,
    /// Jobs per mode, of which the fastest is shown.
    pub repeat: usize,
    /// From the worker's `serving` log line to the job record saying `succeeded`.
    pub serve_s: f64,
    /// CPU time of that worker process over the same interval.
    pub serve_cpu_s: f64,
    /// `batch-worker run` on the same items (its own summary: without process start-up).
    pub run_items_per_s: f64,
    /// CPU time of that `batch-worker run` process (start-up included), in the same run.
    pub run_cpu_s: f64,
}

/// One measured job or run: (seconds, CPU seconds of the worker process).
type Timing = (f64, f64);

/// CPU time of this process's waited-for children so far, in seconds.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

impl Report {
    pub fn serve_items_per_s(&self) -> f64 {
        self.items as f64 / self.serve_s
    }

    /// A heading line and a Markdown table.
    pub fn table(&self) -> String {
        format!(
            "`batch-worker serve --device cpu`, one worker, on one `classify` job of {} items in {} shards{} (Pub/Sub and Firestore emulators, `file://` outputs), micro-batch {}, {} CPU cores, fastest of {} jobs per mode, each with a fresh worker; the job waits in the subscription; the clock and the worker's CPU time run from its `serving` log line to the job's `succeeded` (`run`: its own summary's clock; its CPU time includes its start-up)\n\n\
             | mode | items/s | seconds | worker CPU seconds | worker CPU µs per item |\n|---|---|---|---|---|\n\
             | `serve` (Pub/Sub, Firestore checkpoints, chunk objects) | {:.0} | {:.2} | {:.2} | {:.1} |\n\
             | `run` (embedded, same items) | {:.0} | {:.2} | {:.2} | {:.1} |\n\
             | ratio serve / run | {:.2} | | {:.2} | |\n",
            self.items,
            self.shards,
            if self.input_uri {
                ", given as one input file that the worker cut into them"
            } else {
                ""
            },
            self.batch,
            crate::cores(),
            self.repeat,
            self.serve_items_per_s(),
            self.serve_s,
            self.serve_cpu_s,
            self.serve_cpu_s * 1e6 / self.items as f64,
            self.run_items_per_s,
            self.items as f64 / self.run_items_per_s,
            self.run_cpu_s,
            self.run_cpu_s * 1e6 / self.items as f64,
            self.serve_items_per_s() / self.run_items_per_s,
            self.serve_cpu_s / self.run_cpu_s,
        )
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    println!("\n{}", measure(&args)?.table());
    Ok(())
}

pub fn measure(args: &Args) -> anyhow::Result<Report> {
    ensure!(
        args.items > 0 && args.shards > 0 && args.batch_size > 0 && args.repeat > 0,
        "--items, --shards, --batch-size and --repeat must be at least 1"
    );
    let texts = intent_texts()?;
    let items: Vec<InputItem> = (0..args.items)
        .map(|i| InputItem {
            custom_id: format!("i{i}"),
            input: texts[i % texts.len()].clone(),
        })
        .collect();
    let per_shard = args.items.div_ceil(args.shards);
    let shards: Vec<Vec<InputItem>> = items.chunks(per_shard).map(<[_]>::to_vec).collect();
    // Pub/Sub takes messages of up to 10 MB; the edge keeps its shards far below that.
    let largest = shards
        .iter()
        .map(|s| serde_json::to_vec(s).map_or(0, |v| v.len()))
        .max()
        .unwrap_or(0);
    ensure!(
        largest < 9_000_000,
        "a shard of {per_shard} items is {largest} bytes of JSON, too near Pub/Sub's 10 MB message limit: use more --shards"
    );

    stack::prereq::emulator_tools(&stack::prereq::Env::from_process())?;
    setup::onnxruntime()?;
    let worker = setup::batch_worker()?;
    let dir = root().join("target/bench-serve");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let input = dir.join("items.jsonl");
    let mut body = String::new();
    for item in &items {
        body.push_str(&serde_json::to_string(item)?);
        body.push('\n');
    }
    std::fs::write(&input, body)?;
    let (mut run_items_per_s, mut run_cpu_s) = (0f64, 0f64);
    for _ in 0..args.repeat {
        let cpu_before = children_cpu_seconds();
        let (ips, _, _) = worker_run(
            &worker,
            &dir,
            &input,
            &["--task", "classify"],
            "--batch-size",
            args.batch_size,
        )?;
        let cpu = children_cpu_seconds() - cpu_before;
        eprintln!("bench-serve: `run` {ips:.0} items/s, {cpu:.2} CPU seconds");
        if ips > run_items_per_s {
            (run_items_per_s, run_cpu_s) = (ips, cpu);
        }
    }

    let file_uri = format!("file://{}", input.display());
    let serve_s = tokio::runtime::Runtime::new()?.block_on(async {
        let mut emu = Emulators::start(&dir.join("logs")).await?;
        let mut best: Timing = (f64::INFINITY, 0.0);
        let mut result = Ok(());
        for round in 0..args.repeat {
            let job = match args.input_uri {
                true => Job::File {
                    uri: &file_uri,
                    per_shard,
                },
                false => Job::Inline(&shards),
            };
            match serve_job(args, round, &worker, &dir, &emu, job).await {
                Ok((s, cpu)) => {
                    eprintln!(
                        "bench-serve: `serve` {:.0} items/s, {cpu:.2} CPU seconds",
                        args.items as f64 / s
                    );
                    if s < best.0 {
                        best = (s, cpu);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        emu.stop();
        result.map(|()| best)
    })?;
    let (serve_s, serve_cpu_s) = serve_s;
    Ok(Report {
        input_uri: args.input_uri,
        items: args.items,
        shards: shards.len(),
        batch: args.batch_size,
        repeat: args.repeat,
        serve_s,
        serve_cpu_s,
        run_items_per_s,
        run_cpu_s,
    })
}

/// How the job is handed to the worker.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// Shard messages with their items, as the edge publishes an inline batch.
    Inline(&'a [Vec<InputItem>]),
    /// One input file, planned by the worker into shards of `per_shard` lines.
    File { uri: &'a str, per_shard: usize },
}

/// Submits the job, starts one worker and times it from `serving` to the job's `succeeded`;
/// checks that every item has exactly one output line.
async fn serve_job(
    args: &Args,
    round: usize,
    worker: &Path,
    dir: &Path,
    emu: &Emulators,
    job: Job<'_>,
) -> anyhow::Result<Timing> {
    let t = Topology::unique("bench-serve");
    PubSub::new(&emu.pubsub_host)
        .create_topology(&t, 60, 10)
        .await?;
    // The whole job waits in the subscription before the worker starts: the clock then sees
    // the worker alone, not this process publishing 20 MB through the emulator beside it.
    let jobs = Jobs::new(&emu.pubsub_host, &emu.firestore_host, &t);
    let job_id = format!("bench-serve-{round}");
    let job_id = job_id.as_str();
    let out = dir.join(format!("out-{round}"));
    let mut config = WorkerConfig::new(worker, "bench-serve", emu, &t, &out)
        .with("BATCH_SIZE", args.batch_size.to_string());
    match job {
        Job::Inline(shards) => jobs.submit(job_id, shards).await?,
        Job::File { uri, per_shard } => {
            jobs.create_record(
                job_id,
                JobKind::Batch,
                Task::Classify,
                0,
                0,
                Some(uri.into()),
            )
            .await?;
            jobs.publish(&JobMessage::input_file(job_id, Task::Classify, uri))
                .await?;
            config = config.with("INPUT_SHARD_ITEMS", per_shard.to_string());
        }
    }
    std::fs::create_dir_all(&out)?;
    let w = config.start(&dir.join(format!("logs/worker-{round}.log")))?;
    let serving = || std::fs::read_to_string(w.log_path()).is_ok_and(|l| l.contains("\"serving\""));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serving() {
        ensure!(
            Instant::now() < deadline,
            "the worker did not start serving within 60 s:\n{}",
            w.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    // Start-up (ONNX Runtime, both models) is left out, as the clock leaves it out.
    let cpu_at_start = w.cpu_seconds();
    let deadline = started + Duration::from_secs(args.timeout);
    loop {
        let j = jobs.job(job_id).await?;
        match j.status {
            JobStatus::Succeeded => break,
            s if s.is_final() => bail!("the job ended {s:?}: {:?}", j.error),
            _ if Instant::now() > deadline => bail!(
                "the job was not done after {} s ({} of {} items)\n{}",
                args.timeout,
                j.counts.done,
                j.counts.total,
                w.log_tail(20)
            ),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = w.cpu_seconds() - cpu_at_start;

    let mut ids = std::collections::HashSet::new();
    let output = out.join(job_id).join("output");
    for f in std::fs::read_dir(&output).with_context(|| output.display().to_string())? {
        for line in std::fs::read_to_string(f?.path())?.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let id = v["custom_id"].as_str().context("custom_id")?.to_owned();
            ensure!(v.get("output").is_some(), "an error line: {line}");
            ensure!(ids.insert(id.clone()), "{id} has two output lines");
        }
    }
    let items = args.items;
    ensure!(
        ids.len() == items,
        "{} output lines for {items} items",
        ids.len()
    );
    Ok((secs, cpu))
}

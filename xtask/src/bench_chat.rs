//! `cargo xtask bench-chat`: how long queued chat messages wait for their replies when they
//! arrive one after another while the worker is decoding others, through the local Pub/Sub
//! and Firestore emulators and `batch-worker serve` with the test text-generation model
//! (`models/lm/`). With `--compare` another `batch-worker` build is measured the same way,
//! the two taking turns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use shared::jobs::JobStatus;
use shared::wire::{InputItem, Task};
use stack::emulators::Emulators;
use stack::gcp::{PubSub, Topology};
use stack::jobs::Jobs;
use stack::worker::WorkerConfig;

use crate::bench_worker::intent_texts;
use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Chat messages sent per round
    #[arg(long, default_value_t = 40, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub messages: usize,
    /// Milliseconds between two messages
    #[arg(long, default_value_t = 250)]
    pub interval_ms: u64,
    /// Tokens per reply (`MAX_NEW_TOKENS`; stop tokens ignored, so every reply is this long)
    #[arg(long, default_value_t = 64, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Prompts decoded together at most (`GENERATE_BATCH_SIZE`)
    #[arg(long, default_value_t = 8, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// `GENERATE_GATHER_MS` of the worker
    #[arg(long, default_value_t = 10)]
    pub gather_ms: u64,
    /// Milliseconds added to each decoding step (failpoint `generate-step-delay-ms`): the
    /// test model's step takes ~0.2 ms, a 3B model's on a GPU tens of ms
    #[arg(long, default_value_t = 20)]
    pub step_delay_ms: u64,
    /// Rounds per worker build; the table shows the median of each figure
    #[arg(long, default_value_t = 3, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub repeat: usize,
    /// Items of a `generate` batch job submitted just before the chat messages (in shards
    /// of at most 1,000, as the edge cuts them), so that the replies compete with bulk
    /// decoding (0: no batch job)
    #[arg(long, default_value_t = 0)]
    pub batch_items: usize,
    /// Another `batch-worker` executable (e.g. an older build) measured the same way, in turns
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// One round: each message's wait from its publish to its job's `succeeded`, in ms, and
/// the seconds from the first publish to the last reply.
struct Round {
    waits_ms: Vec<f64>,
    span_s: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.messages > 0 && args.batch_size > 0 && args.repeat > 0 && args.max_new_tokens > 0,
        "--messages, --batch-size, --repeat and --max-new-tokens must be at least 1"
    );
    let texts: Vec<String> = intent_texts()?
        .into_iter()
        .filter(|t| t.chars().count() >= 12)
        .step_by(97)
        .take(args.messages + 1)
        .collect();
    ensure!(texts.len() > args.messages, "too few intent texts");
    stack::prereq::emulator_tools(&stack::prereq::Env::from_process())?;
    setup::onnxruntime()?;
    let mut workers = vec![("this build".to_owned(), setup::batch_worker()?)];
    if let Some(other) = &args.compare {
        ensure!(
            other.is_file(),
            "--compare {}: no such file",
            other.display()
        );
        workers.push((other.display().to_string(), other.clone()));
    }
    let dir = root().join("target/bench-chat");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs"))?;
    let rounds = tokio::runtime::Runtime::new()?.block_on(async {
        let mut emu = Emulators::start(&dir.join("logs")).await?;
        let mut rounds: Vec<Vec<Round>> = workers.iter().map(|_| Vec::new()).collect();
        let mut result = Ok(());
        'outer: for round in 0..args.repeat {
            for (w, (name, bin)) in workers.iter().enumerate() {
                match chat_round(&args, round, w, bin, &dir, &emu, &texts).await {
                    Ok(r) => {
                        let mut waits = r.waits_ms.clone();
                        waits.sort_by(f64::total_cmp);
                        eprintln!(
                            "bench-chat: {name}: p50 {:.0} ms, p90 {:.0} ms, all replied in {:.2} s",
                            quantile(&waits, 0.5),
                            quantile(&waits, 0.9),
                            r.span_s
                        );
                        rounds[w].push(r);
                    }
                    Err(e) => {
                        result = Err(e.context(format!("{name}, round {round}")));
                        break 'outer;
                    }
                }
            }
        }
        emu.stop();
        result.map(|()| rounds)
    })?;
    println!(
        "\n`batch-worker serve --device cpu` with the test model `models/lm/`, one worker: {} chat messages, one every {} ms, each a queued chat job (record, then message) as the edge makes it; replies of {} tokens (stop tokens ignored), {}, `GENERATE_BATCH_SIZE` {}, `GENERATE_GATHER_MS` {}; wait = the job record's `updated_at` at `succeeded` minus the publish time; median of {} rounds per build, taking turns\n",
        args.messages,
        args.interval_ms,
        args.max_new_tokens,
        match args.step_delay_ms {
            0 => "the test model's own decoding steps (~0.2 ms)".to_owned(),
            ms => format!("each decoding step made {ms} ms slower (as a large model on a GPU)"),
        },
        args.batch_size,
        args.gather_ms,
        args.repeat
    );
    if args.batch_items > 0 {
        println!(
            "A `generate` batch job of {} items was submitted just before the first chat message; its items share the decoding rows with the replies.\n",
            args.batch_items
        );
    }
    println!(
        "| worker | wait p50 | wait p90 | wait max | first message to last reply |\n|---|---|---|---|---|"
    );
    for ((name, _), rs) in workers.iter().zip(&rounds) {
        let figure = |f: &dyn Fn(&Round) -> f64| {
            let mut v: Vec<f64> = rs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            quantile(&v, 0.5)
        };
        let q = |p: f64| {
            move |r: &Round| {
                let mut w = r.waits_ms.clone();
                w.sort_by(f64::total_cmp);
                quantile(&w, p)
            }
        };
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} s |",
            figure(&q(0.5)),
            figure(&q(0.9)),
            figure(&q(1.0)),
            figure(&|r| r.span_s)
        );
    }
    Ok(())
}

/// The `p` quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts a fresh worker `bin`, warms it up with one message, then sends the messages at
/// the interval and waits for every reply.
async fn chat_round(
    args: &Args,
    round: usize,
    w: usize,
    bin: &Path,
    dir: &Path,
    emu: &Emulators,
    texts: &[String],
) -> anyhow::Result<Round> {
    let mut t = Topology::unique("bench-chat");
    if !WorkerConfig::reads_chat_subscription(bin)? {
        t = t.without_chat_subscription();
    }
    PubSub::new(&emu.pubsub_host)
        .create_topology(&t, 60, 10)
        .await?;
    let jobs = Jobs::new(&emu.pubsub_host, &emu.firestore_host, &t);
    let out = dir.join(format!("out-{round}-{w}"));
    std::fs::create_dir_all(&out)?;
    let worker = WorkerConfig::new(bin, "bench-chat", emu, &t, &out)
        .with("MAX_NEW_TOKENS", args.max_new_tokens.to_string())
        .with("IGNORE_STOP_TOKENS", "true")
        .with("GENERATE_BATCH_SIZE", args.batch_size.to_string())
        .with("GENERATE_GATHER_MS", args.gather_ms.to_string())
        .with("MODEL_DIR", root().join("models").display().to_string())
        .with(
            "BATCH_WORKER_FAILPOINTS",
            format!("generate-step-delay-ms={}", args.step_delay_ms),
        )
        .start(&dir.join(format!("logs/worker-{round}-{w}.log")))?;
    let wait_for = |ids: Vec<String>, limit: Duration| {
        let jobs = jobs.clone();
        let worker = &worker;
        async move {
            let deadline = Instant::now() + limit;
            let mut updated = Vec::with_capacity(ids.len());
            for id in &ids {
                loop {
                    let j = jobs.job(id).await?;
                    match j.status {
                        JobStatus::Succeeded => {
                            updated.push(
                                shared::time::parse_rfc3339(&j.updated_at).context("updated_at")?,
                            );
                            break;
                        }
                        s if s.is_final() => bail!("{id} ended {s:?}: {:?}", j.error),
                        _ if Instant::now() > deadline => {
                            bail!("{id} not answered in time\n{}", worker.log_tail(20))
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
            anyhow::Ok(updated)
        }
    };
    // The first message also waits for the worker's start-up (both models loaded).
    let warm = format!("warm-{round}-{w}");
    jobs.submit_chat(&warm, &texts[args.messages]).await?;
    wait_for(vec![warm], Duration::from_secs(120)).await?;

    if args.batch_items > 0 {
        let items: Vec<InputItem> = (0..args.batch_items)
            .map(|i| InputItem {
                custom_id: format!("bulk-{i}"),
                input: texts[i % texts.len()].clone(),
            })
            .collect();
        let shards: Vec<Vec<_>> = items.chunks(1000).map(<[_]>::to_vec).collect();
        jobs.submit_task(&format!("bulk-{round}-{w}"), Task::Generate, &shards)
            .await?;
    }
    let mut sent = Vec::with_capacity(args.messages);
    let mut ids = Vec::with_capacity(args.messages);
    let start = Instant::now();
    for (i, text) in texts[..args.messages].iter().enumerate() {
        let due = start + Duration::from_millis(args.interval_ms * i as u64);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("chat-{round}-{w}-{i}");
        jobs.submit_chat(&id, text).await?;
        // Published: from here on the worker can see it.
        sent.push(now_ms());
        ids.push(id);
    }
    let done = wait_for(ids, Duration::from_secs(300)).await?;
    let waits_ms: Vec<f64> = done
        .iter()
        .zip(&sent)
        .map(|(&d, &s)| d.saturating_sub(s) as f64)
        .collect();
    let first = sent.first().copied().unwrap_or(0);
    let last = done.iter().copied().max().unwrap_or(first);
    Ok(Round {
        waits_ms,
        span_s: last.saturating_sub(first) as f64 / 1000.0,
    })
}

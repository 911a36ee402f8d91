//! `cargo xtask bench-generate`: tokens/s of `batch-worker run --task generate` on the test
//! model per batch size, and the same model and greedy decoding loop (left padding, KV cache)
//! through Python's `onnxruntime` (`models/lm/bench_generate.py`).
//!
//! With `--compare OTHER_BUILD`, instead: this build and another one take turns over the same
//! prompts with stop tokens honoured, so texts end at different lengths, and each decoding
//! step made as slow as a large model's on a GPU; the table gives both builds' items/s, and
//! the command fails unless both wrote the same lines.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::bench_worker::{worker_run, write_items};
use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Prompts per run (lines of models/lm/corpus.txt, cycled)
    #[arg(long, default_value_t = 1024, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub prompts: usize,
    /// New tokens per prompt (stop tokens ignored, so every item makes exactly this many)
    #[arg(long, default_value_t = 64, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Static batch sizes to measure
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub batch_sizes: Vec<usize>,
    /// Runs per measurement; the table shows the best of each side
    #[arg(long, default_value_t = 3, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub repeat: usize,
    /// Another `batch-worker` build to time beside this one (see the module's documentation)
    #[arg(long)]
    pub compare: Option<std::path::PathBuf>,
    /// With `--compare`: milliseconds added to each decoding step (failpoint
    /// `generate-step-delay-ms`; a 3B model's step on a GPU takes tens of ms)
    #[arg(long, default_value_t = 10)]
    pub step_delay_ms: u64,
}

/// One static batch size's measurement.
pub struct Row {
    pub batch: usize,
    pub tokens_per_s: f64,
    pub share: f64,
    pub session_tokens_per_s: f64,
    pub python_tokens_per_s: f64,
}

/// The measurements and what they were made with.
pub struct Report {
    pub prompts: usize,
    pub max_new_tokens: usize,
    pub rows: Vec<Row>,
}

impl Report {
    /// A heading line and a Markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "`batch-worker run --task generate --device cpu` on models/lm, {} prompts × {} new tokens ({} tokens), greedy, {} CPU cores\n\n",
            self.prompts,
            self.max_new_tokens,
            self.prompts * self.max_new_tokens,
            crate::cores()
        );
        s.push_str("| batch | worker tokens/s (end to end) | share in `session.run` | worker `session.run` tokens/s | Python `onnxruntime` loop tokens/s | ratio end to end / Python |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {:.0} | {:.0} % | {:.0} | {:.0} | {:.2} |\n",
                r.batch,
                r.tokens_per_s,
                r.share * 100.0,
                r.session_tokens_per_s,
                r.python_tokens_per_s,
                r.tokens_per_s / r.python_tokens_per_s
            ));
        }
        s
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(other) = &args.compare {
        return compare(&args, other);
    }
    println!("\n{}", measure(&args)?.table());
    Ok(())
}

/// This build and `other` over the same prompts, stop tokens honoured, taking turns; the best
/// of `--repeat` runs each.
fn compare(args: &Args, other: &Path) -> anyhow::Result<()> {
    setup::onnxruntime()?;
    let worker = setup::batch_worker()?;
    anyhow::ensure!(
        other.is_file(),
        "--compare {}: no such file",
        other.display()
    );
    let dir = root().join("target/bench-generate");
    std::fs::create_dir_all(&dir)?;
    let corpus = std::fs::read_to_string(root().join("models/lm/corpus.txt"))?;
    let texts: Vec<&str> = corpus.lines().filter(|l| !l.trim().is_empty()).collect();
    let input = dir.join("compare.jsonl");
    write_items(&input, &texts, args.prompts, "p")?;
    let mut table = format!(
        "`batch-worker run --task generate --device cpu` on models/lm, {} prompts, up to {} new tokens each (stop tokens honoured), each decoding step {} ms slower, best of {}\n\n| batch | this build items/s | tokens per item (mean) | {} items/s | ratio |\n|---|---|---|---|---|\n",
        args.prompts,
        args.max_new_tokens,
        args.step_delay_ms,
        args.repeat.max(1),
        other.display()
    );
    for &batch in &args.batch_sizes {
        let (mut this, mut that) = (0.0f64, 0.0f64);
        let mut tokens = 0.0;
        for round in 0..args.repeat.max(1) {
            let (a, lines_a) = timed_run(&worker, &dir, &input, args, batch)?;
            let (b, lines_b) = timed_run(other, &dir, &input, args, batch)?;
            anyhow::ensure!(
                lines_a == lines_b,
                "batch {batch}, round {round}: the two builds wrote different lines"
            );
            tokens = mean_tokens(&lines_a)?;
            this = this.max(a);
            that = that.max(b);
            eprintln!("batch {batch}, round {round}: {a:.1} vs {b:.1} items/s");
        }
        table.push_str(&format!(
            "| {batch} | {this:.1} | {tokens:.1} | {that:.1} | {:.2} |\n",
            this / that.max(1e-9)
        ));
    }
    println!("\n{table}");
    Ok(())
}

/// One run of `worker` over `input` with the step delay: items/s (from start to exit) and
/// its output.
fn timed_run(
    worker: &Path,
    dir: &Path,
    input: &Path,
    args: &Args,
    batch: usize,
) -> anyhow::Result<(f64, String)> {
    let max_new_tokens = args.max_new_tokens.to_string();
    let failpoints = format!("generate-step-delay-ms={}", args.step_delay_ms);
    let task = [
        "--task",
        "generate",
        "--prompt-format",
        "raw",
        "--max-new-tokens",
        &max_new_tokens,
        "--failpoints",
        &failpoints,
    ];
    let (_, _, wall) = worker_run(worker, dir, input, &task, "--generate-batch-size", batch)?;
    let output = std::fs::read_to_string(dir.join(format!("out-{batch}.jsonl")))?;
    Ok((args.prompts as f64 / wall, output))
}

/// The mean `tokens` of the output lines.
fn mean_tokens(lines: &str) -> anyhow::Result<f64> {
    let mut sum = 0u64;
    let mut n = 0u64;
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        sum += v["output"]["tokens"]
            .as_u64()
            .with_context(|| format!("no output.tokens in {l}"))?;
        n += 1;
    }
    Ok(sum as f64 / n.max(1) as f64)
}

pub fn measure(args: &Args) -> anyhow::Result<Report> {
    setup::onnxruntime()?;
    let worker = setup::batch_worker()?;
    let dir = root().join("target/bench-generate");
    std::fs::create_dir_all(&dir)?;
    let model = root().join("models/lm");
    let corpus = std::fs::read_to_string(model.join("corpus.txt"))?;
    let texts: Vec<&str> = corpus.lines().filter(|l| !l.trim().is_empty()).collect();
    let input = dir.join("prompts.jsonl");
    write_items(&input, &texts, args.prompts, "p")?;
    let py = setup::python_lm()?;

    let mut rows = Vec::new();
    for &batch in &args.batch_sizes {
        // The best of `--repeat` runs on each side: this machine's noise only slows runs down.
        let mut best = (0.0f64, 0.0f64, 0.0f64);
        let mut python = 0.0f64;
        for _ in 0..args.repeat.max(1) {
            let (rust, share) = generate_run(&worker, &dir, &input, args, batch)?;
            if rust > best.0 {
                best = (rust, share, rust / share.max(1e-9));
            }
            python = python.max(python_bench(&py, &model, &input, args, batch)?);
        }
        let (rust, share, session) = best;
        eprintln!(
            "batch {batch}: {rust:.0} tokens/s end to end, {:.0}% in session.run; Python {python:.0} tokens/s",
            share * 100.0
        );
        rows.push(Row {
            batch,
            tokens_per_s: rust,
            share,
            session_tokens_per_s: session,
            python_tokens_per_s: python,
        });
    }
    Ok(Report {
        prompts: args.prompts,
        max_new_tokens: args.max_new_tokens,
        rows,
    })
}

/// One `batch-worker run`: its tokens/s (model load and tokenization included) and the share
/// of its wall time inside `session.run`.
fn generate_run(
    worker: &Path,
    dir: &Path,
    input: &Path,
    args: &Args,
    batch: usize,
) -> anyhow::Result<(f64, f64)> {
    let max_new_tokens = args.max_new_tokens.to_string();
    let task = [
        "--task",
        "generate",
        "--prompt-format",
        "raw",
        "--ignore-stop-tokens",
        "--max-new-tokens",
        &max_new_tokens,
    ];
    let (items_per_s, share, _) =
        worker_run(worker, dir, input, &task, "--generate-batch-size", batch)?;
    Ok((items_per_s * args.max_new_tokens as f64, share))
}

fn python_bench(
    py: &Path,
    model: &Path,
    input: &Path,
    args: &Args,
    batch: usize,
) -> anyhow::Result<f64> {
    let out = Command::new("python3")
        .arg(model.join("bench_generate.py"))
        .arg("--model-dir")
        .arg(model)
        .arg("--input")
        .arg(input)
        .args(["--batch", &batch.to_string()])
        .args(["--prompts", &args.prompts.to_string()])
        .args(["--max-new-tokens", &args.max_new_tokens.to_string()])
        .env("PYTHONPATH", py)
        .output()?;
    if !out.status.success() {
        bail!(
            "python baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "python baseline printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    v["tokens_per_s"]
        .as_f64()
        .context("python baseline printed no tokens_per_s")
}

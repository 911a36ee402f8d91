//! `cargo xtask bench-worker`: `batch-worker run --task classify` throughput per micro-batch
//! size, the share of its wall time inside `session.run`, and the same model and batches run
//! by Python's `onnxruntime` on the same features (from the same Rust featurizer).

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Items in the generated input
    #[arg(long, default_value_t = 200_000, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub items: usize,
    /// Micro-batch sizes to measure
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024", value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub batch_sizes: Vec<usize>,
    /// Runs per measurement; the table shows the best of each side (this machine's speed
    /// drifts by tens of per cent within minutes)
    #[arg(long, default_value_t = 3, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub repeat: usize,
}

/// One micro-batch size's measurement.
pub struct Row {
    pub batch: usize,
    pub items_per_s: f64,
    pub share: f64,
    pub session_items_per_s: f64,
    pub python_items_per_s: f64,
    /// Python with one intra-op thread, as the worker's model thread runs.
    pub python_one_thread_items_per_s: f64,
    /// Python doing the worker's job on the same features: `session.run`, the routing
    /// decision and the same output lines, checked byte for byte against the worker's.
    pub python_job_items_per_s: f64,
    /// The worker's items/s over Python's bare `session.run` and over Python's same job, each
    /// the median over the runs of the worker's run and the Python runs right after it: the
    /// machine's speed drifts, and two bests can come from different spells of it.
    pub ratio: f64,
    pub job_ratio: f64,
}

/// The measurements and what they were made with.
pub struct Report {
    pub items: usize,
    /// Runs per side and micro-batch size, of which the best is shown.
    pub repeat: usize,
    pub rows: Vec<Row>,
}

impl Report {
    /// A heading line and a Markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "`batch-worker run --task classify --device cpu`, {} items, {} CPU cores, best of {} runs on each side; the end-to-end ratios are the median over the runs of each worker run against the Python runs right after it\n\n",
            self.items,
            crate::cores(),
            self.repeat
        );
        s.push_str("| micro-batch | worker items/s (end to end) | share in `session.run` | worker `session.run` items/s (1 thread) | Python `onnxruntime` `session.run` items/s | ratio end to end / Python | ratio `session.run` / Python | Python `session.run` items/s, 1 thread | ratio `session.run` / Python, 1 thread each | Python, the same job on the same features, items/s | ratio end to end / Python's same job |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {:.0} | {:.0} % | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |\n",
                r.batch,
                r.items_per_s,
                r.share * 100.0,
                r.session_items_per_s,
                r.python_items_per_s,
                r.ratio,
                r.session_items_per_s / r.python_items_per_s,
                r.python_one_thread_items_per_s,
                r.session_items_per_s / r.python_one_thread_items_per_s,
                r.python_job_items_per_s,
                r.job_ratio
            ));
        }
        s
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    println!("\n{}", measure(&args)?.table());
    Ok(())
}

pub fn measure(args: &Args) -> anyhow::Result<Report> {
    setup::onnxruntime()?;
    let worker = setup::batch_worker()?;
    let dir = root().join("target/bench-worker");
    std::fs::create_dir_all(&dir)?;

    // Input: the intent splits, cycled, with unique ids.
    let texts = intent_texts()?;
    let input = dir.join("items.jsonl");
    write_items(&input, &texts, args.items, "i")?;

    // The same features for Python, from the Rust featurizer.
    let meta = std::fs::read_to_string(root().join("models/intent/model.json"))?;
    let policy = shared::intent::Policy::from_json(&meta).map_err(|e| anyhow::anyhow!("{e}"))?;
    let f = policy.featurizer();
    let dim = f.dim();
    let feats_path = dir.join("features.sparse");
    write_sparse_features(&feats_path, f, &texts, args.items)?;
    let py = python_env(&dir)?;

    let mut rows = Vec::new();
    for &batch in &args.batch_sizes {
        // Worker and Python take turns, so a slow spell of the machine hits both sides.
        let (mut items_per_s, mut share, mut python, mut python_one, mut python_job) =
            (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let (mut ratios, mut job_ratios) = (Vec::new(), Vec::new());
        for run in 0..args.repeat.max(1) {
            let (ips, sh, wall) = worker_run(
                &worker,
                &dir,
                &input,
                &["--task", "classify"],
                "--batch-size",
                batch,
            )?;
            let py_out = dir.join(format!("python-out-{batch}.jsonl"));
            let (py_ips, py_one, py_job) =
                python_bench(&py, &feats_path, dim, args.items, batch, &py_out)?;
            same_lines(&dir.join(format!("out-{batch}.jsonl")), &py_out)?;
            eprintln!(
                "batch {batch}, run {}: {ips:.0} items/s end to end ({wall:.1} s with start-up), {:.0}% in session.run; Python session.run {py_ips:.0} items/s ({py_one:.0} with one thread), Python's same job on the same features {py_job:.0} items/s",
                run + 1,
                sh * 100.0
            );
            ratios.push(ips / py_ips);
            job_ratios.push(ips / py_job);
            python_one = python_one.max(py_one);
            python_job = python_job.max(py_job);
            if ips > items_per_s {
                (items_per_s, share) = (ips, sh);
            }
            python = python.max(py_ips);
        }
        let session_s = (args.items as f64 / items_per_s) * share;
        rows.push(Row {
            batch,
            items_per_s,
            share,
            session_items_per_s: args.items as f64 / session_s.max(1e-9),
            python_items_per_s: python,
            python_one_thread_items_per_s: python_one,
            python_job_items_per_s: python_job,
            ratio: median(&mut ratios),
            job_ratio: median(&mut job_ratios),
        });
    }
    Ok(Report {
        items: args.items,
        repeat: args.repeat.max(1),
        rows,
    })
}

/// The median of `xs` (the mean of the middle two for an even count; 0 for none).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The features of `n` messages (`texts` cycled) for Python, stored sparse: a message sets
/// ~140 of the 4,096 features, so the dense rows would be ~30 times larger (3.3 GB for
/// 200,000 items). Per row, little-endian: the count of set features (u32), then that many
/// indices (u32), then their values (f32).
fn write_sparse_features(
    path: &Path,
    f: &shared::features::Featurizer,
    texts: &[String],
    n: usize,
) -> anyhow::Result<()> {
    let mut row = vec![0f32; f.dim()];
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for i in 0..n {
        f.featurize_into(&texts[i % texts.len()], &mut row);
        idx.clear();
        val.clear();
        for (j, &v) in row.iter().enumerate() {
            if v != 0.0 {
                idx.extend_from_slice(&u32::try_from(j)?.to_le_bytes());
                val.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.write_all(&u32::try_from(idx.len() / 4)?.to_le_bytes())?;
        out.write_all(&idx)?;
        out.write_all(&val)?;
    }
    out.flush()?;
    Ok(())
}

/// The texts of the intent model's train, dev and test splits: the benchmarks' messages.
pub fn intent_texts() -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    for split in ["train", "dev", "test"] {
        let p = root().join(format!("models/intent/data/{split}.jsonl"));
        for l in std::fs::read_to_string(&p)?.lines() {
            let v: serde_json::Value = serde_json::from_str(l)?;
            texts.push(v["text"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(texts)
}

/// One `batch-worker run --device cpu` over `input` with `task_args` and `batch` as
/// `batch_flag`, writing `dir/out-{batch}.jsonl`: (items/s, share of wall time in
/// `session.run`, wall seconds with start-up).
pub fn worker_run(
    worker: &Path,
    dir: &Path,
    input: &Path,
    task_args: &[&str],
    batch_flag: &str,
    batch: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let output = dir.join(format!("out-{batch}.jsonl"));
    let _ = std::fs::remove_file(&output);
    let started = Instant::now();
    let out = Command::new(worker)
        .args(["run", "--device", "cpu"])
        .args(task_args)
        .arg(batch_flag)
        .arg(batch.to_string())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&output)
        .env("RUST_LOG", "error")
        .output()?;
    let wall = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "batch-worker run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "...; N items in S s (X items/s, P% inside session.run)"
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    let items_per_s =
        between(&text, "s (", " items/s").with_context(|| format!("unexpected summary: {text}"))?;
    let share = between(&text, "items/s, ", "% inside")
        .with_context(|| format!("unexpected summary: {text}"))?
        / 100.0;
    Ok((items_per_s, share, wall))
}

pub fn between(text: &str, start: &str, end: &str) -> Option<f64> {
    let from = text.rfind(start)? + start.len();
    let to = from + text[from..].find(end)?;
    text[from..to].trim().parse().ok()
}

/// A folder with the pinned `onnxruntime` Python package and numpy (`pip install --target`).
fn python_env(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let ort = format!("onnxruntime=={}", setup::ORT_VERSION);
    pip_target(
        &dir.join("python"),
        &[&ort, "numpy<3"],
        setup::ORT_VERSION,
        "installing onnxruntime and numpy for the Python baseline",
    )
}

/// `pip install --target DIR ARGS` unless DIR's stamp already holds `stamp`.
pub fn pip_target(
    target: &Path,
    args: &[&str],
    stamp: &str,
    what: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let stamp_file = target.join(".stamp");
    if std::fs::read_to_string(&stamp_file).is_ok_and(|v| v == stamp) {
        return Ok(target.to_owned());
    }
    let mut c = Command::new("python3");
    c.args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(target)
        .args(args);
    crate::run_cmd(c).with_context(|| what.to_owned())?;
    std::fs::write(&stamp_file, stamp)?;
    Ok(target.to_owned())
}

/// `n` input lines `{"custom_id": "{prefix}{i}", "input": texts[i % len]}` into `path`.
pub fn write_items<S: AsRef<str>>(
    path: &Path,
    texts: &[S],
    n: usize,
    prefix: &str,
) -> anyhow::Result<()> {
    let mut body = String::new();
    for i in 0..n {
        body.push_str(&serde_json::to_string(&serde_json::json!({
            "custom_id": format!("{prefix}{i}"),
            "input": texts[i % texts.len()].as_ref(),
        }))?);
        body.push('\n');
    }
    std::fs::write(path, body)?;
    Ok(())
}

/// Items/s of Python's `onnxruntime` over the features in micro-batches of `batch`, three
/// ways, in one process (the features are read once): `session.run` alone with ONNX Runtime's
/// default threads (one per core); `session.run` alone with one intra-op thread; and the
/// worker's whole job with the default threads — `session.run`, the routing decision, and the
/// same output lines written to `output`.
fn python_bench(
    py: &Path,
    feats: &Path,
    dim: usize,
    n: usize,
    batch: usize,
    output: &Path,
) -> anyhow::Result<(f64, f64, f64)> {
    // The job is written for speed: the decision is vectorized with numpy, and each line is
    // one `%` format. Its ids are made before the clock starts (the worker reads them from
    // its input), and `json.dumps` escapes them as the worker does.
    let script = r#"
import sys, time, json, os
import numpy as np
import onnxruntime as ort
model, meta, feats, dim, n, batch, out = sys.argv[1:8]
dim, n, batch = int(dim), int(n), int(batch)
raw = np.fromfile(feats, dtype="<u4")
x = np.zeros((n, dim), dtype=np.float32)
at = 0
for r in range(n):
    k = int(raw[at])
    x[r, raw[at + 1:at + 1 + k]] = raw[at + 1 + k:at + 1 + 2 * k].view("<f4")
    at += 1 + 2 * k
assert at == len(raw), "features file has trailing data"

def session(threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: x[:batch]})
    return s, s.get_inputs()[0].name

def bare(threads):
    s, name = session(threads)
    t = time.perf_counter()
    for i in range(0, n, batch):
        s.run(None, {name: x[i:i + batch]})
    return n / (time.perf_counter() - t)

def job():
    s, name = session(0)
    m = json.load(open(meta, encoding="utf-8"))
    labels = [json.dumps(l, ensure_ascii=False) for l in m["labels"]]
    thr = np.array([m["thresholds"].get(l, np.inf) for l in m["labels"]], dtype=np.float32)
    other = m["labels"].index("other")
    routes = ('"queue"', '"edge"')
    ids = ["i%d" % i for i in range(n)]
    dumps = json.dumps
    t = time.perf_counter()
    with open(out, "w", encoding="utf-8") as f:
        for i in range(0, n, batch):
            p = s.run(None, {name: x[i:i + batch]})[0]
            top = p.argmax(axis=1)
            # The policy's confidence: 1 - P(other) for a trivial intent, P(other) for other.
            conf = np.where(top == other, p[:, other], np.float32(1) - p[:, other])
            edge = conf >= thr[top]
            f.write("".join(
                '{"custom_id":%s,"output":{"confidence":%r,"intent":%s,"route":%s}}\n'
                % (dumps(k), c, labels[j], routes[e])
                for k, c, j, e in zip(ids[i:i + batch], conf.tolist(), top.tolist(), edge.tolist())
            ))
        f.flush()
        os.fsync(f.fileno())
    return n / (time.perf_counter() - t)

print(bare(0), bare(1), job())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(root().join("models/intent/model.onnx"))
        .arg(root().join("models/intent/model.json"))
        .arg(feats)
        .arg(dim.to_string())
        .arg(n.to_string())
        .arg(batch.to_string())
        .arg(output)
        .env("PYTHONPATH", py)
        .output()?;
    if !out.status.success() {
        bail!(
            "python baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("python baseline printed {text:?}"))?;
    match numbers[..] {
        [bare, one, job] => Ok((bare, one, job)),
        _ => bail!("python baseline printed {text:?}, not three numbers"),
    }
}

/// Fails unless the two files hold the same bytes, naming the first line that differs.
fn same_lines(ours: &Path, theirs: &Path) -> anyhow::Result<()> {
    let a = std::fs::read(ours).with_context(|| format!("reading {}", ours.display()))?;
    let b = std::fs::read(theirs).with_context(|| format!("reading {}", theirs.display()))?;
    if a == b {
        return Ok(());
    }
    let show = |l: Option<&[u8]>| {
        l.map_or("no such line".to_owned(), |l| {
            format!("{:?}", String::from_utf8_lossy(l))
        })
    };
    let (mut la, mut lb) = (
        a.split_inclusive(|&c| c == b'\n'),
        b.split_inclusive(|&c| c == b'\n'),
    );
    for n in 1.. {
        let (x, y) = (la.next(), lb.next());
        if x.is_none() && y.is_none() {
            break;
        }
        if x != y {
            bail!(
                "{} and {} differ at line {n}: {} against {}; the Python baseline would not be doing the worker's job",
                ours.display(),
                theirs.display(),
                show(x),
                show(y)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_runs() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [0.8]), 0.8);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn same_lines_names_the_first_line_that_differs() {
        let dir = std::env::temp_dir().join(format!("xtask-same-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
        std::fs::write(&a, "{\"x\":1}\n{\"x\":2}\n").expect("write");
        std::fs::write(&b, "{\"x\":1}\n{\"x\":2}\n").expect("write");
        assert!(same_lines(&a, &b).is_ok());

        std::fs::write(&b, "{\"x\":1}\n{\"x\":3}\n").expect("write");
        let e = same_lines(&a, &b).expect_err("differs").to_string();
        assert!(e.contains("line 2:") && e.contains("x\\\":3"), "{e}");

        std::fs::write(&b, "{\"x\":1}\n{\"x\":2}\n{\"x\":4}\n").expect("write");
        let e = same_lines(&a, &b).expect_err("longer").to_string();
        assert!(e.contains("line 3: no such line against"), "{e}");

        std::fs::write(&b, "{\"x\":1}\n{\"x\":2}").expect("write");
        let e = same_lines(&a, &b).expect_err("no last newline").to_string();
        assert!(e.contains("line 2:"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! `cargo xtask train-intent`: trains the edge's intent classifier from the committed data and
//! writes `models/intent/model.onnx` and `models/intent/model.json`.
//!
//! The network is an MLP over the featurizer's hashed n-gram vector:
//! `features[N, B] → Gemm(B→H) → Relu → Gemm(H→C) → Softmax → probs[N, C]`.
//! Training is plain Rust, single-threaded, with a fixed seed: the same data gives the same
//! bytes. Two networks, each trained on train and one half of dev, predict the other half;
//! those cross-fitted predictions calibrate a threshold per trivial intent for the edge's
//! precision targets. The exported network is trained on train and dev together and keeps
//! those thresholds, stored in `model.json` beside the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use prost::Message;
use sha2::{Digest, Sha256};
use shared::features::{Featurizer, FeaturizerConfig};
use shared::intent::{
    ModelMeta, OTHER, Policy, Route, RouteLine, Scoreboard, Scores, TRIVIAL_INTENTS,
    expected_route, reply_fits, top_intent,
};
use shared::rng::SplitMix64;
use tract_onnx::pb;

use crate::root;

#[derive(clap::Args)]
pub struct Args {
    /// Folder with train.jsonl, dev.jsonl and test.jsonl
    #[arg(long, default_value = DATA)]
    data: PathBuf,
    /// Where model.onnx and model.json are written
    #[arg(long, default_value = "models/intent")]
    out: PathBuf,
    /// Exit non-zero if the trained files differ from the ones in --out, and keep them unchanged;
    /// with the default --data, also if that data is not what `generate.py` writes
    #[arg(long)]
    check: bool,
    /// Instead of training the model: regenerate the data with each of these split seeds
    /// (`generate.py --seed`, into target/intent-splits/), train on each and print the dev and
    /// test scores with their mean; nothing under --out changes. Recall at 0.99 precision moves
    /// by several points with the split alone, so compare changes over several seeds
    #[arg(long, value_delimiter = ',', conflicts_with = "check")]
    split_seeds: Vec<u64>,
    /// With --split-seeds: how many seeds are generated and trained at once (training is
    /// single-threaded, so up to one per core; each seed has its own folder). Default: the
    /// number of cores
    #[arg(long, requires = "split_seeds", value_parser = clap::value_parser!(u16).range(1..))]
    jobs: Option<u16>,
    /// With --split-seeds: generate the data with `generate.py --no-anchors` (every seed group
    /// goes to a split at random, so whole families of seeds can be missing from train)
    #[arg(long, requires = "split_seeds")]
    no_anchors: bool,
    /// With --split-seeds: a table an earlier `--split-seeds` run printed (its stdout saved to
    /// a file), to compare with seed by seed: for each column, the mean and standard deviation
    /// of the per-seed differences (this run minus that one) and on how many seeds it rose and
    /// fell. Only the seeds and columns (matched by title) both runs have are compared
    #[arg(long, requires = "split_seeds")]
    baseline: Option<PathBuf>,
    /// Also write the dev predictions the thresholds were calibrated on (each line predicted by
    /// the calibration network that never saw it) to this file, one JSON line per dev line in
    /// `route eval`'s format plus its `label`: the errors to study when editing the seeds,
    /// without looking at test
    #[arg(long, conflicts_with = "split_seeds")]
    dev_report: Option<PathBuf>,
}

impl Args {
    /// Verify the committed model against the committed data (used by `cargo xtask test`).
    pub fn check() -> Self {
        Self {
            data: DATA.into(),
            out: "models/intent".into(),
            check: true,
            split_seeds: Vec::new(),
            jobs: None,
            no_anchors: false,
            baseline: None,
            dev_report: None,
        }
    }
}

/// Labels in model output order.
pub const LABELS: [&str; 6] = ["greeting", "thanks", "goodbye", "help", "identity", OTHER];
const HIDDEN: usize = 32;
const EPOCHS: usize = 30;
/// The exported weights are the running mean of the weights after each epoch from this one
/// on (stochastic weight averaging): better calibrated probabilities, so the thresholds that
/// keep edge precision at 0.99 let more trivial messages through.
const AVERAGE_FROM_EPOCH: usize = 10;
const BATCH: usize = 32;
const LEARNING_RATE: f32 = 0.003;
const WEIGHT_DECAY: f32 = 1e-4;
/// Share of an example's n-grams hidden at each step, so no single gram decides alone.
const INPUT_DROPOUT: f32 = 0.5;
/// Weight of the routing term beside the class term in each example's loss: the edge routes
/// on the probability that a message is trivial at all, so training also fits that directly.
/// Over split seeds 6–29 a weight of 1 gave test recall 0.916 at precision 0.9902 against
/// 0.911 at 0.9900 without the term; 2 gave 0.915 at 0.9904.
const ROUTE_LOSS_WEIGHT: f32 = 1.0;
const SEED: u64 = 0x5eed_2026_1127;
/// What the thresholds are calibrated for on dev's cross-fitted predictions.
#[derive(Clone, Copy, Debug)]
struct Targets {
    /// Edge precision: of the messages the edge answers, the share that should be answered
    /// there (`route eval`'s edge precision).
    route: f64,
    /// Of the messages the edge answers, the share whose reply fits ([`reply_fits`]): a help
    /// question answered with the identity reply is an edge answer but the wrong one.
    reply: f64,
}

impl Targets {
    /// Whether `n` answers, `routed` of them belonging at the edge and `fitting` getting a
    /// fitting reply, meet both targets (no answers meet them).
    fn met_by(&self, n: usize, routed: usize, fitting: usize) -> bool {
        n == 0
            || (routed as f64 >= self.route * n as f64 && fitting as f64 >= self.reply * n as f64)
    }
}

/// The goal is an edge precision of 0.99 on messages no network has seen. Cuts that meet a
/// target just so on dev meet it less well on new messages (they were chosen where dev's
/// mistakes happen to be few): over 24 split seeds, cuts calibrated for 0.99 on dev gave 0.9891
/// on test, and for 0.9915, 0.9900 (dev 0.9917). So dev is held to 0.9915.
const TARGETS: Targets = Targets {
    route: 0.9915,
    reply: 0.97,
};
/// No threshold below this, whatever the dev split says.
const MIN_THRESHOLD: f32 = 0.6;

struct Example {
    /// Sparse features: (bucket, value).
    x: Vec<(u32, f32)>,
    y: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.split_seeds.is_empty() {
        let jobs = args.jobs.map_or_else(crate::cores, usize::from);
        // Read before the sweep's minutes, so a wrong path fails at once.
        let baseline = match &args.baseline {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --baseline {}", path.display()))?;
                let table = parse_sweep_table(&text)
                    .with_context(|| format!("--baseline {}", path.display()))?;
                Some(table)
            }
            None => None,
        };
        return split_seeds(&args.split_seeds, jobs, args.no_anchors, baseline.as_ref());
    }
    let out = root().join(&args.out);
    let data = root().join(&args.data);
    if args.check && data == root().join(DATA) {
        check_data(&data)?;
    }
    let Trained {
        onnx,
        nnef,
        json,
        meta,
    } = train_model(&data, args.dev_report.as_deref())?;

    let onnx_path = out.join("model.onnx");
    let json_path = out.join("model.json");
    let nnef_path = out.join("model.nnef.tar");
    if args.check {
        let same = std::fs::read(&onnx_path).is_ok_and(|b| b == onnx)
            && std::fs::read(&nnef_path).is_ok_and(|b| b == nnef)
            && std::fs::read_to_string(&json_path).is_ok_and(|s| s == json);
        if !same {
            bail!(
                "the committed model differs from what the committed data trains: run `cargo xtask train-intent` and commit"
            );
        }
        eprintln!(
            "committed model matches the training output ({})",
            meta.onnx_sha256
        );
        return Ok(());
    }
    std::fs::create_dir_all(&out)?;
    std::fs::write(&onnx_path, &onnx)?;
    std::fs::write(&nnef_path, &nnef)?;
    std::fs::write(&json_path, json)?;
    eprintln!("wrote {} ({} bytes)", nnef_path.display(), nnef.len());
    eprintln!(
        "wrote {} ({} bytes, sha256 {})",
        onnx_path.display(),
        onnx.len(),
        meta.onnx_sha256
    );
    eprintln!("wrote {}", json_path.display());
    Ok(())
}

/// What one training run produces.
struct Trained {
    onnx: Vec<u8>,
    nnef: Vec<u8>,
    /// `model.json`.
    json: String,
    meta: ModelMeta,
}

/// Trains on `<data>/{train,dev,test}.jsonl` (and `dev.folds`): calibrates on dev's
/// cross-fitted predictions, exports a network trained on train + dev, scores dev (the
/// cross-fitted predictions), test and the challenge set (the exported network).
fn train_model(data: &Path, dev_report: Option<&Path>) -> anyhow::Result<Trained> {
    let featurizer = Featurizer::new(FeaturizerConfig::default())?;
    let load = |name: &str| load_split(&data.join(name), &featurizer);
    let ((train, _), (dev, dev_texts), (test, _)) = (
        load("train.jsonl")?,
        load("dev.jsonl")?,
        load("test.jsonl")?,
    );
    eprintln!(
        "training on {} lines (dev {}, test {})",
        train.len(),
        dev.len(),
        test.len()
    );

    // The thresholds are calibrated on predictions for dev lines by networks that never saw
    // them but saw as much else as possible: dev is cut in two folds by seed group
    // (`dev.folds`), and each fold is predicted by a network trained on train and the other
    // fold (cross-fitting). The exported network is trained on train + dev and keeps those
    // thresholds: dev's seed groups are phrasings train lacks, and more of them is what
    // unseen wordings need.
    let folds = load_folds(&data.join("dev.folds"), dev.len())?;
    let mut dev_probs = vec![Vec::new(); dev.len()];
    for fold in [0u8, 1] {
        eprintln!("calibration network for dev fold {fold}, on train + the other fold:");
        let seen: Vec<&Example> = train
            .iter()
            .chain(
                dev.iter()
                    .zip(&folds)
                    .filter(|(_, f)| **f != fold)
                    .map(|(e, _)| e),
            )
            .collect();
        let net = fit(featurizer.dim(), &seen, None);
        for ((e, f), p) in dev.iter().zip(&folds).zip(&mut dev_probs) {
            if *f == fold {
                *p = net.predict(&e.x);
            }
        }
    }
    let thresholds = calibrate(&dev_probs, &dev);
    eprintln!("exported network, on train + dev:");
    let mlp = fit(
        featurizer.dim(),
        &train.iter().chain(&dev).collect::<Vec<_>>(),
        None,
    );
    let onnx = export_onnx(&mlp, featurizer.config())?;
    let sha = hex::encode(Sha256::digest(&onnx));
    let nnef = onnx_to_nnef(&onnx, featurizer.dim())?;
    let mut meta = ModelMeta {
        name: "intent-mlp".into(),
        labels: LABELS.map(String::from).to_vec(),
        featurizer: featurizer.config(),
        thresholds,
        onnx_sha256: sha,
        nnef_sha256: hex::encode(Sha256::digest(&nnef)),
        input: "features".into(),
        output: "probs".into(),
        metrics: BTreeMap::new(),
    };
    let policy = Policy::new(meta.clone())?;
    if let Some(path) = dev_report {
        write_dev_report(path, &dev_texts, &dev_probs, &dev, &policy)?;
    }
    // Dev is scored with the cross-fitted predictions the thresholds were calibrated on (the
    // exported network was trained on dev); test, seen by none of them, with the exported one.
    let test_probs: Vec<Vec<f32>> = test.iter().map(|e| mlp.predict(&e.x)).collect();
    // The challenge set, written apart from the seeds, is scored by the exported network too:
    // a change to the data or the training that helps test may still hurt phrasings no seed
    // holds, and the split-seed sweep shows it only if it scores them.
    let (challenge, _) = load_split(&root().join(CHALLENGE), &featurizer)?;
    let challenge_probs: Vec<Vec<f32>> = challenge.iter().map(|e| mlp.predict(&e.x)).collect();
    for (name, probs, split) in [
        ("dev", &dev_probs, &dev),
        ("test", &test_probs, &test),
        ("challenge", &challenge_probs, &challenge),
    ] {
        let (s, fit) = route_scores(probs, &policy, split);
        eprintln!(
            "{name}: accuracy {:.4}, edge precision {:.4}, edge recall {:.4}, reply fit {fit:.4}",
            s.accuracy, s.edge_precision, s.edge_recall
        );
        meta.metrics
            .insert(format!("{name}_accuracy"), round4(s.accuracy));
        meta.metrics
            .insert(format!("{name}_edge_precision"), round4(s.edge_precision));
        meta.metrics
            .insert(format!("{name}_edge_recall"), round4(s.edge_recall));
        meta.metrics
            .insert(format!("{name}_reply_fit"), round4(fit));
    }
    let json = serde_json::to_string_pretty(&meta)? + "\n";
    Ok(Trained {
        onnx,
        nnef,
        json,
        meta,
    })
}

/// Trains a network on `train`; `dev`, if given, is only scored in the progress lines.
fn fit(dim: usize, train: &[&Example], dev: Option<&[Example]>) -> Mlp {
    let mut mlp = Mlp::init(dim, HIDDEN, LABELS.len(), SEED);
    let mut rng = SplitMix(SplitMix64(SEED ^ 0xa5a5));
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut adam = Adam::new(&mlp);
    let mut averaged: Option<Mlp> = None;
    for epoch in 0..EPOCHS {
        rng.shuffle(&mut order);
        let mut loss = 0.0f64;
        for batch in order.chunks(BATCH) {
            let mut grad = mlp.zeros_like();
            for &i in batch {
                let dropped = drop_features(train[i], INPUT_DROPOUT, &mut rng);
                loss += mlp.backprop(&dropped, &mut grad) as f64;
            }
            adam.step(&mut mlp, &grad, batch.len());
        }
        if let Some(k) = epoch.checked_sub(AVERAGE_FROM_EPOCH) {
            let mean = averaged.get_or_insert_with(|| mlp.clone());
            let k = k as f32;
            for (m, w) in mean.params_mut().into_iter().zip(mlp.params()) {
                for (m, w) in m.iter_mut().zip(w) {
                    *m = (*m * k + w) / (k + 1.0);
                }
            }
        }
        if epoch % 5 == 4 || epoch + 1 == EPOCHS {
            eprint!(
                "epoch {:>2}: loss {:.4}",
                epoch + 1,
                loss / train.len() as f64
            );
            match dev {
                Some(dev) => eprintln!(", dev accuracy {:.4}", accuracy(&mlp, dev)),
                None => eprintln!(),
            }
        }
    }

    let mlp = averaged.unwrap_or(mlp);
    if let Some(dev) = dev {
        eprintln!(
            "weights averaged over epochs {}..={EPOCHS}: dev accuracy {:.4}",
            AVERAGE_FROM_EPOCH + 1,
            accuracy(&mlp, dev)
        );
    }
    mlp
}

/// `--split-seeds`: the same training over differently split data, `jobs` seeds at a time;
/// scores per seed (in the order given) and their mean.
fn split_seeds(
    seeds: &[u64],
    jobs: usize,
    no_anchors: bool,
    baseline: Option<&SweepTable>,
) -> anyhow::Result<()> {
    let mut unique = seeds.to_vec();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != seeds.len() {
        bail!("--split-seeds names a seed twice; each seed's data has one folder");
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, seeds.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { break };
                    let row = split_seed(seed, no_anchors);
                    let failed = row.is_err();
                    if let Ok(mut r) = results.lock() {
                        r.push((i, row));
                    }
                    if failed {
                        // The others finish the seed they are on; no new ones start.
                        next.store(seeds.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a training thread panicked"))?;
    results.sort_by_key(|(i, _)| *i);
    let mut rows = Vec::new();
    for (i, row) in results {
        // Rounded as printed, so that a run compared with its own saved table differs by 0.
        rows.push((seeds[i], row?.map(round4)));
    }
    let n = rows.len() as f64;
    let mut mean = [0.0; SWEEP_COLUMNS.len()];
    for (_, r) in &rows {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n;
        }
    }
    let titles: Vec<&str> = SWEEP_COLUMNS.iter().map(|(_, title)| *title).collect();
    let line = |seed: &dyn std::fmt::Display, r: &[f64]| {
        let cells: Vec<String> = r.iter().map(|v| format!("{v:.4}")).collect();
        println!("| {seed} | {} |", cells.join(" | "));
    };
    println!("| {SEED_TITLE} | {} |", titles.join(" | "));
    println!("|---|{}", "---:|".repeat(SWEEP_COLUMNS.len()));
    for (seed, r) in &rows {
        line(seed, r);
    }
    line(&"mean", &mean);
    if let Some(baseline) = baseline {
        let this: SweepTable = rows.into_iter().collect();
        print!("\n{}", compare_sweeps(&this, baseline)?);
    }
    Ok(())
}

/// The title of the first column of `--split-seeds`' table, which `--baseline` finds it by.
const SEED_TITLE: &str = "split seed";

/// A `--split-seeds` table: each seed's row of `SWEEP_COLUMNS`.
type SweepTable = BTreeMap<u64, [f64; SWEEP_COLUMNS.len()]>;

/// Reads the table `--split-seeds` prints (other lines around it, such as a log's, are
/// skipped). Columns are matched by title, so a table from a build with fewer or other
/// columns still compares on the ones both have; a column it lacks reads as NaN.
fn parse_sweep_table(text: &str) -> anyhow::Result<SweepTable> {
    let cells = |line: &str| -> Vec<String> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split('|').map(|c| c.trim().to_string()).collect()
    };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    let start = format!("| {SEED_TITLE} |");
    let Some((_, header)) = lines.find(|(_, l)| l.starts_with(&start)) else {
        bail!("no `--split-seeds` table (a line starting with `{start}`)");
    };
    // For each of the table's columns, its place in SWEEP_COLUMNS, if this build has it.
    let places: Vec<Option<usize>> = cells(header)
        .iter()
        .skip(1)
        .map(|title| SWEEP_COLUMNS.iter().position(|(_, t)| t == title))
        .collect();
    if places.iter().all(Option::is_none) {
        bail!("the table has none of the columns this build prints");
    }
    let mut table = SweepTable::new();
    for (n, line) in lines.filter(|(_, l)| l.starts_with('|') && !l.starts_with("|---")) {
        let row_cells = cells(line);
        let Some((seed, values)) = row_cells.split_first() else {
            continue;
        };
        if seed == "mean" {
            return Ok(table);
        }
        if values.len() != places.len() {
            bail!(
                "line {n}: expected a seed and {} numbers, as in the header",
                places.len()
            );
        }
        let seed: u64 = seed
            .parse()
            .with_context(|| format!("line {n}: split seed {seed:?}"))?;
        let mut row = [f64::NAN; SWEEP_COLUMNS.len()];
        for (place, cell) in places.iter().zip(values) {
            let v: f64 = cell
                .parse()
                .with_context(|| format!("line {n}: number {cell:?}"))?;
            if let Some(&i) = place.as_ref() {
                row[i] = v;
            }
        }
        if table.insert(seed, row).is_some() {
            bail!("line {n}: split seed {seed} twice");
        }
    }
    bail!("the table has no `mean` row: it is cut short")
}

/// The paired comparison `--baseline` prints: over the seeds both tables have, per column,
/// the mean and standard deviation (n − 1) of `this − baseline`, and how many seeds rose and
/// fell. A column the baseline lacks (NaN: an older build's table) is left out.
fn compare_sweeps(this: &SweepTable, baseline: &SweepTable) -> anyhow::Result<String> {
    let pairs: Vec<_> = this
        .iter()
        .filter_map(|(seed, r)| baseline.get(seed).map(|b| (r, b)))
        .collect();
    if pairs.is_empty() {
        bail!("--baseline has none of this run's split seeds");
    }
    let mut out = format!(
        "Against --baseline, paired over {} split seed{} (this run minus the baseline):\n\n",
        pairs.len(),
        if pairs.len() == 1 { "" } else { "s" }
    );
    out += "| column | baseline mean | this mean | mean difference | sd of differences | seeds up | seeds down |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|\n";
    let mut left_out = Vec::new();
    for (c, (_, title)) in SWEEP_COLUMNS.iter().enumerate() {
        let both: Vec<(f64, f64)> = pairs
            .iter()
            .map(|(r, b)| (r[c], b[c]))
            .filter(|(r, b)| !r.is_nan() && !b.is_nan())
            .collect();
        if both.is_empty() {
            left_out.push(*title);
            continue;
        }
        let n = both.len() as f64;
        let diffs: Vec<f64> = both.iter().map(|(r, b)| r - b).collect();
        let mean = diffs.iter().sum::<f64>() / n;
        // One seed has no spread to show.
        let sd = if both.len() > 1 {
            let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
            format!("{:.4}", var.sqrt())
        } else {
            "–".to_string()
        };
        // A mean that rounds to zero prints as +0.0000, not -0.0000.
        let shown = if mean.abs() < 5e-5 { 0.0 } else { mean };
        let up = diffs.iter().filter(|&&d| d > 0.0).count();
        let down = diffs.iter().filter(|&&d| d < 0.0).count();
        let base_mean = both.iter().map(|(_, b)| b).sum::<f64>() / n;
        let this_mean = both.iter().map(|(r, _)| r).sum::<f64>() / n;
        out += &format!(
            "| {title} | {base_mean:.4} | {this_mean:.4} | {shown:+.4} | {sd} | {up} | {down} |\n"
        );
    }
    if !left_out.is_empty() {
        out += &format!("\nNot in the baseline: {}.\n", left_out.join(", "));
    }
    Ok(out)
}

/// The columns of `--split-seeds`' table: a metric `train_model` writes into `model.json`, and
/// its title.
const SWEEP_COLUMNS: [(&str, &str); 9] = [
    ("dev_edge_precision", "dev precision"),
    ("dev_edge_recall", "dev recall"),
    ("test_edge_precision", "test precision"),
    ("test_edge_recall", "test recall"),
    ("test_accuracy", "test accuracy"),
    ("test_reply_fit", "test reply fit"),
    ("challenge_edge_precision", "challenge precision"),
    ("challenge_edge_recall", "challenge recall"),
    ("challenge_reply_fit", "challenge reply fit"),
];

/// The committed data's folder, relative to the repository.
const DATA: &str = "models/intent/data";
/// The challenge set (messages written apart from the seeds), relative to the repository.
const CHALLENGE: &str = "models/intent/challenge.jsonl";
/// The data's generator, relative to the repository.
const GENERATOR: &str = "models/intent/generate.py";
/// The files `generate.py` writes into its `--out` folder.
const DATA_FILES: [&str; 4] = ["train.jsonl", "dev.jsonl", "test.jsonl", "dev.folds"];

/// Runs the generator `script` (`models/intent/generate.py`, or a copy of it beside other
/// seeds) into `dir`, with `--seed` and `--no-anchors` when given.
fn generate(script: &Path, dir: &Path, seed: Option<u64>, no_anchors: bool) -> anyhow::Result<()> {
    let mut c = std::process::Command::new("python3");
    c.arg(script).arg("--out").arg(dir);
    if let Some(seed) = seed {
        c.arg("--seed").arg(seed.to_string());
    }
    let status = c
        .args(no_anchors.then_some("--no-anchors"))
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running python3 {}", script.display()))?;
    if !status.success() {
        let seed = seed.map_or_else(String::new, |s| format!(" --seed {s}"));
        bail!("{}{seed} failed ({status})", script.display());
    }
    Ok(())
}

/// Fails unless the committed data is what the generator writes from the committed seeds.
fn check_data(data: &Path) -> anyhow::Result<()> {
    let dir = root().join("target/intent-check");
    generate(&root().join(GENERATOR), &dir, None, false)?;
    for file in DATA_FILES {
        let committed =
            std::fs::read(data.join(file)).with_context(|| format!("reading {DATA}/{file}"))?;
        if std::fs::read(dir.join(file))? != committed {
            bail!(
                "{DATA}/{file} differs from what models/intent/generate.py writes from the seeds: run `python3 models/intent/generate.py`, then `cargo xtask train-intent`, and commit"
            );
        }
    }
    eprintln!("committed data matches models/intent/generate.py's output");
    Ok(())
}

/// One seed of `--split-seeds`: its data generated into `target/intent-splits/{seed}`, a model
/// trained on it (nothing is written), and its dev, test and challenge-set scores.
fn split_seed(seed: u64, no_anchors: bool) -> anyhow::Result<[f64; SWEEP_COLUMNS.len()]> {
    let dir = root().join(format!("target/intent-splits/{seed}"));
    generate(&root().join(GENERATOR), &dir, Some(seed), no_anchors)?;
    eprintln!("split seed {seed}: training");
    let metrics = train_model(&dir, None)
        .with_context(|| format!("split seed {seed}"))?
        .meta
        .metrics;
    Ok(SWEEP_COLUMNS.map(|(key, _)| metrics.get(key).copied().unwrap_or(f64::NAN)))
}

/// The ONNX model as tract sees it after decluttering, written as a deterministic NNEF tar.
fn onnx_to_nnef(onnx_bytes: &[u8], dim: usize) -> anyhow::Result<Vec<u8>> {
    use tract_onnx::prelude::*;
    let typed = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(onnx_bytes))?
        .with_input_fact(0, f32::fact([1, dim]).into())?
        .into_typed()?
        .into_decluttered()?;
    // Plain NNEF only (no `tract_core` extension): the edge loads it with the standard
    // registry alone, which keeps tract's other operators (FFT, …) out of the Worker.
    let mut typed = typed;
    typed.properties.clear();
    let bytes = tract_nnef::nnef()
        .without_tract_core()
        .write_to_tar_with_config(&typed, Vec::new(), false, true)?;
    Ok(bytes)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The examples of a split file and, line for line, their texts.
fn load_split(path: &Path, featurizer: &Featurizer) -> anyhow::Result<(Vec<Example>, Vec<String>)> {
    #[derive(serde::Deserialize)]
    struct Line {
        text: String,
        intent: String,
    }
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (generate it with `python3 models/intent/generate.py`)",
            path.display()
        )
    })?;
    let (mut out, mut texts) = (Vec::new(), Vec::new());
    let mut dense = vec![0.0; featurizer.dim()];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: Line =
            serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        let y = LABELS
            .iter()
            .position(|&x| x == l.intent)
            .with_context(|| {
                format!(
                    "{}:{}: unknown intent {:?}",
                    path.display(),
                    i + 1,
                    l.intent
                )
            })?;
        featurizer.featurize_into(&l.text, &mut dense);
        let x = dense
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(j, v)| (j as u32, *v))
            .collect();
        out.push(Example { x, y });
        texts.push(l.text);
    }
    Ok((out, texts))
}

/// `ex` with each feature dropped with probability `rate` (the rest scaled up to keep the mean).
fn drop_features(ex: &Example, rate: f32, rng: &mut SplitMix) -> Example {
    if rate <= 0.0 {
        return Example {
            x: ex.x.clone(),
            y: ex.y,
        };
    }
    let keep = 1.0 - rate;
    let x =
        ex.x.iter()
            .filter(|_| (rng.uniform() + 1.0) / 2.0 >= rate)
            .map(|&(k, v)| (k, v / keep))
            .collect();
    Example { x, y: ex.y }
}

/// Deterministic PRNG (SplitMix64) with what training draws from it.
struct SplitMix(SplitMix64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The network's parameters (also used for gradients and optimizer moments).
#[derive(Clone)]
pub struct Mlp {
    input: usize,
    hidden: usize,
    classes: usize,
    /// [input × hidden], row-major.
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// [hidden × classes], row-major.
    w2: Vec<f32>,
    b2: Vec<f32>,
}

impl Mlp {
    fn init(input: usize, hidden: usize, classes: usize, seed: u64) -> Self {
        let mut rng = SplitMix(SplitMix64(seed));
        let a1 = (6.0 / (16.0 + hidden as f32)).sqrt(); // ~16 active inputs per message
        let a2 = (6.0 / (hidden + classes) as f32).sqrt();
        Self {
            input,
            hidden,
            classes,
            w1: (0..input * hidden).map(|_| rng.uniform() * a1).collect(),
            b1: vec![0.0; hidden],
            w2: (0..hidden * classes).map(|_| rng.uniform() * a2).collect(),
            b2: vec![0.0; classes],
        }
    }

    fn zeros_like(&self) -> Self {
        Self {
            w1: vec![0.0; self.w1.len()],
            b1: vec![0.0; self.b1.len()],
            w2: vec![0.0; self.w2.len()],
            b2: vec![0.0; self.b2.len()],
            ..*self
        }
    }

    fn params_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2]
    }

    fn params(&self) -> [&Vec<f32>; 4] {
        [&self.w1, &self.b1, &self.w2, &self.b2]
    }

    /// Hidden pre-activations and output probabilities.
    fn forward(&self, x: &[(u32, f32)]) -> (Vec<f32>, Vec<f32>) {
        let mut h = self.b1.clone();
        for &(k, v) in x {
            let row = &self.w1[k as usize * self.hidden..][..self.hidden];
            h.iter_mut().zip(row).for_each(|(h, w)| *h += v * w);
        }
        let mut logits = self.b2.clone();
        for (j, &hj) in h.iter().enumerate() {
            let a = hj.max(0.0);
            if a != 0.0 {
                let row = &self.w2[j * self.classes..][..self.classes];
                logits.iter_mut().zip(row).for_each(|(l, w)| *l += a * w);
            }
        }
        (h, softmax(&logits))
    }

    /// Adds this example's gradient to `g`; returns its loss.
    fn backprop(&self, ex: &Example, g: &mut Mlp) -> f32 {
        let (h, p) = self.forward(&ex.x);
        let mut dl = p.clone();
        dl[ex.y] -= 1.0;
        // The routing term: −ln P(route), P(route) being 1 − P(other) for a trivial example
        // and P(other) for `other` (the class is the last), the probability the policy routes
        // on ([`top_intent`]). Its gradient on logit k: p_k − 1 for `other` (as the class term);
        // for a trivial example p_k − p_k / S on a trivial k and p_other on `other`, S the
        // trivial mass.
        let other = self.classes - 1;
        let route_p = if ex.y == other {
            for (k, d) in dl.iter_mut().enumerate() {
                *d += ROUTE_LOSS_WEIGHT * (p[k] - f32::from(u8::from(k == other)));
            }
            p[other]
        } else {
            let trivial: f32 = p[..other].iter().sum::<f32>().max(1e-12);
            for (k, d) in dl.iter_mut().enumerate() {
                let own = if k == other { 0.0 } else { p[k] / trivial };
                *d += ROUTE_LOSS_WEIGHT * (p[k] - own);
            }
            trivial
        };
        let mut dh = vec![0.0f32; self.hidden];
        for j in 0..self.hidden {
            let a = h[j].max(0.0);
            let row = &self.w2[j * self.classes..][..self.classes];
            let grow = &mut g.w2[j * self.classes..][..self.classes];
            for c in 0..self.classes {
                grow[c] += a * dl[c];
                dh[j] += row[c] * dl[c];
            }
            if h[j] <= 0.0 {
                dh[j] = 0.0;
            }
        }
        g.b2.iter_mut().zip(&dl).for_each(|(g, d)| *g += d);
        g.b1.iter_mut().zip(&dh).for_each(|(g, d)| *g += d);
        for &(k, v) in &ex.x {
            let grow = &mut g.w1[k as usize * self.hidden..][..self.hidden];
            grow.iter_mut().zip(&dh).for_each(|(g, d)| *g += v * d);
        }
        -p[ex.y].max(1e-12).ln() - ROUTE_LOSS_WEIGHT * route_p.max(1e-12).ln()
    }

    pub fn predict(&self, x: &[(u32, f32)]) -> Vec<f32> {
        self.forward(x).1
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

struct Adam {
    m: Mlp,
    v: Mlp,
    t: i32,
}

impl Adam {
    fn new(p: &Mlp) -> Self {
        Self {
            m: p.zeros_like(),
            v: p.zeros_like(),
            t: 0,
        }
    }

    fn step(&mut self, p: &mut Mlp, g: &Mlp, n: usize) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t += 1;
        let (c1, c2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
        let scale = 1.0 / n as f32;
        let (wd, lr) = (WEIGHT_DECAY, LEARNING_RATE);
        let grads = g.params();
        let ms = self.m.params_mut();
        let vs = self.v.params_mut();
        for (((p, g), m), v) in p.params_mut().into_iter().zip(grads).zip(ms).zip(vs) {
            for i in 0..p.len() {
                let gi = g[i] * scale + wd * p[i];
                m[i] = B1 * m[i] + (1.0 - B1) * gi;
                v[i] = B2 * v[i] + (1.0 - B2) * gi * gi;
                p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
            }
        }
    }
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > p[best] { i } else { best })
}

fn accuracy(mlp: &Mlp, split: &[Example]) -> f64 {
    let ok = split
        .iter()
        .filter(|e| argmax(&mlp.predict(&e.x)) == e.y)
        .count();
    ok as f64 / split.len().max(1) as f64
}

/// A threshold per trivial intent, from the dev split's cross-fitted probabilities: see
/// [`thresholds`].
fn calibrate(probs: &[Vec<f32>], dev: &[Example]) -> BTreeMap<String, f32> {
    let preds: Vec<(usize, f32, usize)> = probs
        .iter()
        .zip(dev)
        .filter_map(|(p, e)| {
            // LABELS ends with OTHER.
            let (k, confidence) = top_intent(p, LABELS.len() - 1)?;
            Some((k, confidence, e.y))
        })
        .collect();
    thresholds(&preds, TARGETS)
}

/// [`calibrate`] over `(predicted label, its confidence, true label)` triples, the
/// confidence being [`top_intent`]'s, which the policy compares with the thresholds.
///
/// The thresholds are chosen together, for the edge's answers as a whole: one intent may
/// answer at a lower cut when another's mistakes are rarer. A price `λ` is put on the shortfall
/// of both precisions (each answer adds `route_ok − targets.route` and `reply_ok −
/// targets.reply`, times `λ`, to the one right answer it may be); each intent takes the cut
/// that maximises its sum, and `λ` rises from nearly free until the cuts together meet both
/// targets on dev. Those cuts may meet them with room to spare (a small rise of `λ` can lift
/// a cut past many answers at once): [`refine`] then lowers them while the targets still hold.
/// No threshold is below [`MIN_THRESHOLD`]; an intent with no cut worth taking gets 1.0 (the
/// edge leaves it to the queue).
fn thresholds(preds: &[(usize, f32, usize)], targets: Targets) -> BTreeMap<String, f32> {
    let trivial: Vec<(usize, &str)> = LABELS
        .iter()
        .enumerate()
        .filter(|(_, n)| TRIVIAL_INTENTS.contains(n))
        .map(|(c, n)| (c, *n))
        .collect();
    // Per intent, its answers from the most confident down: (p, route right, reply right).
    let answers: Vec<Vec<(f32, bool, bool)>> = trivial
        .iter()
        .map(|&(c, name)| {
            let mut mine: Vec<(f32, bool, bool)> = preds
                .iter()
                .filter(|(k, ..)| *k == c)
                .map(|&(_, p, y)| (p, LABELS[y] != OTHER, reply_fits(name, LABELS[y])))
                .collect();
            mine.sort_by(|a, b| b.0.total_cmp(&a.0));
            mine
        })
        .collect();
    let steps = cut_steps(&answers);
    let meets = |cuts: &[f32]| {
        let [n, routed, fitting] = totals(&steps, &positions(&steps, cuts));
        targets.met_by(n, routed, fitting)
    };
    let mut cuts = vec![1.0f32; trivial.len()];
    let mut lambda = 0.01f64;
    while lambda < 1e6 {
        cuts = answers
            .iter()
            .map(|mine| best_cut(mine, lambda, targets))
            .collect();
        if meets(&cuts) {
            break;
        }
        cuts = vec![1.0; trivial.len()];
        lambda *= 1.05;
    }
    let cuts = refine(&steps, &cuts, targets);
    trivial
        .iter()
        .zip(cuts)
        .map(|(&(_, name), cut)| (name.to_owned(), cut))
        .collect()
}

/// Per intent of `answers` (each sorted by falling confidence), the cuts it may take from the
/// top down, none below [`MIN_THRESHOLD`], each with the answers (n, routed right, fitting) at
/// or above it; entry 0, at 1.0, is no answers at all.
fn cut_steps(answers: &[Vec<(f32, bool, bool)>]) -> Vec<Vec<(f32, [usize; 3])>> {
    answers
        .iter()
        .map(|mine| {
            let mut v = vec![(1.0f32, [0usize; 3])];
            let mut acc = [0usize; 3];
            for (i, &(p, route_ok, reply_ok)) in mine.iter().enumerate() {
                if p < MIN_THRESHOLD {
                    break;
                }
                acc[0] += 1;
                acc[1] += usize::from(route_ok);
                acc[2] += usize::from(reply_ok);
                if mine.get(i + 1).is_none_or(|next| next.0 != p) {
                    v.push((p, acc));
                }
            }
            v
        })
        .collect()
}

/// Per intent, the last of its [`cut_steps`] at or above its cut.
fn positions(steps: &[Vec<(f32, [usize; 3])>], cuts: &[f32]) -> Vec<usize> {
    steps
        .iter()
        .zip(cuts)
        .map(|(s, &c)| s.iter().rposition(|(p, _)| *p >= c).unwrap_or(0))
        .collect()
}

/// The answers (n, routed right, fitting) of all intents at step `at` of each.
fn totals(steps: &[Vec<(f32, [usize; 3])>], at: &[usize]) -> [usize; 3] {
    let mut t = [0usize; 3];
    for (s, &k) in steps.iter().zip(at) {
        for (t, v) in t.iter_mut().zip(s[k].1) {
            *t += v;
        }
    }
    t
}

/// Lowers `cuts` (one per intent of `steps`, from [`cut_steps`]) while both targets still
/// hold: each step takes the one lower cut, of any intent, that adds the most right answers,
/// until none adds any. A cut only moves onto an answer, never below [`MIN_THRESHOLD`].
fn refine(steps: &[Vec<(f32, [usize; 3])>], cuts: &[f32], targets: Targets) -> Vec<f32> {
    let start = positions(steps, cuts);
    let mut at = start.clone();
    loop {
        let base = totals(steps, &at)[1];
        let mut best: Option<(usize, usize, usize)> = None;
        for i in 0..steps.len() {
            for k in at[i] + 1..steps[i].len() {
                let mut next = at.clone();
                next[i] = k;
                let t = totals(steps, &next);
                if targets.met_by(t[0], t[1], t[2])
                    && t[1] > base
                    && best.is_none_or(|(g, ..)| t[1] - base > g)
                {
                    best = Some((t[1] - base, i, k));
                }
            }
        }
        let Some((_, i, k)) = best else { break };
        at[i] = k;
    }
    // An intent refining did not move keeps its cut, which may lie between two answers.
    (0..steps.len())
        .map(|i| {
            if at[i] == start[i] {
                cuts[i]
            } else {
                steps[i][at[i]].0
            }
        })
        .collect()
}

/// The cut through `mine` (sorted by falling probability) that maximises its right answers
/// plus `lambda` times its precision surplus; only between answers of different probability,
/// never below [`MIN_THRESHOLD`]; 1.0 when no cut gains anything.
fn best_cut(mine: &[(f32, bool, bool)], lambda: f64, targets: Targets) -> f32 {
    let (mut gain, mut best, mut cut) = (0.0f64, 0.0f64, 1.0f32);
    for (i, &(p, route_ok, reply_ok)) in mine.iter().enumerate() {
        gain += f64::from(u8::from(route_ok))
            + lambda
                * (f64::from(u8::from(route_ok)) - targets.route + f64::from(u8::from(reply_ok))
                    - targets.reply);
        let tie_follows = mine.get(i + 1).is_some_and(|next| next.0 == p);
        if !tie_follows && gain > best {
            (best, cut) = (gain, p);
        }
    }
    cut.max(MIN_THRESHOLD)
}

/// `route eval`'s scores of a split, and its reply fit: of the messages the edge answers, the
/// share whose reply fits ([`reply_fits`]; never for a message that belongs in the queue),
/// which is what a user sees of both kinds of wrong canned reply, the one a request gets and
/// the one a trivial message of another intent gets. The same share is `Targets::reply` on
/// dev; 1.0 when the edge answers nothing. One pass, one decision per line.
fn route_scores(probs: &[Vec<f32>], policy: &Policy, split: &[Example]) -> (Scores, f64) {
    let mut board = Scoreboard::default();
    let (mut answered, mut fitting) = (0u64, 0u64);
    for (p, e) in probs.iter().zip(split) {
        let (intent, _, route) = policy.decide_label(p);
        board.add(route, expected_route(LABELS[e.y]));
        if route == Route::Edge {
            answered += 1;
            fitting += u64::from(reply_fits(intent, LABELS[e.y]));
        }
    }
    let fit = if answered == 0 {
        1.0
    } else {
        fitting as f64 / answered as f64
    };
    (board.scores(), fit)
}

/// `--dev-report`: each dev line with its cross-fitted prediction and the route the thresholds
/// give it, in `route eval`'s line format plus the line's `label`.
fn write_dev_report(
    out: &Path,
    texts: &[String],
    probs: &[Vec<f32>],
    dev: &[Example],
    policy: &Policy,
) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        #[serde(flatten)]
        line: RouteLine<'a>,
        label: &'a str,
    }
    let mut buf = Vec::new();
    for ((text, p), e) in texts.iter().zip(probs).zip(dev) {
        let d = policy.decide(p);
        serde_json::to_writer(
            &mut buf,
            &Out {
                line: RouteLine {
                    text,
                    decision: &d,
                    expected: Some(expected_route(LABELS[e.y])),
                },
                label: LABELS[e.y],
            },
        )?;
        buf.push(b'\n');
    }
    std::fs::write(out, buf).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({} dev lines)", out.display(), dev.len());
    Ok(())
}

/// `dev.folds`: the calibration fold (0 or 1) of each line of `dev.jsonl`, one per line.
fn load_folds(path: &Path, lines: usize) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (generate it with `python3 models/intent/generate.py`)",
            path.display()
        )
    })?;
    let folds = text
        .lines()
        .enumerate()
        .map(|(i, l)| match l.trim() {
            "0" => Ok(0),
            "1" => Ok(1),
            other => bail!("{}:{}: fold {other:?} is not 0 or 1", path.display(), i + 1),
        })
        .collect::<anyhow::Result<Vec<u8>>>()?;
    if folds.len() != lines {
        bail!(
            "{} has {} lines but dev.jsonl has {lines}: regenerate both with `python3 models/intent/generate.py`",
            path.display(),
            folds.len()
        );
    }
    Ok(folds)
}

fn export_onnx(mlp: &Mlp, featurizer: FeaturizerConfig) -> anyhow::Result<Vec<u8>> {
    use pb::tensor_shape_proto::{Dimension, dimension};
    let float = pb::tensor_proto::DataType::Float as i32;
    let tensor = |name: &str, dims: &[usize], data: &[f32]| pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: float,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    let value = |name: &str, width: usize| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: float,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(dimension::Value::DimParam("batch".into())),
                            ..Default::default()
                        },
                        Dimension {
                            value: Some(dimension::Value::DimValue(width as i64)),
                            ..Default::default()
                        },
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node =
        |op: &str, inputs: &[&str], output: &str, attrs: Vec<pb::AttributeProto>| pb::NodeProto {
            op_type: op.into(),
            name: output.into(),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.into()],
            attribute: attrs,
            ..Default::default()
        };
    let axis = pb::AttributeProto {
        name: "axis".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "intent".into(),
        node: vec![
            node("Gemm", &["features", "w1", "b1"], "hidden", vec![]),
            node("Relu", &["hidden"], "relu", vec![]),
            node("Gemm", &["relu", "w2", "b2"], "logits", vec![]),
            node("Softmax", &["logits"], "probs", vec![axis]),
        ],
        initializer: vec![
            tensor("w1", &[mlp.input, mlp.hidden], &mlp.w1),
            tensor("b1", &[mlp.hidden], &mlp.b1),
            tensor("w2", &[mlp.hidden, mlp.classes], &mlp.w2),
            tensor("b2", &[mlp.classes], &mlp.b2),
        ],
        input: vec![value("features", mlp.input)],
        output: vec![value("probs", mlp.classes)],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "cheap-serve xtask train-intent".into(),
        model_version: 1,
        doc_string: "Intent classifier for the edge: hashed n-gram features → MLP → softmax".into(),
        graph: Some(graph),
        metadata_props: vec![
            pb::StringStringEntryProto {
                key: "labels".into(),
                value: serde_json::to_string(&LABELS)?,
            },
            pb::StringStringEntryProto {
                key: "featurizer".into(),
                value: serde_json::to_string(&featurizer)?,
            },
        ],
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets the cases below are worked out for: a 99 % edge precision.
    const GOAL: Targets = Targets {
        route: 0.99,
        reply: 0.97,
    };

    fn label(name: &str) -> usize {
        LABELS.iter().position(|&l| l == name).expect("a label")
    }

    const COLUMNS: usize = SWEEP_COLUMNS.len();

    /// A `--split-seeds` table as printed, between log lines, with these column titles and
    /// rows.
    fn sweep_output(titles: &[&str], rows: &[(u64, Vec<f64>)]) -> String {
        let mut out = format!(
            "split seed 6: training\n| {SEED_TITLE} | {} |\n|---|{}\n",
            titles.join(" | "),
            "---:|".repeat(titles.len())
        );
        for (seed, r) in rows {
            let cells: Vec<String> = r.iter().map(|v| format!("{v:.4}")).collect();
            out += &format!("| {seed} | {} |\n", cells.join(" | "));
        }
        out + &format!(
            "| mean |{}\ntrailing log line\n",
            " 0 |".repeat(titles.len())
        )
    }

    fn this_builds_titles() -> Vec<&'static str> {
        SWEEP_COLUMNS.iter().map(|(_, t)| *t).collect()
    }

    /// A row of this build's columns, `test recall` (column 3) set to `recall`.
    fn row(recall: f64) -> Vec<f64> {
        let mut r = vec![0.9; COLUMNS];
        r[3] = recall;
        r
    }

    fn array(r: Vec<f64>) -> [f64; COLUMNS] {
        r.try_into().expect("one value per column")
    }

    #[test]
    fn a_saved_sweep_table_reads_back_and_pairs_by_seed() {
        let titles = this_builds_titles();
        let rows = [(6, row(0.90)), (7, row(0.89)), (8, row(0.90))];
        let base = parse_sweep_table(&sweep_output(&titles, &rows)).expect("parses");
        assert_eq!(base.len(), 3);
        assert_eq!(base[&7][3], 0.89);
        // Against itself every difference is 0: nothing rose, nothing fell.
        let same = compare_sweeps(&base, &base).expect("compares");
        assert!(
            same.contains("| test recall | 0.8967 | 0.8967 | +0.0000 | 0.0000 | 0 | 0 |"),
            "{same}"
        );
        assert!(!same.contains("Not in the baseline"), "{same}");
        // Seed 9 is not in the baseline and is left out; 6 rose by 0.02 recall, 7 fell by 0.01.
        let mut this = SweepTable::new();
        this.insert(6, array(row(0.92)));
        this.insert(7, array(row(0.88)));
        this.insert(9, [0.0; COLUMNS]);
        let base: SweepTable = base.into_iter().filter(|(s, _)| *s != 8).collect();
        let cmp = compare_sweeps(&this, &base).expect("compares");
        assert!(cmp.contains("paired over 2 split seeds"), "{cmp}");
        // Differences +0.02 and −0.01: mean +0.005, sd sqrt(2 × 0.015²) = 0.0212.
        assert!(
            cmp.contains("| test recall | 0.8950 | 0.9000 | +0.0050 | 0.0212 | 1 | 1 |"),
            "{cmp}"
        );
    }

    #[test]
    fn an_older_table_compares_on_the_columns_it_has() {
        // An older build's table: no reply-fit columns, and one this build does not print.
        let titles = [
            "dev precision",
            "test recall",
            "challenge f1",
            "challenge precision",
        ];
        let old = sweep_output(&titles, &[(6, vec![0.99, 0.88, 0.5, 0.80])]);
        let base = parse_sweep_table(&old).expect("parses");
        assert_eq!(base[&6][0], 0.99);
        assert_eq!(base[&6][3], 0.88);
        assert!(
            base[&6][5].is_nan(),
            "a column the table lacks reads as NaN"
        );
        let mut this = SweepTable::new();
        this.insert(6, array(row(0.90)));
        let cmp = compare_sweeps(&this, &base).expect("compares");
        assert!(
            cmp.contains("| test recall | 0.8800 | 0.9000 | +0.0200 | – | 1 | 0 |"),
            "{cmp}"
        );
        assert!(!cmp.contains("| test reply fit |"), "{cmp}");
        assert!(
            cmp.contains("Not in the baseline: dev recall, test precision, test accuracy, test reply fit, challenge recall, challenge reply fit."),
            "{cmp}"
        );
    }

    #[test]
    fn a_sweep_table_that_cannot_be_compared_is_refused() {
        let titles = this_builds_titles();
        let full = sweep_output(&titles, &[(6, vec![0.5; COLUMNS])]);
        // No column this build knows.
        let none = sweep_output(&["f1", "auc"], &[(6, vec![0.5, 0.5])]);
        let err = parse_sweep_table(&none)
            .expect_err("no known column")
            .to_string();
        assert!(err.contains("none of the columns"), "{err}");
        // No table at all.
        assert!(parse_sweep_table("epoch 15: loss 0.16\n").is_err());
        // Cut short before its mean row.
        let cut = &full[..full.find("| mean").expect("a mean row")];
        let err = parse_sweep_table(cut).expect_err("no mean row").to_string();
        assert!(err.contains("cut short"), "{err}");
        // A cell that is not a number names its line.
        let bad = full.replace("| 6 | 0.5000", "| 6 | n/a");
        let err = format!("{:#}", parse_sweep_table(&bad).expect_err("not a number"));
        assert!(err.contains("line 4") && err.contains("n/a"), "{err}");
        // A row with a cell missing.
        let short = full.replace("| 6 | 0.5000 |", "| 6 |");
        let err = parse_sweep_table(&short)
            .expect_err("a cell short")
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        // A seed twice.
        let twice = sweep_output(&titles, &[(6, vec![0.5; COLUMNS]), (6, vec![0.6; COLUMNS])]);
        assert!(parse_sweep_table(&twice).is_err());
        // No seed in common.
        let a = parse_sweep_table(&full).expect("parses");
        let b =
            parse_sweep_table(&sweep_output(&titles, &[(7, vec![0.5; COLUMNS])])).expect("parses");
        assert!(compare_sweeps(&a, &b).is_err());
    }

    /// 300 right `thanks` answers from 0.99 down to 0.70, plus `extra`.
    fn thanks_threshold(extra: &[(f32, &str)]) -> f32 {
        let thanks = label("thanks");
        let mut preds: Vec<_> = (0..300)
            .map(|i| (thanks, 0.99 - i as f32 * 0.001, thanks))
            .collect();
        preds.extend(extra.iter().map(|&(p, y)| (thanks, p, label(y))));
        thresholds(&preds, GOAL)["thanks"]
    }

    #[test]
    fn queued_messages_read_as_thanks_raise_the_threshold() {
        assert!((thanks_threshold(&[]) - 0.691).abs() < 1e-4);
        // Three mistakes at 0.7505 keep 99 % of the 303 answers right: the cut stays.
        let three = thanks_threshold(&[(0.7505, OTHER); 3]);
        assert!((three - 0.691).abs() < 1e-4, "{three}");
        // Five do not (300 of 305): the cut moves above them, to the 240th right answer.
        let raised = thanks_threshold(&[(0.7505, OTHER); 5]);
        assert!((raised - 0.751).abs() < 1e-4, "{raised}");
    }

    #[test]
    fn farewells_read_as_thanks_do_not() {
        let clean = thanks_threshold(&[]);
        assert_eq!(thanks_threshold(&[(0.7505, "goodbye"); 10]), clean);
        // Another trivial intent's message belongs at the edge, but the thanks reply does not
        // fit it: 3 % of such answers pass (5 of 305), more (10 of 310) raise the cut.
        assert_eq!(thanks_threshold(&[(0.7505, "greeting"); 5]), clean);
        let greetings = thanks_threshold(&[(0.7505, "greeting"); 10]);
        assert!((greetings - 0.751).abs() < 1e-4, "{greetings}");
    }

    #[test]
    fn one_intents_precision_can_pay_for_anothers() {
        let (thanks, greeting) = (label("thanks"), label("greeting"));
        // Thanks alone, 300 right and 4 queued messages at 0.7505: 98.7 % right if all answer,
        // so the cut moves above the mistakes.
        let mut preds: Vec<_> = (0..300)
            .map(|i| (thanks, 0.99 - i as f32 * 0.001, thanks))
            .chain([(thanks, 0.7505, label(OTHER)); 4])
            .collect();
        let alone = thresholds(&preds, GOAL)["thanks"];
        assert!((alone - 0.751).abs() < 1e-4, "{alone}");
        // With 300 flawless greetings beside them the edge's answers are 99.3 % right
        // (600 of 604): thanks keeps its whole range.
        preds.extend((0..300).map(|i| (greeting, 0.99 - i as f32 * 0.001, greeting)));
        let together = thresholds(&preds, GOAL);
        assert!((together["thanks"] - 0.691).abs() < 1e-4, "{together:?}");
        assert!((together["greeting"] - 0.691).abs() < 1e-4, "{together:?}");
    }

    /// Copies `from` (a folder of plain files and folders) into `to`.
    fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            let target = to.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                copy_tree(&entry.path(), &target)?;
            } else {
                std::fs::copy(entry.path(), target)?;
            }
        }
        Ok(())
    }

    /// A new batch of seeds (a new folder under `seeds/added/`) only adds lines: each file's
    /// earlier lines stay as they were, in their split and their place (what keeps numbers
    /// measured on earlier lines comparable).
    #[test]
    fn seeds_added_later_move_no_earlier_line() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("intent-added-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let intent = dir.join("intent");
        std::fs::create_dir_all(intent.join("seeds"))?;
        let src = root().join("models/intent");
        std::fs::copy(src.join("generate.py"), intent.join("generate.py"))?;
        std::fs::copy(src.join("challenge.jsonl"), intent.join("challenge.jsonl"))?;
        copy_tree(&src.join("seeds"), &intent.join("seeds"))?;
        let script = intent.join("generate.py");
        generate(&script, &dir.join("before"), None, false)?;
        let batch = intent.join("seeds/added/zz-test");
        std::fs::create_dir_all(&batch)?;
        std::fs::write(
            batch.join("help.txt"),
            "너한테 어떤 부탁을 할 수 있니\nwhat sort of things do you handle\n",
        )?;
        std::fs::write(batch.join("other.txt"), "아직 할 얘기가 산더미야\n")?;
        generate(&script, &dir.join("after"), None, false)?;
        let mut added = 0;
        for file in DATA_FILES {
            let before = std::fs::read_to_string(dir.join("before").join(file))?;
            let after = std::fs::read_to_string(dir.join("after").join(file))?;
            assert!(
                after.starts_with(&before),
                "{file}: an earlier line moved or changed"
            );
            added += after[before.len()..].lines().count();
        }
        let _ = std::fs::remove_dir_all(&dir);
        // Two help seeds with their variants, one other seed with variants and compositions.
        assert!(added >= 10, "the new batch added only {added} lines");
        Ok(())
    }

    #[test]
    fn the_dev_report_gives_each_dev_line_its_prediction_and_route() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("dev-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dev_path = dir.join("dev.jsonl");
        // A blank line is skipped: the texts stay paired with the examples.
        std::fs::write(
            &dev_path,
            "{\"text\":\"안녕\",\"intent\":\"greeting\"}\n\n{\"text\":\"떡볶이 \\\"맛집\\\"\",\"intent\":\"other\"}\n",
        )?;
        let featurizer = Featurizer::new(FeaturizerConfig::default())?;
        let (dev, texts) = load_split(&dev_path, &featurizer)?;
        let policy = Policy::new(ModelMeta {
            name: "test".into(),
            labels: LABELS.map(String::from).to_vec(),
            featurizer: featurizer.config(),
            thresholds: BTreeMap::from([("greeting".to_owned(), 0.8)]),
            onnx_sha256: String::new(),
            nnef_sha256: String::new(),
            input: "features".into(),
            output: "probs".into(),
            metrics: BTreeMap::new(),
        })?;
        // The greeting is read as a greeting above its cut; the request as a greeting below it.
        let probs = vec![
            vec![0.9, 0.02, 0.02, 0.02, 0.02, 0.02],
            vec![0.7, 0.0, 0.0, 0.0, 0.0, 0.3],
        ];
        let out = dir.join("report.jsonl");
        write_dev_report(&out, &texts, &probs, &dev, &policy)?;
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["text"], "안녕");
        assert_eq!(lines[0]["label"], "greeting");
        assert_eq!(lines[0]["route"], "edge");
        assert_eq!(lines[0]["expected"], "edge");
        assert_eq!(lines[1]["text"], "떡볶이 \"맛집\"");
        assert_eq!(lines[1]["intent"], "greeting");
        assert_eq!(lines[1]["label"], "other");
        assert_eq!(lines[1]["route"], "queue");
        assert_eq!(lines[1]["expected"], "queue");
        assert!((lines[1]["confidence"].as_f64().unwrap_or(0.0) - 0.7).abs() < 1e-6);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// `right` answers that fit, then one that belongs in the queue, then `more` right ones, by
    /// falling confidence from `top` in steps of 0.001.
    fn answers(top: f32, right: usize, more: usize) -> Vec<(f32, bool, bool)> {
        let flags = (0..right)
            .map(|_| true)
            .chain([false])
            .chain((0..more).map(|_| true));
        flags
            .enumerate()
            .map(|(i, ok)| (top - i as f32 * 0.001, ok, ok))
            .collect()
    }

    #[test]
    fn refining_lowers_a_cut_while_the_targets_hold() {
        // 100 right, 1 mistake, 99 right, then 3 mistakes: a cut above the first mistake
        // moves down to the last right answer before the three (199 of 200 right).
        let mut thanks = answers(0.99, 100, 99);
        thanks.extend((0..3).map(|i| (0.7905 - i as f32 * 0.0001, false, false)));
        let cuts = refine(&cut_steps(&[thanks.clone()]), &[0.9], GOAL);
        assert_eq!(cuts, [thanks[199].0]);
        // Already there, or with no answers worth taking, nothing moves.
        assert_eq!(refine(&cut_steps(&[thanks.clone()]), &cuts, GOAL), cuts);
        assert_eq!(
            refine(&cut_steps(&[answers(0.99, 0, 0)]), &[1.0], GOAL),
            [1.0]
        );
    }

    #[test]
    fn refining_spends_the_mistakes_where_they_buy_the_most() {
        // Each intent: 50 right, then a mistake before 50 (a) or 10 (b) right ones. One
        // mistake in 151 answers keeps 99 %, two in 162 do not: a's 50 are worth more.
        let (a, b) = (answers(0.99, 50, 50), answers(0.99, 50, 10));
        let start = [a[49].0, b[49].0];
        let cuts = refine(&cut_steps(&[a.clone(), b.clone()]), &start, GOAL);
        assert_eq!(cuts, [a[100].0, b[49].0]);
    }

    #[test]
    fn no_threshold_is_below_the_floor() {
        let thanks = label("thanks");
        let preds: Vec<_> = (0..100)
            .map(|i| (thanks, 0.5 - i as f32 * 0.001, thanks))
            .collect();
        assert_eq!(thresholds(&preds, GOAL)["thanks"], MIN_THRESHOLD);
        // An intent never predicted gets 1.0: the edge does not answer it.
        assert_eq!(thresholds(&preds, GOAL)["greeting"], 1.0);
    }
}

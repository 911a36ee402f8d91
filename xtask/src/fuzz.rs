//! `cargo xtask fuzz`: runs the `cargo fuzz` targets in `fuzz/` (libFuzzer with
//! AddressSanitizer), all at once, each for `--seconds`, starting from the committed seeds in
//! `fuzz/seeds/<target>/`; new corpus entries go to `target/fuzz-corpus/<target>/`.
//!
//! cargo-fuzz passes nightly-only `-Z` flags to rustc; the pinned stable toolchain accepts
//! them with `RUSTC_BOOTSTRAP=1`, so no second toolchain is needed.

use std::process::{Child, Command};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::{root, setup};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
const TARGETS: [&str; 2] = ["request", "featurize"];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target (the targets run side by side; at least 1: libFuzzer reads 0 as
    /// no limit)
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Targets to run (default: all)
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        args.targets.clone()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?}; the targets are {TARGETS:?}");
        }
    }
    setup::cargo_install("cargo-fuzz", "cargo-fuzz", CARGO_FUZZ_VERSION, &[], 1)?;
    let _ = std::fs::remove_dir_all(root().join(".tools/cargo-target"));
    let fuzz = |t: &str| {
        let mut c = Command::new(setup::cargo_bin("cargo-fuzz"));
        c.current_dir(root()).env("RUSTC_BOOTSTRAP", "1").env(
            "PATH",
            format!(
                "{}:{}",
                root().join(".tools/cargo/bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
        c.arg(t);
        c
    };
    // Build first, one target after the other (2 cores), so the timed runs only fuzz.
    for t in &targets {
        let mut c = fuzz("build");
        c.arg(t);
        crate::run_cmd(c).with_context(|| format!("building fuzz target {t}"))?;
    }
    let logs = root().join("target/fuzz-logs");
    std::fs::create_dir_all(&logs)?;
    let mut running: Vec<(String, Child, Instant)> = Vec::new();
    for t in &targets {
        let corpus = root().join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let log = std::fs::File::create(logs.join(format!("{t}.log")))?;
        let mut c = fuzz("run");
        c.arg(t)
            .arg(&corpus)
            .arg(root().join("fuzz/seeds").join(t))
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1")
            .stdout(log.try_clone()?)
            .stderr(log);
        eprintln!(
            "fuzzing {t} for {} s (log: target/fuzz-logs/{t}.log)",
            args.seconds
        );
        running.push((
            t.clone(),
            c.spawn().context("starting cargo fuzz")?,
            Instant::now(),
        ));
    }
    let mut failed = Vec::new();
    println!("| target | seconds | runs | runs/s | coverage (edges) | corpus | result |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (t, mut child, started) in running {
        let status = child.wait()?;
        let log = std::fs::read_to_string(logs.join(format!("{t}.log"))).unwrap_or_default();
        let stat = |name: &str| {
            log.lines()
                .rev()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| "?".into())
        };
        let done = log
            .lines()
            .rev()
            .find(|l| l.contains("DONE") || l.contains("cov:"))
            .unwrap_or_default();
        let field = |name: &str| {
            done.split_whitespace()
                .skip_while(|w| *w != name)
                .nth(1)
                .unwrap_or("?")
                .to_owned()
        };
        let result = if status.success() {
            "no crash".to_owned()
        } else {
            failed.push(t.clone());
            format!("FAILED ({status}); see target/fuzz-logs/{t}.log and fuzz/artifacts/{t}/")
        };
        println!(
            "| {t} | {:.0} | {} | {} | {} | {} | {result} |",
            started.elapsed().as_secs_f64(),
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
            field("cov:"),
            field("corp:"),
        );
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found a crash in {failed:?}: fix it, then copy the input from fuzz/artifacts/ into fuzz/seeds/<target>/ so the seed replay test keeps it fixed"
        );
    }
    Ok(())
}

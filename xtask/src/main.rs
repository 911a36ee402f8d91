//! `cargo xtask <command>`: the project's automation. Run `cargo xtask --help`.

mod bench;
mod bench_chat;
mod bench_generate;
mod bench_serve;
mod bench_worker;
mod chaos;
mod cost;
mod dev;
mod fuzz;
mod load;
mod prices;
mod report;
mod setup;
mod test;
mod train;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// clap parser for a count that must be at least 1 (`--items 0` would measure nothing).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// clap parser for seconds: finite and not negative.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a finite number of seconds, 0 or more".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Parser)]
#[command(about = "Automation for this repository", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the project needs, start the emulators, the worker and `wrangler dev`
    Dev(dev::Args),
    /// Everything CI runs: fmt, clippy, unit, integration and end-to-end tests
    Test(test::Args),
    /// Install project-local tools only (ONNX Runtime, Node.js 22, wrangler, worker-build, shellcheck, playwright-core, models/lm's Python packages) and Debian's chromium
    Setup,
    /// Build the Cloudflare Worker into edge/build/ (worker-build, local wasm-bindgen/wasm-opt/esbuild)
    BuildEdge,
    /// Every benchmark: writes BENCHMARKS.md and the plots in docs/bench/
    Bench(report::Args),
    /// Loopback load on /v1/chat of the local stack: requests/s, p50/p99, errors, edge memory
    Load(load::Args),
    /// Latency of the Worker in `wrangler dev`: trivial /v1/chat vs a hello-world route
    BenchEdge(bench::Args),
    /// Throughput of `batch-worker run --task classify` per micro-batch size, vs Python's onnxruntime
    BenchWorker(bench_worker::Args),
    /// Throughput of `batch-worker serve` on one classify job through the emulators, vs `batch-worker run`
    BenchServe(bench_serve::Args),
    /// How long queued chat messages wait for their replies from `batch-worker serve` when they arrive while others decode
    BenchChat(bench_chat::Args),
    /// Tokens/s of `batch-worker run --task generate` per batch size, vs the same loop in Python's onnxruntime (or, with --compare, items/s beside another build with texts of mixed lengths)
    BenchGenerate(bench_generate::Args),
    /// The whole stack under SIGKILL, SIGTERM and a preemption notice: nothing lost or duplicated
    Chaos(chaos::Args),
    /// Run the cargo-fuzz targets (request parsing, featurizer) from the committed seeds
    Fuzz(fuzz::Args),
    /// Monthly cost of always-on GPU, spot GPU + edge, home workstation and API-only
    Cost(cost::Args),
    /// Print a new API key for NAME and its `API_KEYS` entry (salted SHA-256)
    ApiKey {
        /// Who owns the jobs this key creates
        name: String,
    },
    /// Retrain the intent model from models/intent/data (deterministic)
    TrainIntent(train::Args),
}

fn main() -> ExitCode {
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            // SAFETY: nothing else runs yet: no thread reads or writes the environment.
            unsafe { std::env::remove_var(name) };
        }
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Dev(a) => dev::run(a),
        Cmd::Test(a) => test::run(a),
        Cmd::Setup => setup::all()
            .and_then(|_| setup::chromium())
            .and_then(|_| setup::terraform_schema())
            .map(drop),
        Cmd::BuildEdge => setup::build_edge(),
        Cmd::Bench(a) => report::run(a),
        Cmd::Load(a) => load::run(a),
        Cmd::BenchEdge(a) => bench::run(a),
        Cmd::BenchWorker(a) => bench_worker::run(a),
        Cmd::BenchServe(a) => bench_serve::run(a),
        Cmd::BenchChat(a) => bench_chat::run(a),
        Cmd::BenchGenerate(a) => bench_generate::run(a),
        Cmd::Chaos(a) => chaos::run(a),
        Cmd::Fuzz(a) => fuzz::run(a),
        Cmd::Cost(a) => cost::run(a),
        Cmd::ApiKey { name } => api_key(&name),
        Cmd::TrainIntent(a) => train::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `cargo run` (the `cargo xtask` alias) set the environment variable `name` for
/// xtask itself. They must not reach the cargo builds xtask starts: build scripts track some
/// of them (ring's reads `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, `OUT_DIR`), so a build from
/// xtask and the same build from a shell would each find the other's artifacts stale and
/// compile ring, rustls, reqwest and all above them again (minutes, on every switch between
/// `cargo xtask …` and `cargo run --release --bin batch-worker`). `CARGO`, `CARGO_HOME`,
/// `CARGO_TARGET_DIR` and the like are the user's (or name the same cargo) and stay.
fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Prints a fresh key and the `API_KEYS` entry that accepts it.
fn api_key(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains([':', ',']) || name.contains(char::is_whitespace) {
        bail!("NAME must be non-empty without `:`, `,` or spaces");
    }
    let key = format!("cs_{}", hex::encode(random_bytes(24)?));
    let salt = random_bytes(16)?;
    println!("key:   {key}");
    println!("entry: {}", shared::apikey::entry(name, &key, &salt));
    eprintln!("add the entry to the API_KEYS secret (comma-separated); keep the key itself secret");
    Ok(())
}

/// Bytes from the OS random source.
pub fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf)
}

/// CPU cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The repository root.
pub fn root() -> PathBuf {
    stack::root()
}

/// Runs `cmd` in the repository root, or in the folder the caller already set, echoing it and
/// the time of any slow step; fails if it fails.
pub fn run_cmd(cmd: Command) -> anyhow::Result<()> {
    echoed(cmd, |c| c.status().map(|status| (status, Vec::new()))).map(drop)
}

/// [`run_cmd`] that returns what the command wrote to stdout; its stderr still reaches the
/// terminal as it comes.
pub fn run_cmd_stdout(mut cmd: Command) -> anyhow::Result<String> {
    cmd.stderr(std::process::Stdio::inherit());
    let stdout = echoed(cmd, |c| c.output().map(|o| (o.status, o.stdout)))?;
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Echoes `cmd`, runs it with `run` (in the root unless a folder is set), fails if it fails,
/// and says how long it took when that was long: where a CI run spends its time, step by step.
fn echoed(
    mut cmd: Command,
    run: impl FnOnce(&mut Command) -> std::io::Result<(std::process::ExitStatus, Vec<u8>)>,
) -> anyhow::Result<Vec<u8>> {
    in_root(&mut cmd);
    eprintln!("$ {}", show(&cmd));
    let started = std::time::Instant::now();
    let (status, stdout) = run(&mut cmd).with_context(|| format!("starting {}", show(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", show(&cmd));
    }
    let took = started.elapsed();
    if took.as_secs() >= 10 {
        // The program's name and first argument: `cargo clippy`, `cargo install`, `npm ci`.
        let program = std::path::Path::new(cmd.get_program());
        let name = program.file_name().unwrap_or(program.as_os_str());
        let first = cmd.get_args().next().unwrap_or_default();
        eprintln!(
            "  ({} {} took {took:.0?})",
            name.to_string_lossy(),
            first.to_string_lossy()
        );
    }
    Ok(stdout)
}

/// Runs `cmd` and returns its stdout.
pub fn output(mut cmd: Command) -> anyhow::Result<String> {
    in_root(&mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", show(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed with {}: {}",
            show(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sets the repository root as `cmd`'s working folder unless the caller chose one.
fn in_root(cmd: &mut Command) {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
}

/// The command line as a user would type it, with its folder when that is not the root.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir().filter(|d| *d != root()) {
        let dir = dir.strip_prefix(root()).unwrap_or(dir);
        s.push_str(&format!(" (in {}/)", dir.display()));
    }
    s
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_cargo_run_sets_for_xtask_is_kept_from_its_builds() {
        for set in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_run(set), "{set}");
        }
        for kept in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "RUSTUP_TOOLCHAIN",
            "RUSTFLAGS",
            "PATH",
            "MANIFEST_DIR",
        ] {
            assert!(!set_by_cargo_run(kept), "{kept}");
        }
    }

    #[test]
    fn commands_run_in_the_root_unless_the_caller_chose_a_folder() {
        let mut plain = Command::new("true");
        in_root(&mut plain);
        assert_eq!(plain.get_current_dir(), Some(root().as_path()));
        assert_eq!(show(&plain), "true");

        let mut edge = Command::new("worker-build");
        edge.arg("--profile").current_dir(root().join("edge"));
        in_root(&mut edge);
        assert_eq!(edge.get_current_dir(), Some(root().join("edge").as_path()));
        assert_eq!(show(&edge), "worker-build --profile (in edge/)");
    }

    /// A count of 0 or negative seconds would measure nothing (or divide by zero): clap
    /// refuses them before anything starts.
    #[test]
    fn counts_and_seconds_are_checked_when_parsed() {
        for bad in [
            &["load", "--concurrency", "0"][..],
            &["load", "--queued-every", "0"],
            &["load", "--seconds", "0"],
            &["chaos", "--items", "0"],
            &["chaos", "--traffic-seconds", "-1"],
            &["bench-serve", "--items", "-3"],
            &["chaos", "--restart-seconds", "inf"],
            &["bench-edge", "--requests", "0"],
            &["bench-worker", "--batch-sizes", "64,0"],
            &["bench-serve", "--shards", "0"],
            &["bench-chat", "--messages", "0"],
            &["bench-generate", "--repeat", "0"],
        ] {
            let argv = std::iter::once("xtask").chain(bad.iter().copied());
            // Refused by the value's own check, not taken for an unknown flag.
            match Cli::try_parse_from(argv) {
                Err(e) => assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}"),
                Ok(_) => panic!("{bad:?} was accepted"),
            }
        }
        for good in [
            &["load", "--concurrency", "1", "--seconds", "1"][..],
            &["chaos", "--restart-seconds", "0", "--kills", "0"],
            &["bench-worker", "--batch-sizes", "1,256"],
        ] {
            let argv = std::iter::once("xtask").chain(good.iter().copied());
            assert!(Cli::try_parse_from(argv).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn a_failing_command_is_an_error_that_names_it() {
        let mut c = Command::new("false");
        c.arg("--flag");
        let e = run_cmd(c).expect_err("`false` fails");
        assert!(e.to_string().contains("`false --flag` failed"), "{e}");
    }
}

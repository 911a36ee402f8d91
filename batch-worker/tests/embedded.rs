//! `batch-worker run` as users run it: the real binary, real ONNX Runtime, real files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_batch-worker");

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("embedded-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `n` items cycling over the intent test split, with a few malformed lines mixed in.
fn write_input(path: &Path, n: usize) {
    let texts = common::test_split_texts();
    let mut out = String::new();
    for i in 0..n {
        let line = match i % 997 {
            13 => "{\"custom_id\": \"broken".to_owned(),
            14 => format!("{{\"custom_id\": \"no-input-{i}\"}}"),
            _ => serde_json::json!({"custom_id": format!("item-{i}"), "input": texts[i % texts.len()]}).to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(path, out).expect("write input");
}

fn run(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--task", "classify", "--device", "cpu"])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    c
}

fn run_to_end(input: &Path, output: &Path, extra: &[&str]) -> String {
    let out = run(input, output, extra).output().expect("runs");
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(output).expect("output exists")
}

/// A `classify` run's checkpoint as `run` writes it, for `OUT.jsonl.ckpt`.
fn checkpoint(sha: &str, input_offset: u64, items: u64, output_bytes: usize, done: bool) -> String {
    serde_json::json!({
        "version": 1, "task": "classify", "input_sha256": sha, "input_offset": input_offset,
        "items": items, "errors": 0, "output_bytes": output_bytes, "done": done,
    })
    .to_string()
}

/// A small deterministic PRNG for kill instants.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn embedded_run_survives_repeated_sigkill_and_equals_an_uninterrupted_run() {
    let dir = scratch("sigkill");
    let input = dir.join("in.jsonl");
    // Big enough that twelve kills land before a run ends: ~1.6 s of work at 250k items/s.
    write_input(&input, 400_000);

    let reference = run_to_end(
        &input,
        &dir.join("reference.jsonl"),
        &["--batch-size", "64"],
    );
    assert_eq!(reference.lines().count(), 400_000);

    let output = dir.join("out.jsonl");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    // Kills that left output past the committed length (lines written in 1 MiB pieces
    // between commits): the next run must cut them off.
    let mut uncommitted = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while (kills < 12 || uncommitted == 0) && Instant::now() < deadline {
        // Every other run is killed before its first 2-second chunk ends, after its start-up
        // (which grows as the checkpoint does: the ids before it are read again), so that
        // output lies past the committed length; those runs commit nothing, and the others
        // move the checkpoint on.
        let (chunk, delay) = if kills % 2 == 0 {
            ("0.02", 20 + next(&mut rng) % 150)
        } else {
            ("2", 300 + next(&mut rng) % 500)
        };
        let mut child = run(
            &input,
            &output,
            &["--batch-size", "64", "--chunk-seconds", chunk],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay));
        match child.try_wait().expect("try_wait") {
            Some(_) => break, // finished before the kill: the rest of the test still checks it
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reaped");
                kills += 1;
                let committed = std::fs::read(dir.join("out.jsonl.ckpt"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|c| c["output_bytes"].as_u64())
                    .unwrap_or(0);
                let written =
                    std::fs::metadata(dir.join("out.jsonl.partial")).map_or(0, |m| m.len());
                uncommitted += usize::from(written > committed);
            }
        }
    }
    assert!(
        kills >= 10,
        "only {kills} kills landed before the run finished; make the input bigger"
    );
    assert!(
        uncommitted > 0,
        "no kill landed between writing output and committing it"
    );
    let resumed = run_to_end(&input, &output, &["--batch-size", "64"]);
    assert_eq!(resumed.lines().count(), reference.lines().count());
    assert!(
        resumed == reference,
        "resumed output differs from the uninterrupted run"
    );
    assert!(!dir.join("out.jsonl.ckpt").exists() && !dir.join("out.jsonl.partial").exists());
}

#[test]
fn malformed_lines_become_error_lines_and_never_stop_the_job() {
    let dir = scratch("malformed");
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"custom_id\":\"a\",\"input\":\"안녕하세요\"}\n",
            "not json at all\n",
            "\n",
            "{\"custom_id\":\"b\",\"input\":42}\n",
            "{\"custom_id\":\"a\",\"input\":\"duplicate id\"}\n",
            "{\"custom_id\":\"c\",\"input\":\"근처 떡볶이 맛집 알려줘\"}",
        ),
    )
    .expect("write");
    let out = run_to_end(&input, &dir.join("out.jsonl"), &[]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[0]["custom_id"], "a");
    assert_eq!(lines[0]["output"]["route"], "edge");
    assert_eq!(
        lines[1]["custom_id"], "2",
        "line number stands in for an unreadable custom_id"
    );
    assert_eq!(lines[1]["error"]["code"], "invalid_item");
    assert_eq!(lines[2]["custom_id"], "b");
    assert_eq!(lines[2]["error"]["code"], "invalid_item");
    assert_eq!(lines[3]["error"]["code"], "duplicate_custom_id");
    assert_eq!(lines[4]["custom_id"], "c");
    assert_eq!(lines[4]["output"]["route"], "queue");
    assert!(lines[4]["output"]["confidence"].as_f64().is_some());
}

#[test]
fn an_overlong_line_or_id_becomes_an_error_line() {
    let dir = scratch("overlong");
    let input = dir.join("in.jsonl");
    let limit = shared::wire::MAX_LINE_BYTES;
    let lines = [
        r#"{"custom_id":"a","input":"안녕하세요"}"#.to_owned(),
        // A valid item, but 3 MiB on one line (a file without line breaks looks the same).
        serde_json::json!({"custom_id": "huge", "input": "가".repeat(limit)}).to_string(),
        " ".repeat(2 * limit),
        serde_json::json!({"custom_id": "i".repeat(257), "input": "hi"}).to_string(),
        serde_json::json!({"custom_id": "i".repeat(256), "input": "hi"}).to_string(),
        r#"{"custom_id":"c","input":"근처 떡볶이 맛집 알려줘"}"#.to_owned(),
    ];
    std::fs::write(&input, lines.join("\n")).expect("write");
    let out = run_to_end(&input, &dir.join("out.jsonl"), &[]);
    let got: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            let id = v["custom_id"].as_str().unwrap_or_default();
            let what = v["error"]["code"].as_str().unwrap_or("ok");
            (id.chars().take(8).collect(), what.to_owned())
        })
        .collect();
    let want = [
        ("a", "ok"),
        ("2", "line_too_long"),
        ("4", "invalid_custom_id"),
        ("iiiiiiii", "ok"),
        ("c", "ok"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want, "{out}");
}

/// A file saved by a Windows editor: a byte-order mark before line 1, `\r\n` line ends. Every
/// item is read as the same file without them reads it.
#[test]
fn a_byte_order_mark_and_crlf_line_ends_change_no_item() {
    let dir = scratch("bom");
    let lines = [
        r#"{"custom_id":"a","input":"안녕하세요"}"#,
        r#"{"custom_id":"b","input":"근처 떡볶이 맛집 알려줘"}"#,
        r#"{"custom_id":"c","input":"고마워"}"#,
    ];
    let plain = dir.join("plain.jsonl");
    std::fs::write(&plain, lines.join("\n") + "\n").expect("write");
    let windows = dir.join("windows.jsonl");
    std::fs::write(
        &windows,
        "\u{feff}".to_owned() + &lines.join("\r\n") + "\r\n",
    )
    .expect("write");
    let want = run_to_end(&plain, &dir.join("plain.out"), &[]);
    assert_eq!(want.lines().count(), 3);
    assert!(!want.contains("\"error\""), "{want}");
    assert_eq!(run_to_end(&windows, &dir.join("windows.out"), &[]), want);
}

#[test]
fn unusable_arguments_exit_2_with_one_line() {
    let dir = scratch("usage");
    let path = |name: &str| dir.join(name).display().to_string();
    // `--input IN --output OUT` and more flags after them.
    let io = |input: String, output: String, more: &[&str]| -> Vec<String> {
        let mut args = vec!["--input".into(), input, "--output".into(), output];
        args.extend(more.iter().map(|a| a.to_string()));
        args
    };
    std::fs::write(dir.join("in.jsonl"), "").expect("write");
    let mut all: Vec<(Vec<String>, &str)> = vec![
        (
            io(path("missing.jsonl"), path("o.jsonl"), &[]),
            "cannot be read",
        ),
        (
            io(dir.display().to_string(), path("o.jsonl"), &[]),
            "is a directory",
        ),
        (
            io(path("in.jsonl"), "/nonexistent-dir/o.jsonl".into(), &[]),
            "does not exist",
        ),
        // Read once by the fingerprint, a pipe would leave no items to run: refused.
        (
            io("/dev/stdin".into(), path("o.jsonl"), &[]),
            "not a regular file",
        ),
    ];
    // An input named like a file the run keeps beside its output (a partial output is cut to
    // its checkpoint, a lock file removed): refused, the input left as it was.
    let line = "{\"custom_id\":\"a\",\"input\":\"hi\"}\n";
    for (suffix, expected) in [
        (".partial", "keeps its partial output"),
        (".ckpt", "keeps its checkpoint"),
        (".lock", "keeps its lock file"),
    ] {
        let name = format!("x.jsonl{suffix}");
        std::fs::write(dir.join(&name), line).expect("write");
        all.push((io(path(&name), path("x.jsonl"), &[]), expected));
    }
    // Notepad's "Unicode" (UTF-16 LE with its byte-order mark), and a gzip file.
    let utf16 = common::utf16_with_bom("{\"custom_id\":\"a\",\"input\":\"hi\"}\r\n");
    for (name, bytes, expected) in [
        ("utf16.jsonl", utf16, "is UTF-16 text"),
        (
            "in.jsonl.gz",
            b"\x1F\x8B\x08\x00".to_vec(),
            "is gzip-compressed",
        ),
    ] {
        std::fs::write(dir.join(name), bytes).expect("write");
        all.push((io(path(name), path("o.jsonl"), &[]), expected));
    }
    // A model.json that names an output its model.onnx lacks (files of two models).
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/intent");
    let mixed = dir.join("mixed-models");
    std::fs::create_dir_all(mixed.join("intent")).expect("mkdir");
    std::fs::copy(
        format!("{models}/model.onnx"),
        mixed.join("intent/model.onnx"),
    )
    .expect("copy model");
    let meta = std::fs::read_to_string(format!("{models}/model.json")).expect("model.json");
    let meta = meta.replace("\"output\": \"probs\"", "\"output\": \"logits\"");
    assert!(
        meta.contains("\"logits\""),
        "model.json's output field has moved"
    );
    std::fs::write(mixed.join("intent/model.json"), meta).expect("write");
    let mixed = mixed.display().to_string();
    all.push((
        io(
            path("in.jsonl"),
            path("o.jsonl"),
            // `cpu`: `auto` would log its fallback first.
            &["--model-dir", mixed.as_str(), "--device", "cpu"],
        ),
        "has no output \"logits\", which model.json names",
    ));
    // Negative numbers reach the checks rather than being taken for flags.
    for (more, expected) in [
        (&["--threads", "0"][..], "--threads must be 1..=1024, got 0"),
        (
            &["--batch-size", "0"],
            "--batch-size (BATCH_SIZE) must be 1..=16384, got 0",
        ),
        // Values no one means (an extra digit) are refused, not allocated or slept on.
        (
            &["--batch-size", "18446744073709551615"],
            "--batch-size (BATCH_SIZE) must be 1..=16384, got 18446744073709551615",
        ),
        (
            &["--task", "generate", "--generate-batch-size", "5000"],
            "--generate-batch-size (GENERATE_BATCH_SIZE) must be 1..=1024, got 5000",
        ),
        (
            &["--chunk-seconds", "-1"],
            "--chunk-seconds must be above 0 and at most 86400, got -1",
        ),
        (
            &["--chunk-seconds", "1e20"],
            "--chunk-seconds must be above 0 and at most 86400, got 100000000000000000000",
        ),
        (
            &["--chunk-seconds", "NaN"],
            "--chunk-seconds must be above 0 and at most 86400, got NaN",
        ),
        (
            &["--task", "generate", "--temperature", "-0.5"],
            "--temperature must be 0 (greedy) or a positive number, got -0.5",
        ),
        (
            &["--model-dir", "/nonexistent-models"],
            "reading /nonexistent-models/intent/model.json",
        ),
        (
            &["--task", "generate", "--lm-dir", "/nonexistent-lm"],
            "/nonexistent-lm: no model.onnx here",
        ),
    ] {
        all.push((io(path("in.jsonl"), path("o.jsonl"), more), expected));
    }
    for (args, expected) in all {
        let task = if args.iter().any(|a| a == "--task") {
            &[][..]
        } else {
            &["--task", "classify"][..]
        };
        let mut child = Command::new(BIN)
            .arg("run")
            .args(task)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs");
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            // Ignored (a closed pipe) by the runs refused before reading it.
            let _ = stdin.write_all(b"{\"custom_id\":\"a\",\"input\":\"hi\"}\n");
        }
        let out = child.wait_with_output().expect("exits");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{err}");
    }
    // Refused before anything is written: no lock, partial output or checkpoint is left.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("scratch dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("o.jsonl"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for suffix in [".partial", ".ckpt", ".lock"] {
        let kept = std::fs::read_to_string(dir.join(format!("x.jsonl{suffix}")));
        assert_eq!(kept.ok().as_deref(), Some(line), "x.jsonl{suffix}");
    }
    assert!(!dir.join("x.jsonl").exists());
}

/// `serve` refuses a setting out of its range (or a model it cannot load) before it connects anywhere.
#[test]
fn serve_settings_out_of_range_exit_2_with_one_line() {
    for (var, value, expected) in [
        (
            "POISON_LIMIT",
            "0",
            "--poison-limit (POISON_LIMIT) must be 1..=1000, got 0",
        ),
        (
            "POISON_LIMIT",
            "4294967295",
            "--poison-limit (POISON_LIMIT) must be 1..=1000, got 4294967295",
        ),
        (
            "MAX_OUTSTANDING_MESSAGES",
            "0",
            "(MAX_OUTSTANDING_MESSAGES) must be 1..=100000",
        ),
        (
            "MAX_OUTSTANDING_MESSAGES",
            "9223372036854775807",
            "(MAX_OUTSTANDING_MESSAGES) must be 1..=100000, got 9223372036854775807",
        ),
        (
            "CHAT_MAX_OUTSTANDING_MESSAGES",
            "100001",
            "(CHAT_MAX_OUTSTANDING_MESSAGES) must be 1..=100000, got 100001",
        ),
        (
            "MAX_OUTSTANDING_BYTES",
            "-1",
            "(MAX_OUTSTANDING_BYTES) must be at least 1",
        ),
        ("LEASE_SECONDS", "0", "(LEASE_SECONDS) must be 1..=86400"),
        (
            "LEASE_SECONDS",
            "18446744073709551615",
            "(LEASE_SECONDS) must be 1..=86400, got 18446744073709551615",
        ),
        (
            "MAX_LEASE_SECONDS",
            "59",
            "(MAX_LEASE_SECONDS) must be 60..=604800, got 59",
        ),
        (
            "ACK_EXTENSION_SECONDS",
            "5",
            "must be 10..=600 (Pub/Sub's range), got 5",
        ),
        (
            "ACK_EXTENSION_SECONDS",
            "601",
            "must be 10..=600 (Pub/Sub's range), got 601",
        ),
        (
            "BATCH_SIZE",
            "0",
            "--batch-size (BATCH_SIZE) must be 1..=16384, got 0",
        ),
        (
            "CHUNK_SECONDS",
            "0",
            "--chunk-seconds must be a number of seconds above 0 and at most 86400",
        ),
        (
            "DRAIN_SECONDS",
            "1e20",
            "--drain-seconds must be a number of seconds above 0 and at most 86400",
        ),
        (
            "GCP_PROJECT",
            "",
            "--project (GCP_PROJECT) must not be empty",
        ),
        (
            "PUBSUB_SUBSCRIPTION",
            " ",
            "--subscription (PUBSUB_SUBSCRIPTION) must not be empty",
        ),
        (
            "OUTPUT_ROOT",
            "s3://bucket/out",
            "--output-root (OUTPUT_ROOT): \"s3://bucket/out\": scheme \"s3\" is not supported",
        ),
        ("OUTPUT_ROOT", "gs://", "\"gs://\" names no bucket"),
        ("OUTPUT_ROOT", "outputs", "\"outputs\" is not a URL"),
        (
            "MODEL_DIR",
            "/nonexistent-models",
            "reading /nonexistent-models/intent/model.json",
        ),
        (
            "OUTPUT_ROOT",
            "file:///proc/version",
            "/proc/version is a file; name a folder",
        ),
        (
            "METRICS_ADDR",
            "9464",
            "--metrics-addr (METRICS_ADDR) must be host:port",
        ),
        (
            "PUBSUB_EMULATOR_HOST",
            "localhost",
            "--pubsub-emulator-host (PUBSUB_EMULATOR_HOST) must be host:port",
        ),
        (
            "PUBSUB_EMULATOR_HOST",
            "http://localhost:8085",
            "(PUBSUB_EMULATOR_HOST) must be host:port without a scheme",
        ),
        (
            "FIRESTORE_EMULATOR_HOST",
            "127.0.0.1:0",
            "(FIRESTORE_EMULATOR_HOST) must be host:port without a scheme, such as 127.0.0.1:8085, got \"127.0.0.1:0\"",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("serve")
            .env("GCP_PROJECT", "p")
            // Unused: the check comes first. Loopback, should it not.
            .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
            .env("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9")
            .env("METRICS_ADDR", "")
            .env(var, value)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{var}={value}: {err}");
        assert!(err.contains(expected), "{var}={value}: {err}");
    }
}

#[test]
fn checkpoint_of_another_input_is_refused() {
    let dir = scratch("other-input");
    let input = dir.join("in.jsonl");
    write_input(&input, 10);
    let output = dir.join("out.jsonl");
    std::fs::write(dir.join("out.jsonl.ckpt"), checkpoint("00", 0, 0, 0, false)).expect("write");
    let out = run(&input, &output, &[]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to another input"));
}

/// A run killed after its last commit, before its output was moved into place, is finished
/// by the next run without loading a model: here one that cannot be loaded.
#[test]
fn a_finished_checkpoint_is_completed_without_the_model() {
    use sha2::Digest as _;
    let dir = scratch("finished-ckpt");
    let input = dir.join("in.jsonl");
    write_input(&input, 40);
    let output = dir.join("out.jsonl");
    let want = run_to_end(&input, &output, &[]);
    // The state of a run killed between its final checkpoint and the rename.
    let partial = dir.join("out.jsonl.partial");
    std::fs::rename(&output, &partial).expect("rename");
    let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&input).expect("input")));
    let consumed = std::fs::metadata(&input).expect("input").len();
    let finished = checkpoint(&sha, consumed, 40, want.len(), true);
    std::fs::write(dir.join("out.jsonl.ckpt"), finished).expect("write");
    let no_model = ["--model-dir", "/nonexistent-models"];
    assert_eq!(run_to_end(&input, &output, &no_model), want);
    for leftover in ["out.jsonl.partial", "out.jsonl.ckpt", "out.jsonl.lock"] {
        assert!(!dir.join(leftover).exists(), "{leftover} left behind");
    }
    // With work left the model is needed: refused with one line, the checkpoint kept as it
    // was and no lock file left.
    let ckpt = checkpoint(&sha, 0, 0, 0, false);
    std::fs::write(dir.join("out.jsonl.ckpt"), &ckpt).expect("write");
    let out = run(&input, &output, &no_model).output().expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.trim().lines().count() == 1
            && err.contains("reading /nonexistent-models/intent/model.json"),
        "{err}"
    );
    let kept = std::fs::read_to_string(dir.join("out.jsonl.ckpt")).expect("checkpoint kept");
    assert_eq!(kept, ckpt);
    assert!(
        !dir.join("out.jsonl.lock").exists(),
        "lock file left behind"
    );
}

/// `run` featurizes each micro-batch on two threads (a share on the reading thread, the rest
/// on the model thread) into recycled buffers, or with `--threads` above 2 on a pool of
/// threads besides; every line must still be what the classifier gives that text on its own
/// path, and both ways give the same bytes.
#[test]
fn classify_run_gives_each_line_what_the_classifier_gives_its_text() {
    use batch_worker::engine::{Classifier, Device};
    let dir = scratch("classify-rows");
    let (input, output) = (dir.join("in.jsonl"), dir.join("out.jsonl"));
    // Texts of every length in one micro-batch after another: a row that kept values of the
    // text it held before would show.
    let mut texts = common::test_split_texts();
    texts.truncate(2000);
    texts.sort_by_key(|t| std::cmp::Reverse(t.len() * 7919 % 1000));
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"custom_id": format!("c{i}"), "input": t}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let got = run_to_end(&input, &output, &["--batch-size", "96", "--threads", "2"]);
    let pooled = run_to_end(
        &input,
        &dir.join("pooled.jsonl"),
        &["--batch-size", "96", "--threads", "5"],
    );
    assert!(
        got == pooled,
        "--threads 5 wrote other lines than --threads 2"
    );

    let mut clf = Classifier::load(Path::new(common::INTENT_DIR), Device::Cpu, 0)
        .expect("ORT loads the model");
    let mut n = 0;
    for (i, (line, text)) in got.lines().zip(&texts).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["custom_id"], format!("c{i}"));
        let want = &clf.classify(&[text.as_str()]).expect("ORT runs")[0];
        let out = &v["output"];
        assert_eq!(out["intent"], want.intent.as_str(), "{text:?}");
        assert_eq!(
            out["route"],
            serde_json::to_value(want.route).expect("route"),
            "{text:?}"
        );
        let conf = out["confidence"].as_f64().expect("confidence");
        assert!(
            (conf - f64::from(want.confidence)).abs() < 1e-5,
            "{text:?}: {conf} vs {}",
            want.confidence
        );
        n += 1;
    }
    assert_eq!(n, texts.len());
}

/// Two runs on one output at once would interleave their commits: the second is refused,
/// naming the first, which goes on to a complete output and removes its lock file.
#[test]
fn a_second_run_on_the_same_output_is_refused_while_the_first_runs() {
    let dir = scratch("two-runs");
    let input = dir.join("in.jsonl");
    write_input(&input, 200_000);
    let output = dir.join("out.jsonl");
    let lock = dir.join("out.jsonl.lock");
    let mut first = run(&input, &output, &["--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("first run starts");
    let pid = first.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&lock).ok().as_deref() != Some(&pid.to_string()) {
        assert!(
            Instant::now() < deadline,
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Held still while the second one tries.
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    assert!(
        matches!(first.try_wait(), Ok(None)),
        "the first run ended too soon"
    );
    let second = run(&input, &output, &[]).output().expect("second run");
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("another batch-worker run (pid {pid})")),
        "{err}"
    );
    assert!(first.wait().expect("first run ends").success());
    let lines = std::fs::read_to_string(&output)
        .expect("output")
        .lines()
        .count();
    assert_eq!(lines, 200_000);
    assert!(!lock.exists(), "a finished run leaves no lock file");
    // The lock is the kernel's: a SIGKILLed run leaves the file, and the next run takes it.
    let mut killed = run(&input, &output, &[]).spawn().expect("third run");
    std::thread::sleep(Duration::from_millis(300));
    let _ = killed.kill();
    let _ = killed.wait();
    run_to_end(&input, &output, &[]);
    assert!(!lock.exists());
}

/// An input changed while a run reads it: the run refuses to write the output (it would mix
/// two versions of the file) and says how to start over.
#[test]
fn an_input_changed_during_the_run_is_refused() {
    let dir = scratch("changed");
    let input = dir.join("in.jsonl");
    write_input(&input, 200_000);
    let output = dir.join("out.jsonl");
    let partial = dir.join("out.jsonl.partial");
    let child = run(&input, &output, &["--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run starts");
    let pid = child.id();
    // The partial output is opened once the input is fingerprinted and the model loaded,
    // before the first line is read again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !partial.exists() {
        assert!(Instant::now() < deadline, "the run never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // The last line, far past what the run has read, changes in place.
    let mut text = std::fs::read(&input).expect("input");
    let at = text.len() - 4;
    text[at] = if text[at] == b'a' { b'b' } else { b'a' };
    std::fs::write(&input, &text).expect("input rewritten");
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let out = child.wait_with_output().expect("run ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("changed during the run"), "{err}");
    assert!(!output.exists(), "an output of two versions of the input");
}

/// Logs go to stderr; when it is closed (its reader ended, the journal restarted) lines are
/// dropped and `serve` still runs and drains on SIGTERM (it used to panic on the first line
/// it could not write).
#[test]
fn serve_keeps_running_and_drains_with_stderr_closed() {
    let dir = scratch("stderr-closed");
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("GCP_PROJECT", "p")
        .env("PUBSUB_SUBSCRIPTION", "s")
        // Nothing listens there: the worker waits for its endpoints, logging as it does.
        .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
        .env("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("OUTPUT_ROOT", format!("file://{}", dir.display()))
        .env("DEVICE", "cpu")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "serve died with stderr closed: {:?}",
        child.try_wait()
    );
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not drain within 20 s of SIGTERM with stderr closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

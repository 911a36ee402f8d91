//! The `route` CLI as operators run it: `route eval FILE` and `route classify` on stdin, their
//! line formats (the contract's), and how they treat files written on Windows and bad input.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_route");

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("route-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn route(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("route runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("route exits")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn eval_prints_a_line_per_input_then_the_scores() {
    let dir = scratch("eval");
    let file = dir.join("labelled.jsonl");
    // Saved by a Windows editor: byte-order mark, `\r\n`; a blank line is skipped.
    let body = concat!(
        "\u{feff}{\"text\":\"안녕\",\"route\":\"edge\"}\r\n",
        "{\"text\":\"근처 짜장면집 추천해줘\",\"route\":\"queue\"}\r\n",
        "\r\n",
        "{\"text\":\"고마워\",\"intent\":\"thanks\"}\r\n",
    );
    std::fs::write(&file, body).expect("write");
    let out = route(&["eval", &file.display().to_string()], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    let expected = ["edge", "queue", "edge"];
    for (line, (text, want)) in lines.iter().zip(
        ["안녕", "근처 짜장면집 추천해줘", "고마워"]
            .iter()
            .zip(expected),
    ) {
        let keys: Vec<&str> = line
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["confidence", "expected", "intent", "route", "text"],
            "{line}"
        );
        assert_eq!(line["text"], *text);
        assert_eq!(line["expected"], want);
        assert!(
            line["confidence"]
                .as_f64()
                .is_some_and(|c| (0.0..=1.0).contains(&c))
        );
    }
    let scores = &lines[3];
    assert_eq!(scores["n"], 3, "{scores}");
    for key in ["accuracy", "edge_precision", "edge_recall"] {
        assert!(
            scores[key]
                .as_f64()
                .is_some_and(|v| (0.0..=1.0).contains(&v)),
            "{key}: {scores}"
        );
    }
}

#[test]
fn classify_reads_plain_lines_from_stdin() {
    let out = route(&["classify"], "\u{feff}안녕\r\nthank you\n".as_bytes());
    assert!(out.status.success());
    let lines = json_lines(&out);
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["text"].as_str().unwrap_or_default(),
                l["intent"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(got, [("안녕", "greeting"), ("thank you", "thanks")]);
    assert!(lines.iter().all(|l| l["expected"].is_null()));
}

#[test]
fn bad_input_exits_2_naming_the_file_and_line() {
    let dir = scratch("bad");
    let file = dir.join("bad.jsonl");
    std::fs::write(&file, "{\"text\":\"안녕\",\"route\":\"edge\"}\nnot json\n").expect("write");
    let path = file.display().to_string();
    let out = route(&["eval", &path], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{path}:2")), "{err}");
    let missing = dir.join("missing.jsonl").display().to_string();
    let out = route(&["eval", &missing], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"));
    // Text saved as CP949 ("안녕" is B0 C8 B3 E7 there): the line and byte are named.
    let out = route(&["classify"], b"hi\n\xb0\xc8\xb3\xe7\n");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        json_lines(&out).len(),
        1,
        "the line before it was classified"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdin:2 is not UTF-8 (byte 0)"), "{err}");
    std::fs::write(
        &file,
        b"{\"text\":\"hi\",\"route\":\"edge\"}\r\n\n{\"text\":\"\xb0\xc8\"}\n",
    )
    .expect("write");
    let out = route(&["eval", &path], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{path}:3 is not UTF-8 (byte 9)")),
        "{err}"
    );
}

#[test]
fn eval_of_a_file_without_labelled_lines_exits_2() {
    let dir = scratch("empty");
    let file = dir.join("empty.jsonl");
    std::fs::write(&file, "\n  \r\n").expect("write");
    let out = route(&["eval", &file.display().to_string()], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "no scores for nothing");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no labelled lines"), "{err}");
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::BufRead as _;
    let mut child = Command::new(BIN)
        .arg("classify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("route runs");
    let mut stdin = child.stdin.take().expect("stdin");
    // Far more output than a pipe buffers, so route writes after the reader has gone.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all("안녕\n".repeat(50_000).as_bytes());
    });
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("first line");
    assert!(first.contains("greeting"), "{first}");
    let out = child.wait_with_output().expect("route exits");
    let _ = feeder.join();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_error_with_stderr_closed_still_exits_2() {
    let mut child = Command::new(BIN)
        .args(["eval", "/nonexistent-route-input.jsonl"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("route runs");
    // The read end closed before route writes: a write to it fails with EPIPE.
    drop(child.stderr.take());
    let status = child.wait().expect("route exits");
    assert_eq!(status.code(), Some(2), "{status}");
}

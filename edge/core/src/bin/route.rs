//! `route`: run the edge's intent model and routing policy on files, for calibration.
//!
//! - `route eval FILE.jsonl`: lines `{"text", "route"}` (or `{"text", "intent"}`, from which
//!   the expected route follows); prints one JSON line per input, then the summary line
//!   `{"n", "accuracy", "edge_precision", "edge_recall"}`.
//! - `route classify`: plain text lines on stdin; one JSON line per input.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use edge_core::model::IntentModel;
use shared::intent::{Route, RouteLine, Scoreboard, expected_route};
use shared::wire::{line_text, not_utf8};

#[derive(Parser)]
#[command(about = "Run the edge's intent model and routing policy", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Score a labelled JSONL file: lines {"text": s, "route": "edge"|"queue"} or {"text", "intent"}
    Eval {
        /// UTF-8 JSONL; prints one JSON line per input line, then the scores
        file: PathBuf,
    },
    /// Classify plain text lines from stdin: one JSON line each (text, intent, confidence, route)
    Classify,
}

#[derive(serde::Deserialize)]
struct Labelled {
    text: String,
    route: Option<Route>,
    intent: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`route classify | head`) is not an error.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is a pipe nobody reads any more: the
            // exit status still says what happened.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "route: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    let pipe = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == pipe
            || c.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == pipe
    })
}

/// Line `n` (from 1) of `source` as text: without its line end, nor the byte-order mark that
/// may open line 1; an error naming it when it is not UTF-8.
fn utf8_line<'a>(bytes: &'a [u8], source: &str, n: usize) -> anyhow::Result<&'a str> {
    line_text(bytes, n as u64).map_err(|e| anyhow::anyhow!(not_utf8(&format!("{source}:{n}"), &e)))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let model = IntentModel::embedded().map_err(|e| anyhow::anyhow!("{e}"))?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut emit = |text: &str, expected: Option<Route>| -> anyhow::Result<Route> {
        let d = model.classify(text);
        let line = RouteLine {
            text,
            decision: &d,
            expected,
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        Ok(d.route)
    };
    match cli.command {
        Cmd::Classify => {
            let mut stdin = std::io::stdin().lock();
            let mut buf = Vec::new();
            for n in 1.. {
                buf.clear();
                if stdin.read_until(b'\n', &mut buf).context("reading stdin")? == 0 {
                    break;
                }
                emit(utf8_line(&buf, "stdin", n)?, None)?;
            }
        }
        Cmd::Eval { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = file.display().to_string();
            let mut board = Scoreboard::default();
            for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
                let raw = utf8_line(raw, &name, i + 1)?;
                if raw.trim().is_empty() {
                    continue;
                }
                let where_ = || format!("{name}:{}", i + 1);
                let l: Labelled = serde_json::from_str(raw).with_context(|| {
                    format!(
                        "{}: expected {{\"text\": ..., \"route\": \"edge\"|\"queue\"}}",
                        where_()
                    )
                })?;
                let expected = match (l.route, &l.intent) {
                    (Some(r), _) => r,
                    (None, Some(intent)) => expected_route(intent),
                    (None, None) => {
                        bail!("{}: needs \"route\" (edge|queue) or \"intent\"", where_())
                    }
                };
                board.add(emit(&l.text, Some(expected))?, expected);
            }
            if board.n() == 0 {
                bail!(
                    "{} holds no labelled lines; write one {{\"text\": ..., \"route\": \"edge\"|\"queue\"}} per line",
                    file.display()
                );
            }
            serde_json::to_writer(&mut out, &board.scores())?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}

//! `batch-worker`: see `batch-worker --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use batch_worker::embedded::{self, RunError, RunOptions};
use batch_worker::engine::Device;
use batch_worker::tasks::Classify;
use clap::{Parser, Subcommand};
use shared::wire::Task;

#[derive(Parser)]
#[command(
    about = "Batch inference worker: Pub/Sub jobs or local JSONL files, checkpointed",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct EngineArgs {
    /// Execution provider: auto (CUDA, else CPU), cuda (fail without a GPU) or cpu
    #[arg(long, env = "DEVICE", value_enum, default_value = "auto")]
    device: Device,
    /// Folder with the models (`intent/model.onnx`, …)
    #[arg(long, env = "MODEL_DIR", default_value_os_t = default_model_dir())]
    model_dir: PathBuf,
    /// Items per inference call
    #[arg(long, env = "BATCH_SIZE", default_value_t = 256)]
    batch_size: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one bulk job over a local JSONL file; resumable after any kill
    Run {
        #[arg(long, value_parser = ["classify", "generate"])]
        task: String,
        /// Input JSONL: {"custom_id": s, "input": s} per line
        #[arg(long)]
        input: PathBuf,
        /// Output JSONL: exactly one line per input item
        #[arg(long)]
        output: PathBuf,
        /// Commit results at least this often (seconds of work a kill can lose)
        #[arg(long, default_value_t = 5.0)]
        chunk_seconds: f64,
        #[command(flatten)]
        engine: EngineArgs,
    },
}

/// `models/` of the source tree this binary was built from.
fn default_model_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Cmd::Run {
            task,
            input,
            output,
            chunk_seconds,
            engine,
        } => {
            let task: Task = match task.parse() {
                Ok(t) => t,
                Err(e) => return usage(&e),
            };
            let opts = RunOptions {
                task,
                input,
                output,
                chunk_seconds,
                progress: true,
            };
            embedded::install_signal_handlers();
            let result = match task {
                Task::Classify => embedded::run(&opts, || Classify::load(&engine.model_dir, engine.device, engine.batch_size)),
                Task::Generate => Err(RunError::Usage(
                    "task generate needs a text-generation model, which this build does not include yet".into(),
                )),
            };
            match result {
                Ok(s) => {
                    let done_now = s.items - s.resumed_from;
                    let secs = s.wall.as_secs_f64().max(1e-9);
                    eprintln!(
                        "batch-worker: wrote {} lines ({} errors) to {}{}; {done_now} items in {secs:.2} s ({:.0} items/s, {:.0}% inside session.run)",
                        s.items,
                        s.errors,
                        opts.output.display(),
                        if s.resumed_from > 0 {
                            format!(", resumed after {} items", s.resumed_from)
                        } else {
                            String::new()
                        },
                        done_now as f64 / secs,
                        100.0 * s.inference.as_secs_f64() / secs,
                    );
                    ExitCode::SUCCESS
                }
                Err(RunError::Usage(m)) => usage(&m),
                Err(e) => {
                    eprintln!("batch-worker: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("batch-worker: {message}");
    ExitCode::from(2)
}

fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| "warn,batch_worker=info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

//! `batch-worker`: see `batch-worker --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use batch_worker::embedded::{self, MAX_SECONDS, RunError, RunOptions};
use batch_worker::engine::Device;
use batch_worker::generate::Sampling;
use batch_worker::serve::{Failpoints, ServeConfig};
use batch_worker::tasks::{Classify, Generate, GenerateOptions, PromptFormat};
use clap::{Parser, Subcommand};
use shared::wire::Task;

/// `eprintln!` that cannot panic: with stderr closed (`batch-worker run … 2>&1 | head`) the
/// line is dropped and the exit status still tells what happened.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
    /// Items per inference call (classify)
    #[arg(
        long,
        env = "BATCH_SIZE",
        default_value_t = 256,
        allow_negative_numbers = true
    )]
    batch_size: usize,
    #[command(flatten)]
    generate: GenerateArgs,
}

#[derive(clap::Args, Clone)]
struct GenerateArgs {
    /// The text-generation model folder (model.onnx, tokenizer.json, …); default MODEL_DIR/lm
    #[arg(long, env = "LM_DIR")]
    lm_dir: Option<PathBuf>,
    /// Prompts decoded together at most (generate, chat)
    #[arg(
        long,
        env = "GENERATE_BATCH_SIZE",
        default_value_t = 8,
        allow_negative_numbers = true
    )]
    generate_batch_size: usize,
    /// Tokens generated at most per item, the stop token included
    #[arg(
        long,
        env = "MAX_NEW_TOKENS",
        default_value_t = 128,
        allow_negative_numbers = true
    )]
    max_new_tokens: usize,
    /// 0 decodes greedily; above 0, samples from logits divided by it
    #[arg(
        long,
        env = "TEMPERATURE",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    temperature: f32,
    /// Sample from the smallest set of tokens whose probability reaches this (0 < p ≤ 1)
    #[arg(
        long,
        env = "TOP_P",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    top_p: f32,
    /// Sampling seed; each item's stream is this seed mixed with its custom_id
    #[arg(long, env = "SEED", default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// The assistant's system prompt for chat messages and chat-format generate items
    #[arg(long, env = "SYSTEM_PROMPT", default_value = batch_worker::generate::DEFAULT_SYSTEM_PROMPT)]
    system_prompt: String,
    /// chat: wrap each generate input in the chat template; raw: feed it as it is
    #[arg(long, env = "PROMPT_FORMAT", value_enum, default_value = "chat")]
    prompt_format: PromptFormat,
    /// Always generate --max-new-tokens tokens, stop tokens included (benchmarks)
    #[arg(long, env = "IGNORE_STOP_TOKENS", hide = true)]
    ignore_stop_tokens: bool,
}

impl EngineArgs {
    /// Refuses values that cannot work (a micro-batch of no items).
    fn check(&self) -> Result<(), String> {
        within(
            "--batch-size",
            "BATCH_SIZE",
            self.batch_size,
            1,
            MAX_BATCH_SIZE,
        )?;
        Ok(())
    }

    /// `--lm-dir`, else `MODEL_DIR/lm`.
    fn lm_dir(&self) -> PathBuf {
        self.generate
            .lm_dir
            .clone()
            .unwrap_or_else(|| batch_worker::generate::model_dir(&self.model_dir))
    }
}

impl GenerateArgs {
    fn options(&self) -> Result<GenerateOptions, String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature must be 0 (greedy) or a positive number, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("--max-new-tokens must be at least 1".into());
        }
        within(
            "--generate-batch-size",
            "GENERATE_BATCH_SIZE",
            self.generate_batch_size,
            1,
            MAX_GENERATE_BATCH_SIZE,
        )?;
        Ok(GenerateOptions {
            sampling: Sampling {
                max_new_tokens: self.max_new_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                ignore_stop: self.ignore_stop_tokens,
            },
            batch_size: self.generate_batch_size,
            system_prompt: self.system_prompt.clone(),
            format: self.prompt_format,
        })
    }
}

/// `batch-worker serve` settings; every flag can come from the environment variable named.
#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Google Cloud project of the subscription and the Firestore database
    #[arg(long, env = "GCP_PROJECT")]
    project: String,
    /// Pub/Sub subscription the jobs arrive on
    #[arg(long, env = "PUBSUB_SUBSCRIPTION", default_value = "worker")]
    subscription: String,
    /// A second subscription, for chat messages alone, pulled with its own flow control, so
    /// that a chat message is delivered while this worker holds its limit of batch shards
    /// ("" for none: chat messages then come on `--subscription` like any job)
    #[arg(long, env = "CHAT_SUBSCRIPTION", default_value = "")]
    chat_subscription: String,
    /// Flow control of the chat subscription: chat messages held at once
    #[arg(
        long,
        env = "CHAT_MAX_OUTSTANDING_MESSAGES",
        default_value_t = 32,
        allow_negative_numbers = true
    )]
    chat_max_outstanding_messages: i64,
    /// Topic that shards which keep stopping workers are moved to ("" to only log them)
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = "jobs-dead")]
    dead_letter_topic: String,
    /// The worker's own subscription on the dead-letter topic: a message Pub/Sub moved there
    /// (its delivery limit counts drains and outages) goes back on the jobs topic (a chat
    /// message on the chat topic) while its job is running, up to 10 times, then fails the
    /// job ("" to turn this off)
    #[arg(
        long,
        env = "DEAD_LETTER_SUBSCRIPTION",
        default_value = "jobs-dead-watch"
    )]
    dead_letter_subscription: String,
    /// Jobs topic: a worker that takes an `input_uri` job publishes its shards here, so that
    /// several workers share the file ("" to run such a job as one shard on one worker)
    #[arg(long, env = "JOBS_TOPIC", default_value = "jobs")]
    jobs_topic: String,
    /// Chat topic, the one `CHAT_SUBSCRIPTION` reads: a chat message Pub/Sub dead-lettered
    /// goes back here, to be answered through the chat subscription ("" for the jobs topic)
    #[arg(long, env = "CHAT_TOPIC", default_value = "")]
    chat_topic: String,
    /// Input lines per shard of an `input_uri` job
    #[arg(long, env = "INPUT_SHARD_ITEMS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true)]
    input_shard_items: u64,
    /// Firestore database id
    #[arg(long, env = "FIRESTORE_DATABASE", default_value = "(default)")]
    database: String,
    /// `host:port` of the Pub/Sub emulator (anonymous credentials); unset: Google Cloud
    #[arg(long, env = "PUBSUB_EMULATOR_HOST")]
    pubsub_emulator_host: Option<String>,
    /// `host:port` of the Firestore emulator; unset: Google Cloud, token from the metadata server
    #[arg(long, env = "FIRESTORE_EMULATOR_HOST")]
    firestore_emulator_host: Option<String>,
    /// Where outputs go: file:///absolute/dir or gs://bucket/prefix
    #[arg(long, env = "OUTPUT_ROOT", default_value_t = default_output_root())]
    output_root: String,
    /// This worker's name in shard leases (default: the host name); a restarted worker with
    /// the same id takes its own leases back at once
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// Commit outputs and the checkpoint after about this much work (seconds a SIGKILL can lose)
    #[arg(
        long,
        env = "CHUNK_SECONDS",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    chunk_seconds: f64,
    /// A shard lease lasts this long past its last checkpoint; then another worker may take it
    #[arg(
        long,
        env = "LEASE_SECONDS",
        default_value_t = 60,
        allow_negative_numbers = true
    )]
    lease_seconds: u64,
    /// Pub/Sub ack deadline extension (10..=600 s): how soon a crashed worker's messages return
    #[arg(
        long,
        env = "ACK_EXTENSION_SECONDS",
        default_value_t = 60,
        allow_negative_numbers = true
    )]
    ack_extension_seconds: u64,
    /// Longest a message (its shard's whole run) is kept leased; a shard still running then is
    /// redelivered to another worker, which waits out this one's shard lease
    #[arg(long, env = "MAX_LEASE_SECONDS", default_value_t = 6 * 3600, allow_negative_numbers = true)]
    max_lease_seconds: u64,
    /// Flow control: messages (shards) held at once
    #[arg(
        long,
        env = "MAX_OUTSTANDING_MESSAGES",
        default_value_t = 4,
        allow_negative_numbers = true
    )]
    max_outstanding_messages: i64,
    /// Flow control: bytes of messages held at once
    #[arg(long, env = "MAX_OUTSTANDING_BYTES", default_value_t = 64 << 20, allow_negative_numbers = true)]
    max_outstanding_bytes: i64,
    /// Quarantine a shard after this many deliveries that did not end in a drain
    #[arg(
        long,
        env = "POISON_LIMIT",
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    poison_limit: u32,
    /// Serve Prometheus metrics on this address ("" to disable)
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// GCE metadata server `host:port` (default: metadata.google.internal on a GCE VM, none elsewhere)
    #[arg(long, env = "GCE_METADATA_HOST")]
    metadata_host: Option<String>,
    /// Longest a drain may take before in-flight shards are abandoned (they resume from their checkpoint)
    #[arg(
        long,
        env = "DRAIN_SECONDS",
        default_value_t = 20.0,
        allow_negative_numbers = true
    )]
    drain_seconds: f64,
    /// An idle generation thread waits this long after a request for concurrent ones (other
    /// chat messages) to share its prefill
    #[arg(
        long,
        env = "GENERATE_GATHER_MS",
        default_value_t = 10,
        allow_negative_numbers = true
    )]
    generate_gather_ms: u64,
    /// Fault injection for tests and benchmarks (see serve::Failpoints)
    #[arg(long, env = "BATCH_WORKER_FAILPOINTS", default_value = "", hide = true)]
    failpoints: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pull jobs from Pub/Sub until SIGTERM/SIGINT or a GCE preemption notice, then drain
    Serve {
        #[command(flatten)]
        serve: Box<ServeArgs>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Run one bulk job over a local JSONL file; resumable after any kill
    Run {
        /// classify: each input's intent, confidence and route; generate: a reply to each input
        #[arg(long, value_parser = ["classify", "generate"])]
        task: String,
        /// Input JSONL: {"custom_id": s, "input": s} per line
        #[arg(long)]
        input: PathBuf,
        /// Output JSONL: exactly one line per input item
        #[arg(long)]
        output: PathBuf,
        /// Commit results at least this often (seconds of work a kill can lose)
        #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
        chunk_seconds: f64,
        /// CPU threads for classify (default: the machine's cores); from 3 on, all but the
        /// model's featurize together
        #[arg(long, allow_negative_numbers = true)]
        threads: Option<usize>,
        #[command(flatten)]
        engine: EngineArgs,
        /// Fault injection for benchmarks (`run` honours generate-step-delay-ms only)
        #[arg(long, env = "BATCH_WORKER_FAILPOINTS", default_value = "", hide = true)]
        failpoints: String,
    },
}

/// `v` if it is at least `min`, else the line that says so, naming the flag and its variable.
fn at_least<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    var: &str,
    v: T,
    min: T,
) -> Result<T, String> {
    if v >= min {
        Ok(v)
    } else {
        Err(format!("{flag} ({var}) must be at least {min}, got {v}"))
    }
}

/// `v` if it is in `min..=max`, else the line that says so. The upper bounds keep values
/// that no deployment means (a typo, an extra digit) from reaching allocations and timers.
fn within<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    var: &str,
    v: T,
    min: T,
    max: T,
) -> Result<T, String> {
    if v >= min && v <= max {
        Ok(v)
    } else {
        Err(format!("{flag} ({var}) must be {min}..={max}, got {v}"))
    }
}

/// `v` seconds if that is more than 0 and at most [`MAX_SECONDS`], else the line that says so.
fn positive_seconds(name: &str, v: f64) -> Result<std::time::Duration, String> {
    // Written so that NaN fails too.
    if v > 0.0 && v <= MAX_SECONDS as f64 {
        Ok(std::time::Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "{name} must be a number of seconds above 0 and at most {MAX_SECONDS}, got {v}"
        ))
    }
}

/// Items per classify `session.run` at most: 16,384 rows of 4,096 features are 256 MiB.
const MAX_BATCH_SIZE: usize = 16_384;
/// Rows decoded together at most.
const MAX_GENERATE_BATCH_SIZE: usize = 1024;
/// Most shard messages or chat messages held at once.
const MAX_OUTSTANDING: i64 = 100_000;

/// `v` unless it is empty or blank, else the line that says so.
fn not_empty(flag: &str, var: &str, v: String) -> Result<String, String> {
    if v.trim().is_empty() {
        Err(format!("{flag} ({var}) must not be empty"))
    } else {
        Ok(v)
    }
}

/// `v` if it is `host:port` (`[::1]:8085` for IPv6) with a port of at least `min_port` (0: a
/// free port, for a listening address), else the line that says so.
fn host_port(flag: &str, var: &str, v: String, min_port: u16) -> Result<String, String> {
    let ok = !v.contains("://")
        && v.rsplit_once(':').is_some_and(|(host, port)| {
            !host.trim().is_empty() && port.parse::<u16>().is_ok_and(|p| p >= min_port)
        });
    if ok {
        Ok(v)
    } else {
        Err(format!(
            "{flag} ({var}) must be host:port without a scheme, such as 127.0.0.1:8085, got {v:?}"
        ))
    }
}

fn default_output_root() -> String {
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/tmp"));
    format!("file://{}", dir.join("outputs").display())
}

/// `models/` of the source tree this binary was built from.
fn default_model_dir() -> PathBuf {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir.parent().unwrap_or(crate_dir).join("models")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Cmd::Serve { serve, engine } => serve_main(*serve, engine),
        Cmd::Run {
            task,
            input,
            output,
            chunk_seconds,
            threads,
            engine,
            failpoints,
        } => {
            let task: Task = match task.parse() {
                Ok(t) => t,
                Err(e) => return usage(&e),
            };
            let failpoints: Failpoints = match failpoints.parse() {
                Ok(f) => f,
                Err(e) => return usage(&e),
            };
            if let Err(e) = engine.check() {
                return usage(&e);
            }
            let opts = RunOptions {
                task,
                input,
                output,
                chunk_seconds,
                progress: true,
                threads: threads.unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map_or(2, std::num::NonZero::get)
                        .min(1024)
                }),
                settings: batch_worker::tasks::model_identity(&batch_worker::tasks::intent_dir(
                    &engine.model_dir,
                )),
            };
            embedded::install_signal_handlers();
            let result = match task {
                Task::Classify => embedded::run(&opts, || {
                    Classify::load(&engine.model_dir, engine.device, engine.batch_size, 1)
                }),
                Task::Generate => match engine.generate.options() {
                    Ok(o) => {
                        let opts = RunOptions {
                            settings: format!(
                                "{} {}",
                                o.settings(),
                                batch_worker::tasks::model_identity(&engine.lm_dir())
                            ),
                            ..opts.clone()
                        };
                        embedded::run(&opts, || {
                            let mut g = Generate::load(&engine.lm_dir(), engine.device, o)?;
                            g.set_step_delay(failpoints.generate_step_delay);
                            Ok(g)
                        })
                    }
                    Err(m) => Err(RunError::Usage(m)),
                },
            };
            match result {
                Ok(s) => {
                    let done_now = s.items - s.resumed_from;
                    let secs = s.wall.as_secs_f64().max(1e-9);
                    say!(
                        "batch-worker: wrote {} ({}) to {}{}; {} in {secs:.2} s ({:.0} items/s, {:.0}% inside session.run; model loaded in {:.2} s)",
                        counted(s.items, "line"),
                        counted(s.errors, "error"),
                        opts.output.display(),
                        if s.resumed_from > 0 {
                            format!(", resumed after {}", counted(s.resumed_from, "item"))
                        } else {
                            String::new()
                        },
                        counted(done_now, "item"),
                        done_now as f64 / secs,
                        100.0 * s.inference.as_secs_f64() / secs,
                        s.load.as_secs_f64(),
                    );
                    ExitCode::SUCCESS
                }
                Err(RunError::Usage(m)) => usage(&m),
                Err(e) => {
                    say!("batch-worker: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `n` and `noun`, plural unless `n` is 1: "1 line", "0 errors".
fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn serve_main(args: ServeArgs, engine: EngineArgs) -> ExitCode {
    let cfg = (|| -> Result<ServeConfig, String> {
        engine.check()?;
        let ack_extension = args.ack_extension_seconds;
        if !(10..=600).contains(&ack_extension) {
            return Err(format!(
                "--ack-extension-seconds (ACK_EXTENSION_SECONDS) must be 10..=600 (Pub/Sub's range), got {ack_extension}"
            ));
        }
        Ok(ServeConfig {
            chunk: positive_seconds("--chunk-seconds", args.chunk_seconds)?,
            gather: std::time::Duration::from_millis(args.generate_gather_ms),
            drain_timeout: positive_seconds("--drain-seconds", args.drain_seconds)?,
            lease: std::time::Duration::from_secs(within(
                "--lease-seconds",
                "LEASE_SECONDS",
                args.lease_seconds,
                1,
                MAX_SECONDS,
            )?),
            ack_extension: std::time::Duration::from_secs(ack_extension),
            max_lease: std::time::Duration::from_secs(within(
                "--max-lease-seconds",
                "MAX_LEASE_SECONDS",
                args.max_lease_seconds,
                60,
                7 * MAX_SECONDS,
            )?),
            failpoints: args.failpoints.parse()?,
            worker_id: args
                .worker_id
                .filter(|w| !w.is_empty())
                .unwrap_or_else(hostname),
            project: not_empty("--project", "GCP_PROJECT", args.project)?,
            subscription: not_empty("--subscription", "PUBSUB_SUBSCRIPTION", args.subscription)?,
            chat_subscription: Some(args.chat_subscription).filter(|s| !s.is_empty()),
            dead_letter_topic: Some(args.dead_letter_topic).filter(|t| !t.is_empty()),
            dead_letter_subscription: Some(args.dead_letter_subscription).filter(|t| !t.is_empty()),
            jobs_topic: Some(args.jobs_topic).filter(|t| !t.is_empty()),
            chat_topic: Some(args.chat_topic).filter(|t| !t.is_empty()),
            input_shard_items: args.input_shard_items,
            database: not_empty("--database", "FIRESTORE_DATABASE", args.database)?,
            pubsub_emulator: args
                .pubsub_emulator_host
                .filter(|h| !h.is_empty())
                .map(|h| host_port("--pubsub-emulator-host", "PUBSUB_EMULATOR_HOST", h, 1))
                .transpose()?,
            firestore_emulator: args
                .firestore_emulator_host
                .filter(|h| !h.is_empty())
                .map(|h| host_port("--firestore-emulator-host", "FIRESTORE_EMULATOR_HOST", h, 1))
                .transpose()?,
            output_root: batch_worker::outputs::check_root(&args.output_root)
                .map(|_| args.output_root)
                .map_err(|e| format!("--output-root (OUTPUT_ROOT): {e}"))?,
            // Pub/Sub reads 0 or less as "no limit": refused, as a GPU worker needs one.
            max_outstanding_messages: within(
                "--max-outstanding-messages",
                "MAX_OUTSTANDING_MESSAGES",
                args.max_outstanding_messages,
                1,
                MAX_OUTSTANDING,
            )?,
            chat_max_outstanding_messages: within(
                "--chat-max-outstanding-messages",
                "CHAT_MAX_OUTSTANDING_MESSAGES",
                args.chat_max_outstanding_messages,
                1,
                MAX_OUTSTANDING,
            )?,
            max_outstanding_bytes: at_least(
                "--max-outstanding-bytes",
                "MAX_OUTSTANDING_BYTES",
                args.max_outstanding_bytes,
                1,
            )?,
            poison_limit: within("--poison-limit", "POISON_LIMIT", args.poison_limit, 1, 1000)?,
            metrics_addr: Some(args.metrics_addr)
                .filter(|a| !a.is_empty())
                .map(|a| host_port("--metrics-addr", "METRICS_ADDR", a, 0))
                .transpose()?,
            metadata_host: args.metadata_host,
        })
    })();
    let cfg = match cfg {
        Ok(c) => c,
        Err(m) => return usage(&m),
    };
    let classify = match Classify::load(&engine.model_dir, engine.device, engine.batch_size, 0) {
        Ok(c) => c,
        Err(e) => return load_failed(&e),
    };
    let generate = match engine.generate.options() {
        Err(m) => return usage(&m),
        Ok(o) => {
            let dir = engine.lm_dir();
            if dir.join("model.onnx").is_file() {
                match Generate::load(&dir, engine.device, o) {
                    Ok(g) => Some(g),
                    Err(e) => return load_failed(&e),
                }
            } else {
                tracing::warn!(
                    dir = %dir.display(),
                    "no text-generation model: generate and queued chat jobs will fail with model_unavailable"
                );
                None
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say!("batch-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(batch_worker::serve::serve(cfg, classify, generate)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "serve stopped");
            say!("batch-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()))
}

/// A model that cannot be loaded: exit 2 when it is a setting to fix (missing or broken
/// model files, ONNX Runtime, `--device cuda` without a usable GPU), which a restart would
/// not change (the unit file does not restart on 2), else 1.
fn load_failed(e: &batch_worker::engine::EngineError) -> ExitCode {
    if e.is_setup() {
        return usage(&e.to_string());
    }
    say!("batch-worker: {e}");
    ExitCode::FAILURE
}

fn usage(message: &str) -> ExitCode {
    say!("batch-worker: {message}");
    ExitCode::from(2)
}

fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| "warn,batch_worker=info".into());
    // A log line that cannot be written (stderr closed: a pipe whose reader ended, a journal
    // that restarted) is dropped. By default the library reports that with `eprintln!`,
    // which panics on the same closed stderr: the worker died at start, or a task died and
    // the drain never ended.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn counts_are_singular_only_for_one() {
        assert_eq!(super::counted(1, "line"), "1 line");
        assert_eq!(super::counted(0, "error"), "0 errors");
        assert_eq!(super::counted(2_000, "line"), "2000 lines");
    }

    /// Every environment variable the CLI reads, with the subcommands that read it.
    fn env_vars() -> Vec<(String, String)> {
        let cli = super::Cli::command();
        let mut vars = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                if let Some(env) = arg.get_env() {
                    vars.push((
                        env.to_string_lossy().into_owned(),
                        sub.get_name().to_owned(),
                    ));
                }
            }
        }
        vars
    }

    /// The README documents every variable the CLI reads (its configuration tables name each
    /// in backticks).
    #[test]
    fn the_readme_documents_every_environment_variable() {
        let readme = include_str!("../../README.md");
        let vars = env_vars();
        assert!(vars.len() >= 20, "{vars:?}");
        let missing: Vec<String> = vars
            .iter()
            .filter(|(v, _)| !readme.contains(&format!("`{v}`")))
            .map(|(v, sub)| format!("{v} ({sub})"))
            .collect();
        assert!(missing.is_empty(), "not in README.md: {missing:?}");
    }

    /// A flag whose name is not its variable's (`--subscription` for `PUBSUB_SUBSCRIPTION`)
    /// cannot be guessed from the tables: the README names it too, as `` `--flag` / `VAR` ``.
    #[test]
    fn the_readme_names_each_flag_beside_its_variable() {
        let readme = include_str!("../../README.md");
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        for arg in cli.get_subcommands().flat_map(|s| s.get_arguments()) {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            let env = env.to_string_lossy();
            if arg.is_hide_set() || long == env.to_lowercase().replace('_', "-") {
                continue;
            }
            let row = format!("`--{long}` / `{env}`");
            if !readme.contains(&row) && !missing.contains(&row) {
                missing.push(row);
            }
        }
        assert!(missing.is_empty(), "not in README.md: {missing:?}");
    }
}

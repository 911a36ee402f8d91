//! `cargo xtask dev`: the whole stack on this machine, stopped cleanly on Ctrl-C or SIGTERM.

use anyhow::Context;
use stack::emulators::Emulators;
use stack::gcp::{PubSub, Topology};
use stack::worker::WorkerConfig;
use stack::wrangler::{EdgeConfig, Wrangler};

use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Google Cloud project id used with the emulators
    #[arg(long, env = "GOOGLE_CLOUD_PROJECT", default_value = "cheap-serve-dev")]
    pub project: String,
    /// Port of `wrangler dev` on 127.0.0.1
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Folder of the stack's logs, outputs and `wrangler dev` state (default: `.dev` in the
    /// checkout); one stack at a time per folder
    #[arg(long, env = "DEV_DIR")]
    pub dir: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Absolute: the worker's OUTPUT_ROOT is a file:// URL of a folder in it.
    let dir = match args.dir.as_ref().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => std::path::absolute(d).with_context(|| format!("--dir {}", d.display()))?,
        None => root().join(".dev"),
    };
    // One stack per folder: a second one would rewrite the first one's wrangler settings
    // (which wrangler reloads at once) and logs. Held until this process exits.
    let _lock = lock(&dir)?;
    free_port(args.port, "--port")?;
    let metrics = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    if let Ok(addr) = metrics.parse::<std::net::SocketAddr>() {
        free_port(addr.port(), "METRICS_ADDR")?;
    }
    // Fail on a missing prerequisite before spending minutes on installs.
    stack::prereq::emulator_tools(&stack::prereq::Env::from_process())?;
    setup::all()?;
    setup::build_worker()?;
    // BATCH_WORKER_BIN: a worker binary already built (the tests pass the one they built).
    if std::env::var_os("BATCH_WORKER_BIN").is_none() {
        setup::batch_worker()?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(serve(args, &dir, metrics))
}

/// An exclusive lock on `dir/dev.lock` holding this process's id, or the error naming the
/// process that holds it.
fn lock(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("dev.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        anyhow::bail!(
            "another `cargo xtask dev` (pid {}) is running with {}: stop it (Ctrl-C) first, or \
             give this one its own --dir (DEV_DIR), --port and METRICS_ADDR",
            pid.trim(),
            dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Fails naming `what` when `port` (not 0) on 127.0.0.1 already has a listener.
fn free_port(port: u16, what: &str) -> anyhow::Result<()> {
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "127.0.0.1:{port} ({what}) is already in use: stop what listens there, or choose \
             another port"
        ),
        Err(e) => Err(e).with_context(|| format!("checking 127.0.0.1:{port} ({what})")),
    }
}

async fn serve(args: Args, dir: &std::path::Path, metrics: String) -> anyhow::Result<()> {
    // Listen before starting anything, so a signal at any point stops what was started.
    let mut stop = StopSignal::new()?;
    let logs = dir.join("logs");
    eprintln!(
        "starting the Pub/Sub and Firestore emulators (logs in {})",
        logs.display()
    );
    let mut emulators = Emulators::start(&logs).await?;
    let topology = Topology::dev(&args.project);
    PubSub::new(&emulators.pubsub_host)
        .create_topology(&topology, 60, 10)
        .await
        .context("creating topics and subscriptions")?;

    let outputs = dir.join("outputs");
    std::fs::create_dir_all(&outputs)?;
    let worker_bin = std::env::var_os("BATCH_WORKER_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/batch-worker"));
    let worker = WorkerConfig::new(&worker_bin, "dev-worker", &emulators, &topology, &outputs)
        .with("METRICS_ADDR", metrics)
        .start(&logs.join("batch-worker.log"))
        .context("starting batch-worker serve")?;

    for g in [&emulators.pubsub, &emulators.firestore, &worker] {
        println!(
            "{} pid={} log={}",
            g.name(),
            g.pid(),
            g.log_path().display()
        );
    }
    let api_key = dev_api_key()?;
    let salt = crate::random_bytes(16)?;
    let cfg = EdgeConfig {
        project: args.project.clone(),
        topic: topology.topic.clone(),
        chat_topic: topology.chat_topic.clone(),
        pubsub_host: emulators.pubsub_host.clone(),
        firestore_host: emulators.firestore_host.clone(),
        api_keys: shared::apikey::entry("dev", &api_key, &salt),
        vars: Vec::new(),
        rate_limit: Some(600),
    };
    eprintln!("starting wrangler dev on 127.0.0.1:{}", args.port);
    let wrangler = Wrangler::start(&dir.join("wrangler"), &cfg, args.port).await?;
    println!(
        "{} pid={} log={}",
        wrangler.group.name(),
        wrangler.group.pid(),
        wrangler.group.log_path().display()
    );
    println!("URL={}", wrangler.url);
    println!("PUBSUB_EMULATOR_HOST={}", emulators.pubsub_host);
    println!("FIRESTORE_EMULATOR_HOST={}", emulators.firestore_host);
    println!(
        "topic={} subscription={} chat_topic={} chat_subscription={}",
        topology.topic,
        topology.subscription,
        topology.chat_topic,
        topology.chat_subscription.as_deref().unwrap_or("")
    );
    println!("OUTPUT_ROOT=file://{}", outputs.display());
    println!("DEV_API_KEY={api_key}");
    println!("ready; press Ctrl-C to stop");

    stop.recv().await;
    eprintln!("stopping");
    drop(wrangler);
    // The worker drains (checkpoint, nack) on SIGTERM before the emulators go.
    drop(worker);
    emulators.stop();
    Ok(())
}

/// `DEV_API_KEY` if set, else a fresh random key.
pub fn dev_api_key() -> anyhow::Result<String> {
    if let Ok(k) = std::env::var("DEV_API_KEY")
        && !k.is_empty()
    {
        return Ok(k);
    }
    Ok(format!("dev_{}", hex::encode(crate::random_bytes(18)?)))
}

/// SIGINT (Ctrl-C) or SIGTERM, registered up front.
struct StopSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

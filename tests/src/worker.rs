//! `batch-worker serve` as a process group, configured like the startup script configures it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::emulators::Emulators;
use crate::gcp::Topology;
use crate::process::Group;

/// How to start one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The `batch-worker` executable.
    pub bin: PathBuf,
    pub worker_id: String,
    pub topology: Topology,
    pub pubsub_host: String,
    pub firestore_host: String,
    /// `file:///…` directory for outputs.
    pub output_root: String,
    /// Extra environment (`CHUNK_SECONDS`, `LEASE_SECONDS`, `BATCH_WORKER_FAILPOINTS`, …).
    pub env: Vec<(String, String)>,
}

impl WorkerConfig {
    pub fn new(
        bin: &Path,
        worker_id: &str,
        emu: &Emulators,
        topology: &Topology,
        output_dir: &Path,
    ) -> Self {
        Self {
            bin: bin.to_owned(),
            worker_id: worker_id.to_owned(),
            topology: topology.clone(),
            pubsub_host: emu.pubsub_host.clone(),
            firestore_host: emu.firestore_host.clone(),
            output_root: format!("file://{}", output_dir.display()),
            env: Vec::new(),
        }
    }

    /// Adds an environment variable.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Whether `bin` reads `CHAT_SUBSCRIPTION` (builds before it took chat messages on the
    /// jobs subscription alone; `cargo xtask bench-chat --compare` measures such builds too).
    pub fn reads_chat_subscription(bin: &Path) -> anyhow::Result<bool> {
        let out = Command::new(bin)
            .args(["serve", "--help"])
            .output()
            .with_context(|| format!("running {} serve --help", bin.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("CHAT_SUBSCRIPTION"))
    }

    /// Starts `batch-worker serve --device cpu`, output in `log`.
    pub fn start(&self, log: &Path) -> anyhow::Result<Group> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "--device", "cpu"])
            .env("GCP_PROJECT", &self.topology.project)
            .env("PUBSUB_SUBSCRIPTION", &self.topology.subscription)
            .env(
                "CHAT_SUBSCRIPTION",
                self.topology.chat_subscription.as_deref().unwrap_or(""),
            )
            .env("DEAD_LETTER_TOPIC", &self.topology.dead_letter_topic)
            .env("DEAD_LETTER_SUBSCRIPTION", &self.topology.dead_letter_watch)
            .env("JOBS_TOPIC", &self.topology.topic)
            .env(
                "CHAT_TOPIC",
                match self.topology.chat_subscription {
                    Some(_) => self.topology.chat_topic.as_str(),
                    None => "",
                },
            )
            .env("PUBSUB_EMULATOR_HOST", &self.pubsub_host)
            .env("FIRESTORE_EMULATOR_HOST", &self.firestore_host)
            .env("OUTPUT_ROOT", &self.output_root)
            .env("WORKER_ID", &self.worker_id)
            .env("METRICS_ADDR", "")
            .env("RUST_LOG", "warn,batch_worker=info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Group::spawn(&format!("batch-worker {}", self.worker_id), cmd, log)
    }
}

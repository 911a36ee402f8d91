//! The local stack harness, shared by `cargo xtask dev` and the system tests.
//!
//! Every service runs in its own process group ([`process::Group`]) and the whole group is
//! killed on drop, so no `java` child of an emulator launcher outlives its owner.

pub mod chaos;
pub mod emulators;
pub mod gcp;
pub mod google;
mod http1;
pub mod jobs;
pub mod lambda;
pub mod load;
pub mod metadata;
pub mod prereq;
pub mod process;
pub mod worker;
pub mod wrangler;

use std::time::Duration;

use anyhow::{Context, bail};

/// The repository root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// The release build of `batch-worker` in this workspace (`cargo test --release` builds it).
pub fn release_worker() -> std::path::PathBuf {
    root().join("target/release/batch-worker")
}

/// The texts of the intent model's test split (`models/intent/data/test.jsonl`).
pub fn intent_test_texts() -> anyhow::Result<Vec<String>> {
    let path = root().join("models/intent/data/test.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            v["text"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{}: a line without `text`", path.display()))
        })
        .collect()
}

/// Asks the OS for a free loopback TCP port.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Polls `probe` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what} not ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A name unique within this machine for topics, subscriptions and projects of one test.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

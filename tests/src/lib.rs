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

/// The first port of the kernel's range for outgoing connections (`ip_local_port_range`).
fn outgoing_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback TCP port that is free now, for a server started next.
///
/// Chosen below the kernel's range for outgoing connections (`ip_local_port_range`, from
/// 32768 by default), not by binding port 0, which hands out a port of that very range: there,
/// a client socket of any test could take the port between this check and the server's bind
/// (seen as the Pub/Sub emulator's `BindException: Address already in use`).
pub fn free_port() -> anyhow::Result<u16> {
    // Handed out by this process already: its servers may not have bound them yet.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const FLOOR: u16 = 20_000;
    let ephemeral_start = outgoing_ports_start();
    if ephemeral_start > FLOOR + 1_000 {
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32
            ^ given.len() as u64;
        let mut rng = shared::rng::SplitMix64(seed);
        let span = u64::from(ephemeral_start - FLOOR);
        for _ in 0..200 {
            let port = FLOOR + (rng.next_u64() % span) as u16;
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return Ok(port);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_bindable_distinct_and_outside_the_outgoing_range() {
        let start = super::outgoing_ports_start();
        let ports: Vec<u16> = (0..50)
            .map(|_| super::free_port().expect("a port"))
            .collect();
        for &p in &ports {
            assert!(
                p < start,
                "{p} is in the range outgoing connections use (from {start})"
            );
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("still free");
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
    }
}

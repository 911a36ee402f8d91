//! Whether the services `serve` depends on answer at all, said in the log at start-up.
//!
//! Google's Pub/Sub client retries a streaming pull it cannot open for as long as the process
//! lives, and says nothing while it does: a worker pointed at a wrong host or port logs
//! `serving` and then waits in silence, its jobs never arriving. So `serve` connects to each
//! endpoint (TCP) as it starts, warns while one does not answer, and says when it answers.
//! Nothing else changes: the clients keep their own retries.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One service endpoint to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The service's name in the log (`Pub/Sub`, `Firestore`).
    pub service: &'static str,
    /// `host:port`.
    pub addr: String,
    /// What waits on it, for the warning (`no job can arrive`).
    pub blocks: &'static str,
}

impl Endpoint {
    /// The emulator's `host:port` when one is configured, else Google's `host:443`.
    pub fn new(
        service: &'static str,
        emulator: Option<&str>,
        google_host: &str,
        blocks: &'static str,
    ) -> Self {
        let addr = match emulator {
            Some(host) => host.to_owned(),
            None => format!("{google_host}:443"),
        };
        Self {
            service,
            addr,
            blocks,
        }
    }
}

/// One TCP connection attempt to `addr` (`host:port`), closed at once.
pub async fn probe(addr: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}

/// Probes `ep` every `every` until it answers or `stop` is cancelled. Logs nothing when the
/// first attempt succeeds; otherwise a warning at once, again after each `repeat` of
/// failures, and a line when it answers.
pub async fn watch(ep: Endpoint, every: Duration, repeat: Duration, stop: CancellationToken) {
    let started = Instant::now();
    let mut warned: Option<Instant> = None;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe(&ep.addr, CONNECT_TIMEOUT) => r,
        };
        match (result, warned) {
            (Ok(()), None) => return,
            (Ok(()), Some(_)) => {
                tracing::info!(
                    service = ep.service,
                    addr = %ep.addr,
                    after_s = started.elapsed().as_secs(),
                    "{} at {} answers",
                    ep.service,
                    ep.addr
                );
                return;
            }
            (Err(e), None) => {
                tracing::warn!(
                    service = ep.service,
                    addr = %ep.addr,
                    error = %e,
                    "cannot reach {} at {}: {e}; {} until it answers (its client keeps retrying)",
                    ep.service,
                    ep.addr,
                    ep.blocks
                );
                warned = Some(Instant::now());
            }
            (Err(e), Some(at)) if at.elapsed() >= repeat => {
                tracing::warn!(
                    service = ep.service,
                    addr = %ep.addr,
                    error = %e,
                    after_s = started.elapsed().as_secs(),
                    "still cannot reach {} at {}: {e}",
                    ep.service,
                    ep.addr
                );
                warned = Some(Instant::now());
            }
            (Err(_), Some(_)) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_is_the_emulator_or_google() {
        let emu = Endpoint::new(
            "Pub/Sub",
            Some("127.0.0.1:8085"),
            "pubsub.googleapis.com",
            "x",
        );
        assert_eq!(emu.addr, "127.0.0.1:8085");
        let prod = Endpoint::new("Pub/Sub", None, "pubsub.googleapis.com", "x");
        assert_eq!(prod.addr, "pubsub.googleapis.com:443");
    }

    /// A port nothing listens on: bound, then released.
    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        addr
    }

    /// Watches `ep`, probing every 20 ms.
    fn spawn_watch(ep: Endpoint) -> (tokio::task::JoinHandle<()>, CancellationToken) {
        let stop = CancellationToken::new();
        let every = Duration::from_millis(20);
        let task = tokio::spawn(watch(ep, every, Duration::from_secs(60), stop.clone()));
        (task, stop)
    }

    #[tokio::test]
    async fn probe_tells_a_listener_from_a_closed_port() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = l.local_addr().expect("addr").to_string();
        assert_eq!(probe(&open, Duration::from_secs(5)).await, Ok(()));
        let err = probe(&closed_port(), Duration::from_secs(5))
            .await
            .expect_err("closed port");
        assert!(err.contains("refused"), "{err}");
        let err = probe("no-port-here", Duration::from_secs(5))
            .await
            .expect_err("no port");
        assert!(!err.is_empty());
    }

    #[tokio::test]
    async fn watch_ends_when_the_endpoint_answers() {
        let addr = closed_port();
        let ep = Endpoint {
            service: "Pub/Sub",
            addr: addr.clone(),
            blocks: "no job can arrive",
        };
        let (task, _stop) = spawn_watch(ep);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished(), "watch ended while nothing listened");
        let _l = tokio::net::TcpListener::bind(&addr).await.expect("rebind");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch did not end once the endpoint answered")
            .expect("join");
    }

    #[tokio::test]
    async fn watch_stops_when_told() {
        let ep = Endpoint {
            service: "Firestore",
            addr: closed_port(),
            blocks: "no shard can start",
        };
        let (task, stop) = spawn_watch(ep);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch ignored stop")
            .expect("join");
    }
}

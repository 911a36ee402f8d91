//! Prometheus metrics in the text exposition format, served on `METRICS_ADDR`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets in seconds (upper bounds).
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if s <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything the worker counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub items: Counter,
    pub item_failures: Counter,
    pub messages: Counter,
    pub redeliveries: Counter,
    pub lease_losses: Counter,
    pub drains: Counter,
    pub shard_errors: Counter,
    pub shards_completed: Counter,
    pub shards_quarantined: Counter,
    pub dead_letters_requeued: Counter,
    pub jobs_succeeded: Counter,
    pub jobs_failed: Counter,
    pub jobs_cancelled: Counter,
    pub generate_batches: Counter,
    pub generate_rows: Counter,
    pub generate_merged: Counter,
    pub generate_abandoned: Counter,
    /// Shared with the Firestore client, which counts its calls.
    pub firestore_operations: std::sync::Arc<Counter>,
    pub inference: Histogram,
    pub chunk_commit: Histogram,
    /// From a chat message's publish to its ack here: how long someone waited for a reply.
    pub chat_reply: Histogram,
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &Counter); 18] = [
            (
                "batch_worker_items_total",
                "Items with a committed output line",
                &self.items,
            ),
            (
                "batch_worker_item_failures_total",
                "Items whose output line is an error",
                &self.item_failures,
            ),
            (
                "batch_worker_messages_total",
                "Pub/Sub messages received",
                &self.messages,
            ),
            (
                "batch_worker_redeliveries_total",
                "Messages received again (delivery attempt > 1, or a shard already leased before)",
                &self.redeliveries,
            ),
            (
                "batch_worker_lease_losses_total",
                "Shards stopped because another worker took their lease",
                &self.lease_losses,
            ),
            (
                "batch_worker_drains_total",
                "Shards checkpointed and released on SIGTERM or preemption",
                &self.drains,
            ),
            (
                "batch_worker_shard_errors_total",
                "Shards given back after an error the worker lived through (storage or Firestore failing)",
                &self.shard_errors,
            ),
            (
                "batch_worker_shards_completed_total",
                "Shards finished",
                &self.shards_completed,
            ),
            (
                "batch_worker_shards_quarantined_total",
                "Shards (and input_uri plans) sent to the dead-letter topic",
                &self.shards_quarantined,
            ),
            (
                "batch_worker_dead_letters_requeued_total",
                "Messages Pub/Sub itself dead-lettered (its delivery limit counts drains and outages) that the dead-letter watch put back on the jobs topic",
                &self.dead_letters_requeued,
            ),
            (
                "batch_worker_jobs_succeeded_total",
                "Jobs this worker finished as succeeded",
                &self.jobs_succeeded,
            ),
            (
                "batch_worker_jobs_failed_total",
                "Jobs this worker marked failed",
                &self.jobs_failed,
            ),
            (
                "batch_worker_jobs_cancelled_total",
                "Jobs this worker marked cancelled",
                &self.jobs_cancelled,
            ),
            (
                "batch_worker_generate_batches_total",
                "Prefills of the text-generation model: prompts read together, then decoded beside the rows already running",
                &self.generate_batches,
            ),
            (
                "batch_worker_generate_rows_total",
                "Prompts read in those prefills",
                &self.generate_rows,
            ),
            (
                "batch_worker_generate_merged_total",
                "Prefills that joined items of more than one shard, or rows already decoding (concurrent chat messages)",
                &self.generate_merged,
            ),
            (
                "batch_worker_generate_abandoned_total",
                "Rows that stopped decoding mid-text because their shard stopped (cancel, lease lost)",
                &self.generate_abandoned,
            ),
            (
                "batch_worker_firestore_operations_total",
                "Firestore reads and commits sent (one per call, retries not counted)",
                &self.firestore_operations,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        self.inference.render(
            "batch_worker_inference_seconds",
            "Time inside the model runtime per micro-batch (text generation: from a request reaching the generation thread to its last item done)",
            &mut out,
        );
        self.chunk_commit.render(
            "batch_worker_chunk_commit_seconds",
            "Time to write a chunk and its checkpoint",
            &mut out,
        );
        self.chat_reply.render(
            "batch_worker_chat_reply_seconds",
            "From a queued chat message's publish (Pub/Sub's clock) to its ack here: its reply committed, or its job found already finished",
            &mut out,
        );
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

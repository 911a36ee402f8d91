//! A bounded loopback load on the edge's `/v1/chat`: a fixed number of connections, each
//! sending its next request as soon as the last one is answered, with a mix of trivial
//! messages (answered at the edge) and real requests (queued). Reports throughput, latency
//! per route, errors, and the resident memory of the edge's processes over time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Trivial messages in both languages; the edge answers these itself.
pub const TRIVIAL: [&str; 10] = [
    "안녕",
    "안녕하세요",
    "고마워",
    "감사합니다",
    "ㅎㅇ",
    "뭐 할 수 있어?",
    "hello",
    "thank you",
    "bye",
    "who are you?",
];

/// The load's shape.
#[derive(Debug, Clone)]
pub struct Config {
    /// `wrangler dev`'s URL.
    pub url: String,
    pub key: String,
    pub duration: Duration,
    /// Requests in flight at any time.
    pub concurrency: usize,
    /// Every n-th request is a real request that the edge queues (5: 20 %).
    pub queued_every: usize,
}

/// Latency summary of one kind of answer, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Sorts `ms` and summarises it.
    fn of(ms: &mut [f64]) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |p: f64| {
            ms.get(((ms.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Self {
            n: ms.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// What the load measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub seconds: f64,
    pub concurrency: usize,
    pub requests: usize,
    /// Transport errors and answers other than 200 (edge) or 202 (queued).
    pub errors: usize,
    /// The first few errors, for the message.
    pub error_samples: Vec<String>,
    pub all: Latency,
    /// 200 answers (`route: edge`).
    pub edge: Latency,
    /// 202 answers (`route: queue`).
    pub queue: Latency,
    /// Latencies (ms) of every edge answer, sorted, for a histogram.
    pub edge_ms: Vec<f64>,
    /// `(seconds since start, resident bytes)` of the edge's processes, once a second.
    pub rss: Vec<(f64, u64)>,
    /// `(seconds since start, bytes)` of the Worker's own WASM linear memory, once a second
    /// (from `/healthz`'s `x-wasm-memory-bytes`; empty where the edge does not report it).
    pub wasm: Vec<(f64, u64)>,
}

impl Report {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// Resident memory growth from the first to the last third of the run (median of each),
    /// as a fraction.
    pub fn rss_growth(&self) -> f64 {
        let third = (self.rss.len() / 3).max(1);
        let median = |s: &[(f64, u64)]| {
            let mut v: Vec<u64> = s.iter().map(|r| r.1).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0) as f64
        };
        let first = median(&self.rss[..third.min(self.rss.len())]);
        let last = median(&self.rss[self.rss.len().saturating_sub(third)..]);
        if first == 0.0 {
            return 0.0;
        }
        last / first - 1.0
    }

    /// The Worker's WASM memory after the first 2 s of load and at the end, in bytes.
    pub fn wasm_first_last(&self) -> Option<(u64, u64)> {
        let first = self
            .wasm
            .iter()
            .find(|w| w.0 >= 2.0)
            .or(self.wasm.first())?;
        Some((first.1, self.wasm.last()?.1))
    }

    /// One Markdown table row set.
    pub fn table(&self) -> String {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let rss_first = self.rss.first().map_or(0, |r| r.1);
        let rss_max = self.rss.iter().map(|r| r.1).max().unwrap_or(0);
        let rss_last = self.rss.last().map_or(0, |r| r.1);
        format!(
            "| requests | req/s | errors | p50 ms | p99 ms | edge answers (p50 / p99 ms) | queued (p50 / p99 ms) | edge RSS first / max / last (MiB) | Worker WASM memory after 2 s / last (MiB) |\n\
             |---:|---:|---:|---:|---:|---|---|---|---|\n\
             | {} | {:.0} | {} | {:.2} | {:.2} | {} ({:.2} / {:.2}) | {} ({:.2} / {:.2}) | {:.0} / {:.0} / {:.0} ({:+.1} %) | {} |\n",
            self.requests,
            self.rps(),
            self.errors,
            self.all.p50,
            self.all.p99,
            self.edge.n,
            self.edge.p50,
            self.edge.p99,
            self.queue.n,
            self.queue.p50,
            self.queue.p99,
            mb(rss_first),
            mb(rss_max),
            mb(rss_last),
            self.rss_growth() * 100.0,
            self.wasm_first_last().map_or("—".into(), |(a, b)| format!(
                "{:.1} / {:.1}",
                mb(a),
                mb(b)
            ))
        )
    }
}

enum Outcome {
    Edge(f64),
    Queue(f64),
    Error(String),
}

/// Runs the load; `rss` reads the edge's resident bytes.
pub async fn run(cfg: &Config, rss: &(dyn Fn() -> u64 + Sync)) -> Report {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .build()
        .unwrap_or_default();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let mut tasks = Vec::new();
    for _ in 0..cfg.concurrency.max(1) {
        let (http, next, cfg) = (http.clone(), next.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                out.push(one(&http, &cfg, i).await);
            }
            out
        }));
    }
    let mut samples = Vec::new();
    let mut wasm = Vec::new();
    while Instant::now() < deadline {
        let at = started.elapsed().as_secs_f64();
        samples.push((at, rss()));
        if let Some(bytes) = wasm_memory(&http, &cfg.url).await {
            wasm.push((at, bytes));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        match t.await {
            Ok(o) => outcomes.extend(o),
            Err(e) => outcomes.push(Outcome::Error(format!("load task failed: {e}"))),
        }
    }
    samples.push((started.elapsed().as_secs_f64(), rss()));
    let seconds = started.elapsed().as_secs_f64();
    if let Some(bytes) = wasm_memory(&http, &cfg.url).await {
        wasm.push((seconds, bytes));
    }
    let (mut edge, mut queue, mut all, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for o in outcomes {
        match o {
            Outcome::Edge(ms) => {
                edge.push(ms);
                all.push(ms);
            }
            Outcome::Queue(ms) => {
                queue.push(ms);
                all.push(ms);
            }
            Outcome::Error(e) => errors.push(e),
        }
    }
    Report {
        seconds,
        concurrency: cfg.concurrency,
        requests: all.len() + errors.len(),
        errors: errors.len(),
        error_samples: errors.into_iter().take(5).collect(),
        all: Latency::of(&mut all),
        edge: Latency::of(&mut edge),
        edge_ms: edge,
        queue: Latency::of(&mut queue),
        rss: samples,
        wasm,
    }
}

/// The Worker's WASM memory from `/healthz` (`None` if it does not say).
async fn wasm_memory(http: &reqwest::Client, url: &str) -> Option<u64> {
    let r = http.get(format!("{url}/healthz")).send().await.ok()?;
    r.headers()
        .get("x-wasm-memory-bytes")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn one(http: &reqwest::Client, cfg: &Config, i: usize) -> Outcome {
    let message = if cfg.queued_every > 0 && i.is_multiple_of(cfg.queued_every) {
        format!("급식카드 되는 근처 분식집 추천해줘 ({i})")
    } else {
        TRIVIAL[i % TRIVIAL.len()].to_owned()
    };
    let t = Instant::now();
    let resp = http
        .post(format!("{}/v1/chat", cfg.url))
        .bearer_auth(&cfg.key)
        .json(&json!({ "message": message }))
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Outcome::Error(format!("request {i}: {e}")),
    };
    let status = resp.status().as_u16();
    let body: Value = match resp.json().await {
        Ok(v) => v,
        Err(e) => return Outcome::Error(format!("request {i}: {status}, unreadable body: {e}")),
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match (status, body["route"].as_str()) {
        (200, Some("edge")) if body["reply"].is_string() => Outcome::Edge(ms),
        (202, Some("queue")) if body["job_id"].is_string() => Outcome::Queue(ms),
        _ => Outcome::Error(format!("request {i} ({message:?}): {status} {body}")),
    }
}

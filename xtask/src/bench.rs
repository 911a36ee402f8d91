//! `cargo xtask bench-edge`: latency of the Worker in `wrangler dev` on loopback.
//!
//! Trivial `/v1/chat` (answered at the edge: auth, validation, featurize, tract, reply) is
//! measured side by side with `/hello` of the same Worker, interleaved in one run, so
//! wrangler's local proxy cost cancels out: `POST /hello` with the same headers and body (the
//! Worker reads the body and answers "hello"), and `GET /hello`. Also the cold start: time to `Ready on` and the
//! first request to the fresh isolate.

use std::time::Instant;

use anyhow::{Context, bail};
use stack::wrangler::{EdgeConfig, Wrangler};

use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Measured requests per route (after the warm-up)
    #[arg(long, default_value_t = 2000, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub requests: usize,
    /// Configure the rate-limit binding (as deployed); without it the Worker's in-isolate
    /// fallback limit applies
    #[arg(long)]
    pub rate_limit_binding: bool,
    /// `LOG_REQUESTS` for the Worker (`all` or `errors`)
    #[arg(long, default_value = "all", value_parser = ["all", "errors"])]
    pub log_requests: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    println!("{}", measure(&args)?.table());
    Ok(())
}

/// Builds the Worker and measures it.
pub fn measure(args: &Args) -> anyhow::Result<Report> {
    setup::build_edge()?;
    tokio::runtime::Runtime::new()?.block_on(bench(args))
}

/// What `bench-edge` measured.
pub struct Report {
    pub requests: usize,
    /// Sorted latencies (ms) of `GET /hello`, `POST /hello` and trivial `POST /v1/chat`.
    pub hello: Vec<f64>,
    pub hello_post: Vec<f64>,
    pub chat: Vec<f64>,
    pub per_classify_ms: f64,
    pub repeat: u32,
    pub ready_s: f64,
    pub first_ms: f64,
}

impl Report {
    pub fn table(&self) -> String {
        let (g50, g99) = (percentile(&self.hello, 0.5), percentile(&self.hello, 0.99));
        let (h50, h99) = (
            percentile(&self.hello_post, 0.5),
            percentile(&self.hello_post, 0.99),
        );
        let (c50, c99) = (percentile(&self.chat, 0.5), percentile(&self.chat, 0.99));
        format!(
            "`wrangler dev` on loopback, {} sequential requests per route, interleaved\n\n\
             | route | p50 ms | p99 ms |\n|---|---:|---:|\n\
             | GET /hello (same Worker, no core) | {g50:.2} | {g99:.2} |\n\
             | POST /hello (same headers and body, read; no core) | {h50:.2} | {h99:.2} |\n\
             | POST /v1/chat, trivial (edge answer) | {c50:.2} | {c99:.2} |\n\
             | difference /v1/chat − POST /hello | {:.2} | {:.2} |\n\
             | difference /v1/chat − GET /hello | {:.2} | {:.2} |\n\n\
             classify (featurize + tract + decide) inside the Worker: {:.3} ms per message \
             (from {} classifications per request, 300 requests)\n\n\
             cold start: wrangler ready after {:.1} s; first request {:.1} ms\n",
            self.requests,
            c50 - h50,
            c99 - h99,
            c50 - g50,
            c99 - g99,
            self.per_classify_ms,
            self.repeat,
            self.ready_s,
            self.first_ms
        )
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

struct Run {
    hello: Vec<f64>,
    hello_post: Vec<f64>,
    chat: Vec<f64>,
    ready_s: f64,
    first_ms: f64,
}

/// Starts a Worker with `repeat` classifications per message and measures `n` interleaved
/// requests per route after a warm-up.
async fn measure_once(args: &Args, repeat: u32, n: usize) -> anyhow::Result<Run> {
    let key = format!("cs_bench_{}", hex::encode(crate::random_bytes(12)?));
    let cfg = EdgeConfig {
        project: "bench".into(),
        topic: "jobs".into(),
        chat_topic: "jobs".into(),
        // Trivial messages never reach Pub/Sub or Firestore.
        pubsub_host: "127.0.0.1:9".into(),
        firestore_host: "127.0.0.1:9".into(),
        api_keys: shared::apikey::entry("bench", &key, &crate::random_bytes(16)?),
        vars: vec![
            ("RATE_LIMIT_PER_MINUTE".into(), "1000000".into()),
            ("LOG_REQUESTS".into(), args.log_requests.clone()),
            ("BENCH_CLASSIFY_REPEAT".into(), repeat.to_string()),
            ("BENCH_ROUTES".into(), "1".into()),
        ],
        rate_limit: args.rate_limit_binding.then_some(1_000_000),
    };
    let dir = root().join(format!("target/bench-edge/{repeat}"));
    let _ = std::fs::remove_dir_all(&dir);
    let spawned = Instant::now();
    let wrangler = Wrangler::start(&dir, &cfg, 0).await?;
    let ready_s = spawned.elapsed().as_secs_f64();
    let http = reqwest::Client::new();
    let hello_url = format!("{}/hello", wrangler.url);
    let post = |http: &reqwest::Client, path: &str| {
        http.post(format!("{}{path}", wrangler.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(r#"{"message":"안녕하세요"}"#)
    };
    let chat = |http: &reqwest::Client| post(http, "/v1/chat");
    let t = Instant::now();
    let first = chat(&http).send().await.context("first request")?;
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    if first.status() != 200 {
        bail!(
            "trivial chat answered {}: {}",
            first.status(),
            first.text().await.unwrap_or_default()
        );
    }
    // The baseline must be the Worker's `/hello` (`BENCH_ROUTES`), not the core's 404.
    let hello = http.get(&hello_url).send().await?.text().await?;
    if hello != "hello" {
        bail!("GET /hello answered {hello:?}, not the benchmark's baseline \"hello\"");
    }
    for _ in 0..200.min(n) {
        http.get(&hello_url).send().await?.bytes().await?;
        post(&http, "/hello").send().await?.bytes().await?;
        chat(&http).send().await?.bytes().await?;
    }
    let (mut hello, mut hello_post, mut trivial) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        http.get(&hello_url).send().await?.bytes().await?;
        hello.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        post(&http, "/hello").send().await?.bytes().await?;
        hello_post.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let r = chat(&http).send().await?;
        let ok = r.status() == 200;
        r.bytes().await?;
        trivial.push(t.elapsed().as_secs_f64() * 1e3);
        if !ok {
            bail!("a trivial chat failed during the run");
        }
    }
    drop(wrangler);
    for v in [&mut hello, &mut hello_post, &mut trivial] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Run {
        hello,
        hello_post,
        chat: trivial,
        ready_s,
        first_ms,
    })
}

async fn bench(args: &Args) -> anyhow::Result<Report> {
    let run = measure_once(args, 1, args.requests).await?;
    const REPEAT: u32 = 101;
    let heavy = measure_once(args, REPEAT, 300).await?;
    let (h50, c50) = (percentile(&run.hello_post, 0.5), percentile(&run.chat, 0.5));
    let per_classify_ms =
        (percentile(&heavy.chat, 0.5) - percentile(&heavy.hello_post, 0.5) - (c50 - h50))
            / f64::from(REPEAT - 1);
    Ok(Report {
        requests: args.requests,
        hello: run.hello,
        hello_post: run.hello_post,
        chat: run.chat,
        per_classify_ms,
        repeat: REPEAT,
        ready_s: run.ready_s,
        first_ms: run.first_ms,
    })
}

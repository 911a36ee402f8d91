//! `cargo xtask load`: a bounded loopback load on `/v1/chat` of the local stack (both
//! emulators, `wrangler dev`, one worker): requests/s, p50/p99, errors, the edge's memory.

use std::time::Duration;

use anyhow::ensure;
use stack::emulators::Emulators;
use stack::gcp::{PubSub, Topology};
use stack::worker::WorkerConfig;
use stack::wrangler::{EdgeConfig, Wrangler};

use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of load
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Requests in flight at any time
    #[arg(long, default_value_t = 16, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub concurrency: usize,
    /// Every n-th message is a real request that the edge queues (the rest are trivial)
    #[arg(long, default_value_t = 5, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub queued_every: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = measure(&args)?;
    println!("{}", heading(&args));
    println!("{}", report.table());
    ensure!(
        report.errors == 0,
        "{} of {} requests failed, e.g. {:?}",
        report.errors,
        report.requests,
        report.error_samples
    );
    Ok(())
}

pub fn heading(args: &Args) -> String {
    format!(
        "{} s of `POST /v1/chat` on `wrangler dev` (loopback), {} connections each sending its next request when answered; 1 in {} messages queued (Pub/Sub + Firestore emulators, one worker answering), the rest trivial\n",
        args.seconds, args.concurrency, args.queued_every
    )
}

/// Starts the stack and runs the load.
pub fn measure(args: &Args) -> anyhow::Result<stack::load::Report> {
    stack::prereq::emulator_tools(&stack::prereq::Env::from_process())?;
    setup::all()?;
    setup::build_worker()?;
    let worker_bin = setup::batch_worker()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let dir = root().join("target/load");
        let _ = std::fs::remove_dir_all(&dir);
        let mut emu = Emulators::start(&dir.join("logs")).await?;
        let t = Topology::unique("load");
        PubSub::new(&emu.pubsub_host)
            .create_topology(&t, 60, 10)
            .await?;
        let out = dir.join("out");
        std::fs::create_dir_all(&out)?;
        let _worker = WorkerConfig::new(&worker_bin, "load-worker", &emu, &t, &out)
            .start(&dir.join("logs/worker.log"))?;
        let key = format!("cs_load_{}", hex::encode(crate::random_bytes(12)?));
        let edge = Wrangler::start(
            &dir.join("wrangler"),
            &EdgeConfig {
                project: t.project.clone(),
                topic: t.topic.clone(),
                chat_topic: t.chat_topic.clone(),
                pubsub_host: emu.pubsub_host.clone(),
                firestore_host: emu.firestore_host.clone(),
                api_keys: shared::apikey::entry("load", &key, &crate::random_bytes(16)?),
                vars: vec![
                    ("RATE_LIMIT_PER_MINUTE".into(), "100000000".into()),
                    ("LOG_REQUESTS".into(), "errors".into()),
                ],
                rate_limit: Some(100_000_000),
            },
            0,
        )
        .await?;
        eprintln!("load: {} s on {}", args.seconds, edge.url);
        let report = stack::load::run(
            &stack::load::Config {
                url: edge.url.clone(),
                key,
                duration: Duration::from_secs(args.seconds),
                concurrency: args.concurrency,
                queued_every: args.queued_every,
            },
            &|| edge.group.rss_bytes(),
        )
        .await;
        drop(edge);
        emu.stop();
        Ok(report)
    })
}

//! `cargo xtask chaos`: the full chaos run (see `tests/src/chaos.rs`), its report printed and
//! written to `target/chaos/report.md`.

use std::time::Duration;

use crate::{root, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Classify items in all (sent as inline batches of 10,000, the edge's limit)
    #[arg(long, default_value_t = 50_000, value_parser = crate::at_least_one, allow_negative_numbers = true)]
    pub items: usize,
    /// Queued chat messages
    #[arg(long, default_value_t = 200)]
    pub chats: usize,
    /// Signals sent to workers, SIGKILL and SIGTERM in turn (one preemption notice besides)
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Seconds over which the traffic arrives
    #[arg(long, default_value_t = 90.0, value_parser = crate::seconds, allow_negative_numbers = true)]
    pub traffic_seconds: f64,
    /// Seconds before a killed worker is restarted (the systemd unit's RestartSec)
    #[arg(long, default_value_t = 5.0, value_parser = crate::seconds, allow_negative_numbers = true)]
    pub restart_seconds: f64,
    /// Seed of the kill schedule (default: from the clock; the report prints it)
    #[arg(long)]
    pub seed: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.traffic_seconds >= 0.0 && args.restart_seconds >= 0.0,
        "--traffic-seconds and --restart-seconds must not be negative"
    );
    stack::prereq::emulator_tools(&stack::prereq::Env::from_process())?;
    setup::all()?;
    setup::build_worker()?;
    let worker_bin = setup::batch_worker()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let dir = root().join("target/chaos");
    let cfg = stack::chaos::Config {
        dir: dir.join("run"),
        worker_bin,
        texts: stack::intent_test_texts()?,
        classify_items: args.items,
        batch_request_items: 10_000,
        chats: args.chats,
        kills: args.kills,
        traffic: Duration::from_secs_f64(args.traffic_seconds),
        kill_gap: (Duration::from_millis(500), Duration::from_millis(2500)),
        restart_delay: Duration::from_secs_f64(args.restart_seconds),
        aim: Duration::from_secs(10),
        finish_timeout: Duration::from_secs(900),
        seed,
        load: Some(Duration::from_secs(30)),
    };
    eprintln!(
        "chaos: {} classify items, {} chat messages, {} kills + 1 preemption notice, seed {seed}; logs in {}",
        args.items,
        args.chats,
        args.kills,
        cfg.dir.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    let t = std::time::Instant::now();
    let report = rt.block_on(stack::chaos::run(&cfg, &|step| {
        eprintln!("chaos: {:.1} s: {step}", t.elapsed().as_secs_f64())
    }))?;
    let table = report.table();
    println!("{table}");
    std::fs::write(dir.join("report.md"), &table)?;
    eprintln!(
        "chaos: passed; report in {}",
        dir.join("report.md").display()
    );
    Ok(())
}

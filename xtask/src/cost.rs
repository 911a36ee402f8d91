//! `cargo xtask cost`: the monthly bill of four ways to run the chatbot, from its traffic.
//! Prices live in [`crate::prices`], with their sources and dates.

use crate::prices as p;

/// Days in a billing month (730 h / 24).
const DAYS: f64 = p::HOURS_PER_MONTH / 24.0;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Chat messages a day
    #[arg(long, default_value_t = 10_000.0)]
    pub chat_per_day: f64,
    /// Share of chat messages that need the GPU model; default: 1 − trivial share × edge recall
    #[arg(long, conflicts_with_all = ["trivial_share", "edge_recall"])]
    pub heavy_share: Option<f64>,
    /// Share of chat messages that are trivial (greetings, thanks, help, …)
    #[arg(long, default_value_t = 0.6)]
    pub trivial_share: f64,
    /// Share of trivial messages the edge answers (measured: `route eval` on the test split)
    #[arg(long, default_value_t = 0.908)]
    pub edge_recall: f64,
    /// Bulk items a day (each generates one reply-sized text)
    #[arg(long, default_value_t = 2_000.0)]
    pub bulk_items_per_day: f64,
    /// GPU seconds per queued chat reply (150 tokens, decoded alone) on the worker's L4.
    /// `infra/gpu-check.sh` measured 1.44 s on an H200 for a Qwen2.5-3B-shaped int4 model
    /// (9.2 ms a step); the L4 reads the step's 1.93 GB of weights at 300 GB/s instead of
    /// ~4.3 TB/s, +6.0 ms a step: ≈ 2.3 s
    #[arg(long, default_value_t = 2.3)]
    pub gpu_seconds_per_reply: f64,
    /// GPU seconds per bulk item (150 tokens, decoded 8 at a time): 0.36 s on the H200, plus
    /// the L4's slower weight reads shared by 8 rows: ≈ 0.5 s
    #[arg(long, default_value_t = 0.5)]
    pub gpu_seconds_per_bulk_item: f64,
    /// Hours a day the chatbot is in use: the spot VM stays up then; the autoscaler takes it
    /// to zero outside them
    #[arg(long, default_value_t = 14.0)]
    pub active_hours_per_day: f64,
    /// Prompt tokens (system prompt and history) per message for the API-only option
    #[arg(long, default_value_t = 600.0)]
    pub input_tokens: f64,
    /// Reply tokens per message
    #[arg(long, default_value_t = 150.0)]
    pub output_tokens: f64,
}

impl Args {
    /// Refuses what would give a meaningless bill: shares outside 0..=1, negative or
    /// non-finite traffic, more than 24 active hours a day.
    fn check(&self) -> anyhow::Result<()> {
        let shares = [
            ("--heavy-share", self.heavy_share.unwrap_or(0.0)),
            ("--trivial-share", self.trivial_share),
            ("--edge-recall", self.edge_recall),
        ];
        for (flag, v) in shares {
            anyhow::ensure!(
                (0.0..=1.0).contains(&v),
                "{flag} must be within 0..=1, got {v}"
            );
        }
        let amounts = [
            ("--chat-per-day", self.chat_per_day),
            ("--bulk-items-per-day", self.bulk_items_per_day),
            ("--gpu-seconds-per-reply", self.gpu_seconds_per_reply),
            (
                "--gpu-seconds-per-bulk-item",
                self.gpu_seconds_per_bulk_item,
            ),
            ("--input-tokens", self.input_tokens),
            ("--output-tokens", self.output_tokens),
        ];
        for (flag, v) in amounts {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "{flag} must be a number of at least 0, got {v}"
            );
        }
        anyhow::ensure!(
            (0.0..=24.0).contains(&self.active_hours_per_day),
            "--active-hours-per-day must be within 0..=24, got {}",
            self.active_hours_per_day
        );
        Ok(())
    }

    fn heavy(&self) -> f64 {
        self.heavy_share
            .unwrap_or(1.0 - self.trivial_share * self.edge_recall)
    }
}

/// One option's monthly cost in KRW, with what it is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub option: &'static str,
    pub krw: f64,
    pub detail: String,
}

/// Firestore operations per queued chat message: edge create + status polls; worker lease,
/// chunk and completion commits (two documents each) and the job's final update.
const WRITES_PER_QUEUED: f64 = 8.0;
const READS_PER_QUEUED: f64 = 8.0;
/// Status polls (`GET /v1/jobs/{id}?wait=…`) per queued message.
const POLLS_PER_QUEUED: f64 = 2.0;
/// Bulk items per shard message (the edge's shard size).
const ITEMS_PER_SHARD: f64 = 1_000.0;

pub fn monthly(a: &Args) -> Vec<Line> {
    let heavy_msgs = a.chat_per_day * a.heavy();
    let busy_hours = ((heavy_msgs * a.gpu_seconds_per_reply
        + a.bulk_items_per_day * a.gpu_seconds_per_bulk_item)
        / 3600.0)
        .min(24.0);
    let spot_per_hour =
        p::ALWAYS_ON_GPU_KRW_PER_MONTH / p::HOURS_PER_MONTH * (1.0 - p::SPOT_DISCOUNT);
    let vm_hours = a.active_hours_per_day.max(busy_hours).min(24.0);
    let vm = vm_hours * DAYS * spot_per_hour;

    let requests = a.chat_per_day * (1.0 + a.heavy() * POLLS_PER_QUEUED) * DAYS;
    let workers_usd = p::WORKERS_USD_PER_MONTH
        + (requests - p::WORKERS_INCLUDED_REQUESTS).max(0.0) / 1e6 * p::WORKERS_USD_PER_MILLION;
    let shards = a.bulk_items_per_day / ITEMS_PER_SHARD;
    let writes = (heavy_msgs + shards) * WRITES_PER_QUEUED;
    let reads = (heavy_msgs + shards) * READS_PER_QUEUED;
    let firestore_usd = ((writes - p::FIRESTORE_FREE_WRITES_PER_DAY).max(0.0) / 1e5
        * p::FIRESTORE_USD_PER_100K_WRITES
        + (reads - p::FIRESTORE_FREE_READS_PER_DAY).max(0.0) / 1e5
            * p::FIRESTORE_USD_PER_100K_READS)
        * DAYS;
    // ~1 KB per chat message, ~0.3 KB per bulk item.
    let pubsub_gib = (heavy_msgs * 1.0 + a.bulk_items_per_day * 0.3) * DAYS / (1024.0 * 1024.0);
    let pubsub_usd =
        (pubsub_gib - p::PUBSUB_FREE_GIB_PER_MONTH).max(0.0) / 1024.0 * p::PUBSUB_USD_PER_TIB;
    let cloud = (workers_usd + firestore_usd + pubsub_usd) * p::KRW_PER_USD;

    let power_kwh = (busy_hours * p::WORKSTATION_BUSY_WATTS
        + (24.0 - busy_hours) * p::WORKSTATION_IDLE_WATTS)
        / 1000.0
        * DAYS;
    let home = p::WORKSTATION_KRW / p::WORKSTATION_MONTHS + power_kwh * p::KRW_PER_KWH;

    let messages = a.chat_per_day + a.bulk_items_per_day;
    let api_usd = messages
        * (a.input_tokens * p::API_USD_PER_M_INPUT + a.output_tokens * p::API_USD_PER_M_OUTPUT)
        / 1e6
        * DAYS;

    vec![
        Line {
            option: "always-on GPU VM",
            krw: p::ALWAYS_ON_GPU_KRW_PER_MONTH,
            detail: "one on-demand GPU VM, 24 h a day, answers everything".into(),
        },
        Line {
            option: "spot GPU + edge (this system)",
            krw: vm + cloud,
            detail: format!(
                "spot VM {vm_hours:.1} h/day ({:.0} KRW) + Workers, Firestore, Pub/Sub ({:.0} KRW); {:.0} % of chat queued",
                vm,
                cloud,
                a.heavy() * 100.0
            ),
        },
        Line {
            option: "home workstation",
            krw: home,
            detail: format!(
                "{:.0} KRW/month write-off + {power_kwh:.0} kWh; no redundancy, home uplink",
                p::WORKSTATION_KRW / p::WORKSTATION_MONTHS
            ),
        },
        Line {
            option: "API only",
            krw: api_usd * p::KRW_PER_USD,
            detail: format!(
                "every message and item to a hosted LLM ({:.0} + {:.0} tokens each)",
                a.input_tokens, a.output_tokens
            ),
        },
    ]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    a.check()?;
    println!(
        "{:.0} chat messages/day ({:.0} % need the GPU model), {:.0} bulk items/day, {:.1} GPU s per reply, {:.1} per bulk item, {:.0} active h/day\n",
        a.chat_per_day,
        a.heavy() * 100.0,
        a.bulk_items_per_day,
        a.gpu_seconds_per_reply,
        a.gpu_seconds_per_bulk_item,
        a.active_hours_per_day
    );
    println!("| option | KRW / month | what it is |");
    println!("|---|---|---|");
    for l in monthly(&a) {
        println!("| {} | {} | {} |", l.option, group(l.krw), l.detail);
    }
    println!(
        "\nPrices, sources and dates: xtask/src/prices.rs (1 USD = {} KRW).",
        p::KRW_PER_USD
    );
    Ok(())
}

/// 12345.6 → "12,346".
fn group(krw: f64) -> String {
    let s = format!("{:.0}", krw.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("cost").chain(flags.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn meaningless_traffic_is_refused_naming_the_flag() {
        assert!(parse(&[]).expect("defaults").check().is_ok());
        for (flags, says) in [
            (
                &["--trivial-share", "2"][..],
                "--trivial-share must be within 0..=1, got 2",
            ),
            (
                &["--edge-recall", "1.5"],
                "--edge-recall must be within 0..=1",
            ),
            (
                &["--heavy-share=-0.1"],
                "--heavy-share must be within 0..=1",
            ),
            (
                &["--gpu-seconds-per-reply", "NaN"],
                "--gpu-seconds-per-reply must be a number",
            ),
            (
                &["--chat-per-day=-5"],
                "--chat-per-day must be a number of at least 0",
            ),
            (
                &["--active-hours-per-day", "30"],
                "--active-hours-per-day must be within 0..=24",
            ),
        ] {
            let a = parse(flags).expect("parses");
            let e = a.check().expect_err(says).to_string();
            assert!(e.contains(says), "{flags:?}: {e}");
        }
        // The heavy share is given, or computed from the other two: not both.
        let e = parse(&["--heavy-share", "0.3", "--trivial-share", "0.3"]).err();
        assert!(e.is_some_and(|e| e.kind() == clap::error::ErrorKind::ArgumentConflict));
    }

    /// Worked by hand: 10,000 chats/day, half heavy, no bulk, 2 GPU s per reply, 10 active h.
    #[test]
    fn one_case_computed_by_hand() {
        let a = Args {
            chat_per_day: 10_000.0,
            heavy_share: Some(0.5),
            trivial_share: 0.6,
            edge_recall: 0.806,
            bulk_items_per_day: 0.0,
            gpu_seconds_per_reply: 2.0,
            gpu_seconds_per_bulk_item: 0.5,
            active_hours_per_day: 10.0,
            input_tokens: 600.0,
            output_tokens: 150.0,
        };
        let lines = monthly(&a);
        let krw = |name: &str| {
            lines
                .iter()
                .find(|l| l.option == name)
                .map(|l| l.krw)
                .unwrap_or(f64::NAN)
        };
        let close = |got: f64, want: f64| (got - want).abs() < 1.0;
        assert_eq!(krw("always-on GPU VM"), 200_000.0);
        // Spot: 200,000 × 0.2 × 10/24 = 16,666.7; Workers 5 USD = 7,000; Firestore
        // (40,000 − 20,000 free) writes/day × 0.18/100k × 30.4167 days × 1,400 = 1,533.0;
        // reads (40,000) and Pub/Sub (0.15 GiB) stay free.
        assert!(
            close(krw("spot GPU + edge (this system)"), 25_199.7),
            "{lines:?}"
        );
        // Home: 55,555.6 + (2.7778 h × 0.3 + 21.2222 h × 0.06) kWh × 30.4167 × 250 = 71,575.0.
        assert!(close(krw("home workstation"), 71_575.0), "{lines:?}");
        // API: 10,000 × (600 × 0.15 + 150 × 0.6) / 1e6 = 1.8 USD/day → 76,650 KRW.
        assert!(close(krw("API only"), 76_650.0), "{lines:?}");
    }

    #[test]
    fn heavy_share_defaults_to_what_the_edge_does_not_answer() {
        let a = Args {
            chat_per_day: 1.0,
            heavy_share: None,
            trivial_share: 0.6,
            edge_recall: 0.5,
            bulk_items_per_day: 0.0,
            gpu_seconds_per_reply: 1.0,
            gpu_seconds_per_bulk_item: 1.0,
            active_hours_per_day: 1.0,
            input_tokens: 1.0,
            output_tokens: 1.0,
        };
        assert!((a.heavy() - 0.7).abs() < 1e-12);
        assert_eq!(group(1_234_567.4), "1,234,567");
    }

    /// Replies and bulk items each at their own GPU seconds: 1,000 replies × 3.6 s = 1 h and
    /// 7,200 items × 0.5 s = 1 h keep the spot VM up 2 h with no active hours.
    #[test]
    fn replies_and_bulk_items_cost_their_own_gpu_seconds() {
        let a = Args {
            chat_per_day: 1_000.0,
            heavy_share: Some(1.0),
            trivial_share: 0.6,
            edge_recall: 0.5,
            bulk_items_per_day: 7_200.0,
            gpu_seconds_per_reply: 3.6,
            gpu_seconds_per_bulk_item: 0.5,
            active_hours_per_day: 0.0,
            input_tokens: 1.0,
            output_tokens: 1.0,
        };
        let lines = monthly(&a);
        let spot = lines
            .iter()
            .find(|l| l.option == "spot GPU + edge (this system)")
            .map(|l| l.detail.clone())
            .unwrap_or_default();
        // 2/24 of a month of the spot price: 200,000 × 0.2 × 2/24 = 3,333 KRW.
        assert!(spot.starts_with("spot VM 2.0 h/day (3333 KRW)"), "{spot}");
    }
}

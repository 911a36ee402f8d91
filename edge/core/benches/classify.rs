//! `cargo bench --bench classify`: featurize + infer (tract) + decide, per message.
//!
//! Prints p50/p99 per message length. Each call is timed on its own, so the percentiles are
//! those of single requests, as the edge serves them.

use std::time::{Duration, Instant};

use edge_core::model::IntentModel;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: do one quick pass only.
    let quick = !std::env::args().any(|a| a == "--bench");
    let model = IntentModel::embedded().expect("embedded model loads");
    let long: String = "근처에 급식카드 되는 분식집 있으면 추천해 줄래? I want tteokbokki. "
        .chars()
        .cycle()
        .take(2000)
        .collect();
    let cases = [
        ("short (ko)", "안녕하세요!".to_owned()),
        ("short (en)", "thanks a lot".to_owned()),
        ("2000 chars", long),
    ];
    println!("| message | p50 | p99 | calls |");
    println!("|---|---|---|---|");
    for (name, text) in &cases {
        let n = if quick { 10 } else { 5_000 };
        for _ in 0..n.min(200) {
            std::hint::black_box(model.classify(text));
        }
        let mut times: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(model.classify(std::hint::black_box(text)));
                t.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "| {name} | {:.1?} | {:.1?} | {n} |",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}

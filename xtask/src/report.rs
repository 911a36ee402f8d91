//! `cargo xtask bench`: runs every benchmark of the project and writes `BENCHMARKS.md`
//! (machine, date, command, tables) and two SVG plots under `docs/bench/`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::bail;
use plotters::prelude::*;

use crate::{bench, bench_generate, bench_worker, load, root};

#[derive(clap::Args)]
pub struct Args {
    /// Shorter runs everywhere (for trying the command; the committed report uses the default)
    #[arg(long)]
    pub quick: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let q = args.quick;
    eprintln!("bench: 1/5 route (featurize + tract + decide), natively");
    let route = route_bench()?;
    eprintln!("bench: 2/5 the Worker in wrangler dev");
    let edge = bench::measure(&bench::Args {
        requests: if q { 300 } else { 2000 },
        rate_limit_binding: false,
        log_requests: "errors".into(),
    })?;
    eprintln!("bench: 3/5 load on /v1/chat");
    let load_args = load::Args {
        seconds: if q { 5 } else { 30 },
        concurrency: 16,
        queued_every: 5,
    };
    let load = load::measure(&load_args)?;
    if load.errors > 0 {
        bail!(
            "{} of {} requests failed under load, e.g. {:?}",
            load.errors,
            load.requests,
            load.error_samples
        );
    }
    eprintln!("bench: 4/5 batch-worker classify throughput per micro-batch size");
    let worker = bench_worker::measure(&bench_worker::Args {
        items: if q { 20_000 } else { 200_000 },
        batch_sizes: vec![16, 64, 256, 1024, 4096],
        repeat: if q { 1 } else { 3 },
    })?;
    eprintln!("bench: 5/5 batch-worker text generation");
    let generate = bench_generate::measure(&bench_generate::Args {
        prompts: if q { 128 } else { 1024 },
        max_new_tokens: 64,
        batch_sizes: vec![1, 8, 32],
        repeat: if q { 1 } else { 3 },
        compare: None,
        step_delay_ms: 0,
    })?;

    let plots = root().join("docs/bench");
    std::fs::create_dir_all(&plots)?;
    latency_histogram(&edge.chat, &plots.join("trivial-chat-latency.svg"))?;
    throughput_plot(&worker, &plots.join("worker-throughput.svg"))?;

    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Made by `cargo xtask bench{}` on {} (UTC) in {:.0} s. {}\n",
        if q { " --quick" } else { "" },
        now_utc(),
        started.elapsed().as_secs_f64(),
        machine()
    );
    md.push_str(
        "Numbers from one run on a shared machine: expect ±20 % between runs. Every section \
         names the command that measures it alone.\n\n",
    );
    let _ = writeln!(
        md,
        "## Edge routing, natively\n\n`cargo bench --bench classify`: featurize + \
         infer (tract) + decide, each call timed on its own.\n\n{route}"
    );
    let _ = writeln!(
        md,
        "## The Worker in `wrangler dev`\n\n`cargo xtask bench-edge`. {}\n\
         ![Latency histogram of trivial /v1/chat](docs/bench/trivial-chat-latency.svg)\n",
        edge.table()
    );
    let _ = writeln!(
        md,
        "## Load on `/v1/chat`\n\n`cargo xtask load`. {}\n{}",
        load::heading(&load_args),
        load.table()
    );
    let _ = writeln!(
        md,
        "## Worker: classify throughput\n\n`cargo xtask bench-worker`. {}\n\
         ![Worker throughput vs micro-batch size](docs/bench/worker-throughput.svg)\n",
        worker.table()
    );
    let _ = writeln!(
        md,
        "## Worker: text generation\n\n`cargo xtask bench-generate`. {}",
        generate.table()
    );
    std::fs::write(root().join("BENCHMARKS.md"), md)?;
    eprintln!(
        "bench: wrote BENCHMARKS.md and {} in {:.0} s",
        plots.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo bench --bench classify`: its Markdown table.
fn route_bench() -> anyhow::Result<String> {
    let mut c = crate::cargo();
    c.args(["bench", "--quiet", "--bench", "classify"]);
    let out = crate::output(c)?;
    let table: String = out
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    if table.is_empty() {
        bail!("the classify bench printed no table:\n{out}");
    }
    Ok(table)
}

/// `YYYY-MM-DD HH:MM` in UTC, from the system clock.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// CPU model, cores, memory and OS of this machine, in one sentence.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".into());
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "Machine: {cpu}, {} CPU cores, {mem_gib:.0} GiB memory, {os}, no GPU; {rustc}.",
        crate::cores()
    )
}

/// Histogram of trivial `/v1/chat` latencies (ms) with p50 and p99 marked.
fn latency_histogram(sorted_ms: &[f64], path: &Path) -> anyhow::Result<()> {
    if sorted_ms.is_empty() {
        bail!("no latencies to plot");
    }
    let pct = |p: f64| sorted_ms[((sorted_ms.len() - 1) as f64 * p).round() as usize];
    let (p50, p99) = (pct(0.5), pct(0.99));
    // Up to the 99.5th percentile, in 0.1 ms bins; the rest is counted in the last bin.
    let top = (pct(0.995) * 10.0).ceil() as usize + 1;
    let mut bins = vec![0u32; top + 1];
    for &ms in sorted_ms {
        bins[((ms * 10.0) as usize).min(top)] += 1;
    }
    let ymax = bins.iter().copied().max().unwrap_or(1) + 1;
    let area = canvas(path)?;
    let mut chart = chart_on(
        &area,
        format!(
            "Trivial POST /v1/chat in wrangler dev: {} requests (p50 {p50:.2} ms, p99 {p99:.2} ms)",
            sorted_ms.len()
        ),
        56,
    )
    .build_cartesian_2d(0f64..(top as f64 + 1.0) / 10.0, 0u32..ymax)
    .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms), 0.1 ms bins; the last bin holds everything slower")
        .y_desc("requests")
        .disable_x_mesh()
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(bins.iter().enumerate().map(|(i, &n)| {
            let x0 = i as f64 / 10.0;
            Rectangle::new([(x0, 0), (x0 + 0.1, n)], BLUE.mix(0.6).filled())
        }))
        .map_err(plot_err)?;
    for (label, x, color) in [("p50", p50, GREEN), ("p99", p99, RED)] {
        chart
            .draw_series(LineSeries::new([(x, 0), (x, ymax)], color.stroke_width(2)))
            .map_err(plot_err)?
            .label(format!("{label} {x:.2} ms"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend_and_present(&mut chart, &area, SeriesLabelPosition::MiddleRight)
}

/// Items/s against micro-batch size (log scale): the worker end to end, the worker's
/// `session.run` alone, and Python's `onnxruntime`.
fn throughput_plot(report: &bench_worker::Report, path: &Path) -> anyhow::Result<()> {
    // One evenly spaced position per measured size (they grow by powers of 4: a log scale).
    let n = report.rows.len() as i32;
    let xs: Vec<i32> = (0..n).collect();
    let batches: Vec<usize> = report.rows.iter().map(|r| r.batch).collect();
    let ymax = report
        .rows
        .iter()
        .flat_map(|r| {
            [
                r.items_per_s,
                r.session_items_per_s,
                r.python_items_per_s,
                r.python_job_items_per_s,
            ]
        })
        .fold(0.0, f64::max)
        * 1.15;
    let area = canvas(path)?;
    let mut chart = chart_on(
        &area,
        format!(
            "batch-worker run --task classify, {} items, {} CPU cores",
            report.items,
            crate::cores()
        ),
        70,
    )
    .build_cartesian_2d(-1i32..n, 0f64..ymax.max(1.0))
    .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("micro-batch size (items per session.run)")
        .y_desc("items/s")
        .x_labels(batches.len() + 2)
        .x_label_formatter(&|i| {
            usize::try_from(*i)
                .ok()
                .and_then(|i| batches.get(i))
                .map_or(String::new(), usize::to_string)
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(plot_err)?;
    type Series = (&'static str, RGBColor, fn(&bench_worker::Row) -> f64);
    let series: [Series; 4] = [
        (
            "worker, end to end (read, featurize, infer, write)",
            BLUE,
            |r| r.items_per_s,
        ),
        ("worker, inside session.run", GREEN, |r| {
            r.session_items_per_s
        }),
        ("Python onnxruntime, session.run", RED, |r| {
            r.python_items_per_s
        }),
        (
            "Python onnxruntime, the same job on the same features",
            MAGENTA,
            |r| r.python_job_items_per_s,
        ),
    ];
    for (label, color, f) in series {
        let points: Vec<(i32, f64)> = report
            .rows
            .iter()
            .zip(&xs)
            .map(|(r, &x)| (x, f(r)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(plot_err)?;
    }
    legend_and_present(&mut chart, &area, SeriesLabelPosition::UpperLeft)
}

type Canvas<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// An 800 × 420 SVG canvas on white.
fn canvas(path: &Path) -> anyhow::Result<Canvas<'_>> {
    let area = SVGBackend::new(path, (800, 420)).into_drawing_area();
    area.fill(&WHITE).map_err(plot_err)?;
    Ok(area)
}

/// A chart on `area` with `caption` and the margins both plots use; `y_labels` is the width
/// of the y labels' area.
fn chart_on<'a, 'b>(
    area: &'a Canvas<'b>,
    caption: String,
    y_labels: u32,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(y_labels);
    builder
}

/// Draws the series' legend at `position` and writes the file.
fn legend_and_present<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    area: &Canvas<'a>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    area.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_their_labels() {
        let dir = std::env::temp_dir().join(format!("xtask-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ms: Vec<f64> = (0..500).map(|i| 2.0 + f64::from(i % 37) * 0.05).collect();
        latency_histogram(&ms, &dir.join("h.svg")).expect("histogram");
        let h = std::fs::read_to_string(dir.join("h.svg")).expect("svg");
        assert!(h.starts_with("<svg") && h.contains("p99") && h.contains("<rect"));
        let report = bench_worker::Report {
            items: 1000,
            repeat: 1,
            rows: [16, 256, 4096]
                .iter()
                .map(|&b| bench_worker::Row {
                    batch: b,
                    items_per_s: 1000.0 * b as f64,
                    share: 0.5,
                    session_items_per_s: 2000.0 * b as f64,
                    python_items_per_s: 1500.0 * b as f64,
                    python_one_thread_items_per_s: 900.0 * b as f64,
                    python_job_items_per_s: 700.0 * b as f64,
                    ratio: 0.6,
                    job_ratio: 1.4,
                })
                .collect(),
        };
        throughput_plot(&report, &dir.join("t.svg")).expect("plot");
        let t = std::fs::read_to_string(dir.join("t.svg")).expect("svg");
        assert!(t.contains("4096") && t.contains("the same job on the same features"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_date_is_a_civil_date() {
        let d = now_utc();
        assert_eq!(d.len(), 16, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}

//! `moe-infer bench`: flags → [`moe_engine::BenchConfig`], then the report as a table on
//! stdout, as JSON (`--json`) and as an SVG plot of decode tok/s vs concurrency (`--plot`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use moe_engine::bench::{BenchReport, Stat};
use moe_engine::{run_bench, BenchConfig};

use crate::ModelArgs;

/// Flags of `moe-infer bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths whose prefill speed and time to first token are measured.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prefill: Vec<usize>,
    /// Numbers of sequences decoded together.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Tokens generated per sequence in each decode measurement.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Prompt length of each decoded sequence.
    #[arg(long, default_value_t = 16)]
    decode_prompt: usize,
    /// Repetitions of every measurement (the table shows median, min and max).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Compute threads (sets RAYON_NUM_THREADS); default: every core.
    #[arg(long)]
    threads: Option<usize>,
    /// MiB the memory-bandwidth probe reads (0 skips it and the roofline).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Use this memory bandwidth (GB/s) for the roofline instead of probing it.
    #[arg(long)]
    bandwidth_gb_s: Option<f64>,
    /// Seed of the random prompt token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the untimed warm-up generation.
    #[arg(long)]
    no_warmup: bool,
    /// Also time attention, feed-forward and lm head during the decode measurements and print
    /// milliseconds per step of each.
    #[arg(long)]
    stage_times: bool,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write an SVG plot of decode tok/s vs concurrency to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Runs `moe-infer bench`.
pub fn bench(args: BenchArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        // Before the first parallel operation creates the global thread pool.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let bandwidth_threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = BenchConfig {
        prefill_lengths: args.prefill.clone(),
        concurrency: args.concurrency.clone(),
        decode_tokens: args.decode_tokens,
        decode_prompt_len: args.decode_prompt,
        repetitions: args.reps,
        warmup: !args.no_warmup,
        seed: args.seed,
        bandwidth_probe_bytes: args.bandwidth_mib << 20,
        bandwidth_threads,
        bandwidth_gb_per_s: args.bandwidth_gb_s,
        stage_times: args.stage_times,
    };
    let engine = args.model.load(!args.json)?;
    let quiet = args.json;
    let report = run_bench(&engine, &config, &mut |line| {
        if !quiet {
            eprintln!("bench: {line}");
        }
    })?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(stdout, "{}", format_table(&report))?;
    }
    if let Some(path) = &args.plot {
        write_plot(&report, path).with_context(|| format!("writing {}", path.display()))?;
        if !args.json {
            writeln!(stdout, "plot written to {}", path.display())?;
        }
    }
    Ok(())
}

fn stat_cell(s: &Stat, precision: usize) -> String {
    format!(
        "{:.p$} [{:.p$}–{:.p$}]",
        s.median,
        s.min,
        s.max,
        p = precision
    )
}

/// The report as a plain-text table.
fn format_table(r: &BenchReport) -> String {
    let gb = |b: u64| b as f64 / 1e9;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "model {} ({}), dtype {}, experts {}, dense {}, device {}, {} thread(s), load {:.1} s, {} repetition(s): median [min–max]",
        r.model, r.architecture, r.dtype, r.expert_dtype, r.dense_dtype, r.device, r.threads, r.load_seconds, r.config.repetitions
    ));
    line(String::new());
    line(format!(
        "{:<28} {:>26} {:>24}",
        "prefill (1 sequence)", "tok/s", "time to first token s"
    ));
    for p in &r.prefill {
        line(format!(
            "{:<28} {:>26} {:>24}{}",
            format!("{} prompt tokens", p.prompt_tokens),
            stat_cell(&p.tokens_per_second, 1),
            stat_cell(&p.ttft_seconds, 3),
            phase_cache_cell(&p.expert_cache)
        ));
    }
    line(String::new());
    line(format!(
        "{:<28} {:>26} {:>24}",
        "decode", "aggregate tok/s", "per-sequence tok/s"
    ));
    for d in &r.decode {
        line(format!(
            "{:<28} {:>26} {:>24}{}",
            format!("{} sequence(s) x {} steps", d.concurrency, d.decode_steps),
            stat_cell(&d.aggregate_tokens_per_second, 2),
            stat_cell(&d.per_sequence_tokens_per_second, 2),
            phase_cache_cell(&d.expert_cache)
        ));
        if let Some(t) = &d.stage_ms_per_step {
            line(format!(
                "{:<28} attention {:.2}, feed-forward {:.2}, lm head {:.2}, other {:.2} ms per step",
                "", t.attention, t.feed_forward, t.lm_head, t.other
            ));
        }
    }
    line(String::new());
    let roof = &r.roofline;
    line(format!(
        "roofline: {:.3} GB of weights per decode token; bandwidth {}; roofline {}; batch-1 decode at {}",
        gb(roof.weight_bytes_per_token),
        roof.bandwidth_gb_per_s
            .map_or("not measured".into(), |b| match roof.bandwidth_source.as_deref() {
                Some("measured") => format!("{b:.1} GB/s measured ({} threads)", roof.bandwidth_threads),
                _ => format!("{b:.1} GB/s (given)"),
            }),
        roof.roofline_tokens_per_second
            .map_or("-".into(), |t| format!("{t:.1} tok/s")),
        roof.fraction_of_roofline
            .map_or("-".into(), |f| format!("{:.0} % of it", 100.0 * f)),
    ));
    let mem = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.2} GB", gb(b)));
    line(format!(
        "memory: RSS after load {}, peak RSS {}",
        mem(r.memory.rss_after_load_bytes),
        mem(r.memory.peak_rss_bytes)
    ));
    match &r.expert_cache {
        Some(c) => line(format!(
            "expert cache ({}, budget {:.2} GB of {:.2} GB): hit rate {:.1} % of {} lookups, {} evictions, {:.2} GB read from disk in {:.2} s, stalled {:.2} s",
            c.policy,
            gb(c.budget_bytes),
            gb(c.expert_bytes_total),
            100.0 * c.hit_rate,
            c.lookups,
            c.evictions,
            gb(c.bytes_read),
            c.read_seconds,
            c.stall_seconds
        )),
        None => line("expert cache: off (every expert resident; set --expert-budget)".into()),
    }
    line(format!("bench took {:.1} s", r.bench_seconds));
    out
}

/// The expert cache's part of a phase's row: hit rate, bytes read and stall (empty without a
/// budget).
fn phase_cache_cell(cache: &Option<moe_engine::bench::PhaseCache>) -> String {
    cache.as_ref().map_or(String::new(), |c| {
        format!(
            "   cache: {:.1} % hits, {:.2} GB read, stalled {:.2} s",
            100.0 * c.hit_rate,
            c.bytes_read as f64 / 1e9,
            c.stall_seconds
        )
    })
}

/// Picks one statistic of a decode result (a plotted series).
type PickStat = fn(&moe_engine::bench::DecodeResult) -> &Stat;

/// An SVG line plot of aggregate and per-sequence decode tok/s (median, with min–max bars)
/// against the number of concurrent sequences.
fn write_plot(r: &BenchReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;

    let plot_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    if r.decode.is_empty() {
        bail!("no decode measurements to plot (--concurrency is empty)");
    }
    let max_x = r.decode.iter().map(|d| d.concurrency).max().unwrap_or(1) as f64;
    let max_y = r
        .decode
        .iter()
        .map(|d| d.aggregate_tokens_per_second.max)
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.15;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let title = format!(
        "moe-infer decode, {}, experts {}, dense {} ({})",
        r.dtype, r.expert_dtype, r.dense_dtype, r.architecture
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y)
        .map_err(|e| plot_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("concurrent sequences")
        .y_desc("decode tok/s")
        .draw()
        .map_err(|e| plot_err(&e))?;
    let series: [(&str, RGBColor, PickStat); 2] = [
        ("aggregate", BLUE, |d| &d.aggregate_tokens_per_second),
        ("per sequence", RED, |d| &d.per_sequence_tokens_per_second),
    ];
    for (label, color, pick) in series {
        let points: Vec<(f64, f64)> = r
            .decode
            .iter()
            .map(|d| (d.concurrency as f64, pick(d).median))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| plot_err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| plot_err(&e))?;
        chart
            .draw_series(r.decode.iter().map(|d| {
                let x = d.concurrency as f64;
                PathElement::new(vec![(x, pick(d).min), (x, pick(d).max)], color)
            }))
            .map_err(|e| plot_err(&e))?;
    }
    if let Some(roof) = r.roofline.roofline_tokens_per_second {
        if roof < max_y {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, roof), (max_x * 1.05, roof)],
                    BLACK.mix(0.5),
                )))
                .map_err(|e| plot_err(&e))?
                .label("batch-1 roofline")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.5)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}

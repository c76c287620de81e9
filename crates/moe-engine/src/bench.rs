//! Measuring a loaded [`Engine`]: prefill and decode throughput, time to first token, peak
//! memory, expert-cache statistics, the machine's memory bandwidth and the decode roofline.
//!
//! [`run_bench`] turns a [`BenchConfig`] into a [`BenchReport`] of plain data (serializable);
//! every measurement is repeated and reported as a [`Stat`] (median, min, max and the samples).
//! Prompts are random token ids from a fixed seed and generation ignores end-of-sequence
//! tokens, so the tokenizer and the weights' values do not change what is measured.

use std::time::Instant;

use candle_core::DType;
use moe_core::{Error, Result};
use moe_models::{DecoderHParams, ModelSummary};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::engine::Engine;
use crate::request::{GenerateRequest, GenerateResponse, Prompt};
use crate::sampling::SamplingParams;
use moe_cache::ExpertCacheStats;

/// What to measure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchConfig {
    /// Prompt lengths (tokens) whose prefill throughput and time to first token are measured,
    /// one sequence at a time.
    pub prefill_lengths: Vec<usize>,
    /// Numbers of sequences decoded together, one token each per step.
    pub concurrency: Vec<usize>,
    /// Tokens generated per sequence in a decode measurement (the first one, sampled from the
    /// prefill, is not counted as decode).
    pub decode_tokens: usize,
    /// Prompt length (tokens) of each sequence of a decode measurement.
    pub decode_prompt_len: usize,
    /// Repetitions of every measurement.
    pub repetitions: usize,
    /// Run one short untimed generation first (page in weights, warm allocators).
    pub warmup: bool,
    /// Seed of the random prompt token ids.
    pub seed: u64,
    /// Size of the buffer the memory-bandwidth probe reads (bytes); 0 skips the probe.
    pub bandwidth_probe_bytes: usize,
    /// Threads of the memory-bandwidth probe.
    pub bandwidth_threads: usize,
    /// A known memory bandwidth (GB/s) to use for the roofline instead of the probe's (on a
    /// busy machine the probe reads low).
    pub bandwidth_gb_per_s: Option<f64>,
    /// Time the forward pass's stages during the decode measurements (see
    /// [`moe_models::stage_times`]) and report milliseconds per step.
    pub stage_times: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            prefill_lengths: vec![128, 512],
            concurrency: vec![1, 4, 16],
            decode_tokens: 32,
            decode_prompt_len: 16,
            repetitions: 3,
            warmup: true,
            seed: 0,
            bandwidth_probe_bytes: 1 << 30,
            bandwidth_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            bandwidth_gb_per_s: None,
            stage_times: false,
        }
    }
}

/// Summary of repeated measurements of one quantity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stat {
    /// Median (mean of the two middle samples for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Every sample, in measurement order.
    pub samples: Vec<f64>,
}

impl Stat {
    /// Summarizes samples (all zero when there are none).
    pub fn new(samples: Vec<f64>) -> Self {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2],
            n => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
        };
        Self {
            median,
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            samples,
        }
    }

    /// `(max - min) / median`, the relative spread (0 when the median is 0).
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median
        }
    }
}

/// What the expert cache did during one phase of the benchmark (all its repetitions): the
/// difference of the cache's counters across the phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseCache {
    /// Expert lookups.
    pub lookups: u64,
    /// `hits / lookups` within the phase.
    pub hit_rate: f64,
    /// Bytes read from the tier below (on demand and ahead of use).
    pub bytes_read: u64,
    /// Seconds lookups waited for experts.
    pub stall_seconds: f64,
}

impl PhaseCache {
    /// The phase between two snapshots of the same cache.
    pub fn between(before: &ExpertCacheStats, after: &ExpertCacheStats) -> Self {
        let lookups = after.lookups - before.lookups;
        let hits = after.hits - before.hits;
        Self {
            lookups,
            hit_rate: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
            bytes_read: after.bytes_read - before.bytes_read,
            stall_seconds: after.stall_seconds - before.stall_seconds,
        }
    }
}

/// Prefill of one prompt length, one sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillResult {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The expert cache during this phase, when a budget is set.
    pub expert_cache: Option<PhaseCache>,
    /// Prompt tokens per second of the prefill forward pass.
    pub tokens_per_second: Stat,
    /// Time to first token: from the request to the first sampled token (seconds).
    pub ttft_seconds: Stat,
}

/// Decode of `concurrency` sequences together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeResult {
    /// Sequences decoded together.
    pub concurrency: usize,
    /// The expert cache during this phase (prompts included), when a budget is set.
    pub expert_cache: Option<PhaseCache>,
    /// Decode steps per sequence that were timed.
    pub decode_steps: usize,
    /// Generated tokens per second summed over all sequences.
    pub aggregate_tokens_per_second: Stat,
    /// Generated tokens per second of one sequence.
    pub per_sequence_tokens_per_second: Stat,
    /// Where a step's time went, with [`BenchConfig::stage_times`].
    pub stage_ms_per_step: Option<StageMsPerStep>,
}

/// Milliseconds per decode step of a decode measurement (its prompts' prefill left out), by
/// stage, over all its repetitions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageMsPerStep {
    /// Attention norms, projections and attention, all layers.
    pub attention: f64,
    /// Feed-forward norms, routers and experts, all layers.
    pub feed_forward: f64,
    /// Final norm and lm head.
    pub lm_head: f64,
    /// The rest of the wall-clock time (embedding, sampling, scheduling).
    pub other: f64,
}

/// Memory use of the process, from `/proc/self/status` (absent elsewhere).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryReport {
    /// Resident set after loading, before measuring (bytes).
    pub rss_after_load_bytes: Option<u64>,
    /// Peak resident set of the process (`VmHWM`, bytes) after all measurements.
    pub peak_rss_bytes: Option<u64>,
}

/// The decode roofline: how fast batch-1 decode could be if it only streamed its weights at
/// the measured memory bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Roofline {
    /// Bytes of weights one decode token reads (see [`decode_weight_bytes_per_token`]).
    pub weight_bytes_per_token: u64,
    /// Read bandwidth (GB/s, 10^9 bytes) the roofline uses: the configured one, else the
    /// probe's; `None` when neither.
    pub bandwidth_gb_per_s: Option<f64>,
    /// Where `bandwidth_gb_per_s` came from: `measured` or `given`.
    pub bandwidth_source: Option<String>,
    /// Threads of the bandwidth probe.
    pub bandwidth_threads: usize,
    /// `bandwidth / weight_bytes_per_token`, tokens per second.
    pub roofline_tokens_per_second: Option<f64>,
    /// Median batch-1 decode tokens per second measured (when concurrency 1 was measured).
    pub decode_tokens_per_second: Option<f64>,
    /// `decode_tokens_per_second / roofline_tokens_per_second`.
    pub fraction_of_roofline: Option<f64>,
}

/// Everything [`run_bench`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Model folder.
    pub model: String,
    /// HF architecture class.
    pub architecture: String,
    /// Compute dtype of the loaded weights.
    pub dtype: String,
    /// How the routed experts are held: `q8` or the compute dtype.
    pub expert_dtype: String,
    /// How the dense projections are held: `q8` or the compute dtype.
    pub dense_dtype: String,
    /// Device the model runs on.
    pub device: String,
    /// `RAYON_NUM_THREADS` if set, else the available parallelism.
    pub threads: usize,
    /// Seconds the engine took to load.
    pub load_seconds: f64,
    /// What was measured.
    pub config: BenchConfig,
    /// Prefill throughput and time to first token per prompt length.
    pub prefill: Vec<PrefillResult>,
    /// Decode throughput per concurrency.
    pub decode: Vec<DecodeResult>,
    /// Resident memory.
    pub memory: MemoryReport,
    /// Memory bandwidth and the decode roofline.
    pub roofline: Roofline,
    /// Expert-cache statistics over the measurements (after the warm-up), with a budget only.
    pub expert_cache: Option<ExpertCacheStats>,
    /// Wall-clock seconds of the whole benchmark.
    pub bench_seconds: f64,
}

/// Runs every measurement of `config` on `engine`, reporting progress lines to `progress`.
pub fn run_bench(
    engine: &Engine,
    config: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    if config.repetitions == 0 || config.decode_tokens < 2 || config.decode_prompt_len == 0 {
        return Err(Error::InvalidRequest(
            "bench needs repetitions >= 1, decode tokens >= 2 and a decode prompt >= 1 token"
                .into(),
        ));
    }
    let start = Instant::now();
    let rss_after_load_bytes = proc_status_bytes("VmRSS");
    let vocab = engine.model().hparams().vocab_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut prompt = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| rng.random_range(2.min(vocab as u32 - 1)..vocab as u32))
            .collect()
    };
    let request = |ids: Vec<u32>, new: usize| GenerateRequest {
        prompt: Prompt::TokenIds(ids),
        max_new_tokens: new,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: Vec::new(),
        ignore_eos: true,
    };

    if config.warmup {
        progress("warm-up");
        engine.generate_batch(&[request(prompt(8), 2)])?;
    }
    if let Some(cache) = engine.expert_cache() {
        cache.reset_stats();
    }

    // Counters at a phase boundary, once the loader has settled (outside the timed parts).
    let snapshot = || {
        engine.expert_cache().map(|cache| {
            cache.wait_idle();
            cache.stats()
        })
    };
    let phase = |before: &Option<ExpertCacheStats>| {
        let after = snapshot();
        before
            .as_ref()
            .zip(after.as_ref())
            .map(|(b, a)| PhaseCache::between(b, a))
    };

    let mut prefill = Vec::new();
    for &len in &config.prefill_lengths {
        let before = snapshot();
        let (mut rates, mut ttfts) = (Vec::new(), Vec::new());
        for rep in 0..config.repetitions {
            progress(&format!(
                "prefill {len} tokens, repetition {}/{}",
                rep + 1,
                config.repetitions
            ));
            let req = request(prompt(len), 1);
            let t = Instant::now();
            let response = engine.generate(&req, &mut |_| {})?;
            ttfts.push(t.elapsed().as_secs_f64());
            rates.push(response.timings.prefill_tokens_per_second);
        }
        prefill.push(PrefillResult {
            prompt_tokens: len,
            expert_cache: phase(&before),
            tokens_per_second: Stat::new(rates),
            ttft_seconds: Stat::new(ttfts),
        });
    }

    let mut decode = Vec::new();
    for &n in &config.concurrency {
        let before = snapshot();
        let (mut aggregate, mut per_seq) = (Vec::new(), Vec::new());
        let timing = config
            .stage_times
            .then(moe_models::stage_times::Timing::start);
        let mut decode_seconds = 0.0;
        for rep in 0..config.repetitions {
            progress(&format!(
                "decode {n} sequence(s) x {} tokens, repetition {}/{}",
                config.decode_tokens,
                rep + 1,
                config.repetitions
            ));
            let reqs: Vec<GenerateRequest> = (0..n)
                .map(|_| request(prompt(config.decode_prompt_len), config.decode_tokens))
                .collect();
            let responses = engine.generate_batch(&reqs)?;
            let (agg, seq) = decode_rates(&responses);
            decode_seconds += decode_wall_seconds(&responses);
            aggregate.push(agg);
            per_seq.push(seq);
        }
        let stage_ms_per_step = timing.map(|timing| {
            let t = timing.finish();
            let steps = (config.repetitions * (config.decode_tokens - 1)).max(1) as f64;
            let ms = |s: f64| s * 1e3 / steps;
            let total = decode_seconds;
            StageMsPerStep {
                attention: ms(t.attention),
                feed_forward: ms(t.feed_forward),
                lm_head: ms(t.lm_head),
                other: ms((total - t.attention - t.feed_forward - t.lm_head).max(0.0)),
            }
        });
        decode.push(DecodeResult {
            stage_ms_per_step,
            concurrency: n,
            expert_cache: phase(&before),
            decode_steps: config.decode_tokens - 1,
            aggregate_tokens_per_second: Stat::new(aggregate),
            per_sequence_tokens_per_second: Stat::new(per_seq),
        });
    }
    let expert_cache = engine.expert_cache_stats();
    let peak_rss_bytes = proc_status_bytes("VmHWM");

    let weight_bytes_per_token = decode_weight_bytes_per_token(
        engine.summary(),
        engine.model().hparams(),
        engine.model().dtype(),
    );
    let measured = if config.bandwidth_gb_per_s.is_none() && config.bandwidth_probe_bytes > 0 {
        progress(&format!(
            "memory bandwidth probe: {} MiB, {} thread(s)",
            config.bandwidth_probe_bytes >> 20,
            config.bandwidth_threads
        ));
        Some(measure_bandwidth(
            config.bandwidth_probe_bytes,
            config.bandwidth_threads,
        ))
    } else {
        None
    };
    let (bandwidth_gb_per_s, bandwidth_source) = match (config.bandwidth_gb_per_s, measured) {
        (Some(given), _) => (Some(given), Some("given".to_string())),
        (None, Some(m)) => (Some(m), Some("measured".to_string())),
        (None, None) => (None, None),
    };
    let roofline_tokens_per_second =
        bandwidth_gb_per_s.map(|bw| bw * 1e9 / weight_bytes_per_token.max(1) as f64);
    let decode_tokens_per_second = decode
        .iter()
        .find(|d| d.concurrency == 1)
        .map(|d| d.aggregate_tokens_per_second.median);
    let fraction_of_roofline = match (decode_tokens_per_second, roofline_tokens_per_second) {
        (Some(d), Some(r)) if r > 0.0 => Some(d / r),
        _ => None,
    };

    Ok(BenchReport {
        model: engine.model_dir().display().to_string(),
        architecture: engine.summary().architecture.clone(),
        dtype: format!("{:?}", engine.model().dtype()).to_lowercase(),
        expert_dtype: engine.summary().expert_dtype.clone(),
        dense_dtype: engine.summary().dense_dtype.clone(),
        device: format!("{:?}", engine.model().device().location()).to_lowercase(),
        threads: std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        load_seconds: engine.load_seconds(),
        config: config.clone(),
        prefill,
        decode,
        memory: MemoryReport {
            rss_after_load_bytes,
            peak_rss_bytes,
        },
        roofline: Roofline {
            weight_bytes_per_token,
            bandwidth_gb_per_s,
            bandwidth_source,
            bandwidth_threads: config.bandwidth_threads,
            roofline_tokens_per_second,
            decode_tokens_per_second,
            fraction_of_roofline,
        },
        expert_cache,
        bench_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Wall-clock seconds of a batch's decode steps: its longest sequence's (they start together).
fn decode_wall_seconds(responses: &[GenerateResponse]) -> f64 {
    responses
        .iter()
        .map(|r| r.timings.decode_seconds)
        .fold(0.0, f64::max)
}

/// Aggregate (all sequences) and median per-sequence decode tokens per second of one batch.
fn decode_rates(responses: &[GenerateResponse]) -> (f64, f64) {
    let steps: usize = responses
        .iter()
        .map(|r| r.timings.generated_tokens.saturating_sub(1))
        .sum();
    let seconds = decode_wall_seconds(responses);
    let aggregate = if seconds > 0.0 {
        steps as f64 / seconds
    } else {
        0.0
    };
    let per_seq = Stat::new(
        responses
            .iter()
            .map(|r| r.timings.decode_tokens_per_second)
            .collect(),
    );
    (aggregate, per_seq.median)
}

/// Bytes of weights one batch-1 decode token reads, in the dtype `dtype` the weights are held
/// in: every non-embedding weight (attention, norms, router, shared experts, dense MLPs,
/// lm_head) + `top_k / n_experts` of the routed experts + one embedding row. With a tied
/// lm_head the embedding table is read whole as the head. Int8 experts (`expert_dtype` `q8`
/// in the summary) count one byte per routed parameter (their per-row scales, 4 bytes per
/// row of thousands, are left out); int8 dense projections (`dense_dtype` `q8`) one byte per
/// non-routed parameter other than the routers and the embedding row (the norms, a few
/// thousand parameters a layer, are counted at one byte too); everything else is held in
/// `dtype`.
pub fn decode_weight_bytes_per_token(
    summary: &ModelSummary,
    hparams: &DecoderHParams,
    dtype: DType,
) -> u64 {
    let embedding = (hparams.vocab_size * hparams.hidden_size) as u64;
    let untied_embedding = if hparams.tie_word_embeddings {
        0
    } else {
        embedding
    };
    let params = summary
        .params_active
        .saturating_sub(untied_embedding)
        .saturating_add(hparams.hidden_size as u64);
    let elem = dtype.size_in_bytes() as u64;
    let routed = summary.params_active_routed.min(params);
    let routed_bytes = if summary.expert_dtype == "q8" {
        routed
    } else {
        routed * elem
    };
    let rest = params - routed;
    let rest_bytes = if summary.dense_dtype == "q8" {
        let routers = (summary.moe_layers.len() * summary.n_experts * hparams.hidden_size) as u64;
        let float = (routers + hparams.hidden_size as u64).min(rest);
        float * elem + (rest - float)
    } else {
        rest * elem
    };
    routed_bytes + rest_bytes
}

/// Read bandwidth of main memory in GB/s (10^9 bytes): the median of eight passes of
/// `threads` threads summing disjoint parts of a `bytes`-long buffer (make it much larger than
/// the last-level cache). The median, not the best: a single fast pass (the buffer's tail
/// still in cache, a burst of turbo) overstated the bandwidth by up to 1.8× on a 2-core Zen 4,
/// and with it the roofline. Wall-clock based: other processes on the cores make it read low.
pub fn measure_bandwidth(bytes: usize, threads: usize) -> f64 {
    let threads = threads.max(1);
    let n = (bytes / 8).max(8 * threads);
    // Non-zero so every page is really written (zero pages would all map to one frame).
    let buffer = vec![1u64; n];
    let chunk = n.div_ceil(threads);
    let mut passes = Vec::with_capacity(8);
    for _ in 0..8 {
        let start = Instant::now();
        let sum = std::thread::scope(|s| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| s.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bandwidth probe thread"))
                .fold(0u64, u64::wrapping_add)
        });
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        passes.push((n * 8) as f64 / seconds / 1e9);
    }
    Stat::new(passes).median
}

/// Sum with eight independent accumulators, so the loop is bound by loads, not by additions.
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (a, w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*w);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&acc)
        .fold(0u64, |s, w| s.wrapping_add(*w))
}

/// A `kB` field of `/proc/self/status` in bytes (`None` off Linux or when absent).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_median_min_max() {
        let s = Stat::new(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.samples, vec![3.0, 1.0, 2.0]);
        assert_eq!(Stat::new(vec![1.0, 4.0, 2.0, 3.0]).median, 2.5);
        assert!((s.spread() - 1.0).abs() < 1e-12);
        assert_eq!(Stat::new(vec![]).median, 0.0);
    }

    #[test]
    fn bandwidth_probe_sums_and_reports() {
        assert_eq!(sum_words(&[1u64; 21]), 21);
        assert!(measure_bandwidth(1 << 20, 2) > 0.0);
    }

    #[test]
    fn proc_status_has_peak_rss_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(proc_status_bytes("VmHWM").unwrap() > 0);
        }
    }
}

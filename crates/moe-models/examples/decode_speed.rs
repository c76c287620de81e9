//! Measures prefill and decode throughput of a checkpoint with the library API (no sampling,
//! no tokenizer): `cargo run --release -p moe-models --example decode_speed -- DIR DTYPE
//! [PROMPT_LEN] [NEW_TOKENS] [N_SEQS]`. Decode feeds the argmax back; with N_SEQS > 1 the
//! sequences decode together in one batch per step (each with its own KV cache).

use std::time::Instant;

use candle_core::{DType, Device};
use moe_models::{load_decoder, ForwardContext, LoadOptions, LogitsWanted, SequenceInput};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let dtype = match args.get(2).map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::BF16,
    };
    let arg = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().unwrap());
    let (prompt_len, new_tokens, n_seqs) = (arg(3, 128), arg(4, 32), arg(5, 1));
    let t = Instant::now();
    let options = LoadOptions {
        dtype,
        device: Device::Cpu,
        expert_source: None,
        expert_dtype: Default::default(),
        dense_dtype: Default::default(),
    };
    let model = load_decoder(&dir, &options, false)?;
    eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0 as u32
    };
    let mut caches: Vec<_> = (0..n_seqs).map(|_| model.new_cache()).collect();
    // Prefill each sequence alone (prompt ids differ per sequence).
    let mut next = Vec::new();
    let t = Instant::now();
    for (s, cache) in caches.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..prompt_len)
            .map(|i| ((i * 7 + s * 13) % 500 + 3) as u32)
            .collect();
        let mut batch = [SequenceInput {
            tokens: &prompt,
            cache,
            logits: LogitsWanted::Last,
        }];
        let logits = model.forward(&mut batch, ForwardContext::default())?;
        next.push(vec![argmax(&logits[0].flatten_all()?.to_vec1::<f32>()?)]);
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "prefill {prompt_len} x {n_seqs}: {:.3} s, {:.1} tok/s",
        dt,
        (prompt_len * n_seqs) as f64 / dt
    );
    let mut step_times = Vec::new();
    for _ in 0..new_tokens {
        let t = Instant::now();
        let mut batch: Vec<SequenceInput> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(tok, cache)| SequenceInput {
                tokens: tok,
                cache,
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = model.forward(&mut batch, ForwardContext::default())?;
        next = logits
            .iter()
            .map(|l| Ok(vec![argmax(&l.flatten_all()?.to_vec1::<f32>()?)]))
            .collect::<anyhow::Result<_>>()?;
        step_times.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = step_times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let total: f64 = step_times.iter().sum();
    println!(
        "decode {new_tokens} steps x {n_seqs} seqs: {:.1} tok/s aggregate (mean step {:.2} ms, median {:.2} ms, min {:.2} ms)",
        (new_tokens * n_seqs) as f64 / total,
        1e3 * total / new_tokens as f64,
        1e3 * sorted[sorted.len() / 2],
        1e3 * sorted[0]
    );
    Ok(())
}

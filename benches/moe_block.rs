//! Timing of the MoE block stages (router top-k, grouping by expert, expert FFN) at decode
//! (1 and 16 tokens) and prefill (512 tokens) shapes of a Qwen3-30B-A3B-like layer.
//! Run with `cargo bench -p moe-benches`; prints the median of 15 repetitions per stage.

use std::time::Instant;

use candle_core::{Device, Tensor};
use moe_core::{RoutingSpec, ScoringFunction};
use moe_kernels::{expert_ffn, route, ExpertActivation, ExpertGroups, ExpertWeights};

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (hidden, inter, n_experts, top_k) = (1024, 256, 128, 8);
    let spec = RoutingSpec {
        n_experts,
        top_k,
        scoring: ScoringFunction::Softmax,
        renormalize: true,
        scaling_factor: 1.0,
    };
    let expert = ExpertWeights::new(
        Tensor::randn(0f32, 0.02, (inter, hidden), &dev)?,
        Tensor::randn(0f32, 0.02, (inter, hidden), &dev)?,
        Tensor::randn(0f32, 0.02, (hidden, inter), &dev)?,
    );
    println!(
        "{:>8} {:>12} {:>12} {:>16}",
        "tokens", "route ms", "group ms", "ffn/expert ms"
    );
    for n_tokens in [1usize, 16, 512] {
        let logits = Tensor::randn(0f32, 1.0, (n_tokens, n_experts), &dev)?;
        // Rows one expert receives on average.
        let rows = (n_tokens * top_k / n_experts).max(1);
        let x = Tensor::randn(0f32, 1.0, (rows, hidden), &dev)?;
        let routing = route(&logits, &spec)?;
        let route_ms = median_ms(|| {
            route(&logits, &spec).unwrap();
        });
        let group_ms = median_ms(|| {
            ExpertGroups::from_routing(&routing, n_experts).unwrap();
        });
        let ffn_ms = median_ms(|| {
            expert_ffn(&x, &expert, ExpertActivation::SiluGlu).unwrap();
        });
        println!("{n_tokens:>8} {route_ms:>12.4} {group_ms:>12.4} {ffn_ms:>16.4}");
    }
    Ok(())
}

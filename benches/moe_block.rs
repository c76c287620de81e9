//! criterion benches of the MoE block stages — router top-k ([`route`]), grouping by expert
//! ([`ExpertGroups::from_routing`]) and one expert's FFN ([`expert_ffn`], f32 and bf16) — at
//! decode (1 and 16 tokens) and prefill (512 tokens) shapes of the bench model
//! (`benches/scripts/make_bench_model.sh`: hidden 1024, moe_intermediate 256, 128 experts,
//! top-8), with random weights.
//!
//! `cargo bench -p moe-benches` (all), `cargo bench -p moe-benches -- expert_ffn/bf16` (some).
//! The expert FFN runs over the rows one expert receives on average at that token count
//! (`tokens * top_k / n_experts`, at least 1).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_core::{RoutingSpec, ScoringFunction};
use moe_kernels::{expert_ffn, route, ExpertActivation, ExpertGroups, ExpertWeights};

/// The bench model's MoE shape.
const HIDDEN: usize = 1024;
const INTERMEDIATE: usize = 256;
const N_EXPERTS: usize = 128;
const TOP_K: usize = 8;
/// Decode (1, 16 sequences) and prefill (512 tokens) token counts.
const TOKENS: [usize; 3] = [1, 16, 512];

fn spec() -> RoutingSpec {
    RoutingSpec {
        n_experts: N_EXPERTS,
        top_k: TOP_K,
        scoring: ScoringFunction::Softmax,
        renormalize: true,
        scaling_factor: 1.0,
    }
}

fn router_logits(n_tokens: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (n_tokens, N_EXPERTS), &Device::Cpu).expect("router logits")
}

fn bench_route(c: &mut Criterion) {
    let spec = spec();
    let mut group = c.benchmark_group("route");
    for n in TOKENS {
        let logits = router_logits(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &logits, |b, logits| {
            b.iter(|| route(logits, &spec).expect("route"))
        });
    }
    group.finish();
}

fn bench_grouping(c: &mut Criterion) {
    let spec = spec();
    let mut group = c.benchmark_group("group");
    for n in TOKENS {
        let routing = route(&router_logits(n), &spec).expect("route");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &routing, |b, routing| {
            b.iter(|| ExpertGroups::from_routing(routing, N_EXPERTS).expect("group"))
        });
    }
    group.finish();
}

fn bench_expert_ffn(c: &mut Criterion) {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let weight = |rows, cols| {
            Tensor::randn(0f32, 0.02, (rows, cols), &dev)
                .and_then(|t| t.to_dtype(dtype))
                .expect("weight")
        };
        let expert = ExpertWeights::new(
            weight(INTERMEDIATE, HIDDEN),
            weight(INTERMEDIATE, HIDDEN),
            weight(HIDDEN, INTERMEDIATE),
        );
        let name = format!("expert_ffn/{}", format!("{dtype:?}").to_lowercase());
        let mut group = c.benchmark_group(name);
        for n in TOKENS {
            let rows = (n * TOP_K / N_EXPERTS).max(1);
            let x = weight(rows, HIDDEN);
            // Bytes of weights one call streams: what bounds it at decode shapes.
            group.throughput(Throughput::Bytes(expert.n_bytes() as u64));
            group.bench_with_input(BenchmarkId::new("tokens", n), &x, |b, x| {
                b.iter(|| expert_ffn(x, &expert, ExpertActivation::SiluGlu).expect("ffn"))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_route, bench_grouping, bench_expert_ffn
}
criterion_main!(benches);

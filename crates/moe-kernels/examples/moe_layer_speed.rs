//! Effective bandwidth of one whole MoE layer (the grouped expert FFN over all of a layer's
//! experts, weights out of cache) against a plain read of the bytes of the experts it uses:
//! `cargo run --release -p moe-kernels --example moe_layer_speed -- [TOKENS] [LAYERS]`.
//!
//! The shape is the bench model's (hidden 1024, moe_intermediate 256, 128 experts, top-8,
//! bf16). `LAYERS` copies of the layer (default 16) are cycled through so that no expert is
//! still in cache when it comes round again; the routing is random and different per layer.
//! Both figures come from the same run, so their ratio survives a loaded machine.

use std::time::Instant;

use half::bf16;
use moe_kernels::cpu::{grouped_expert_ffn, pool, ExpertSlices};
use moe_kernels::{ExpertActivation, ExpertGroups};

const HIDDEN: usize = 1024;
const INTER: usize = 256;
const N_EXPERTS: usize = 128;
const TOP_K: usize = 8;

/// A small deterministic generator (no dependency for an example).
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("numeric arguments"))
        .collect();
    let tokens = *args.first().unwrap_or(&16);
    let n_layers = *args.get(1).unwrap_or(&16);
    let mut seed = 1u64;
    let per_matrix = INTER * HIDDEN;
    // Each layer: 128 experts × [gate, up, down], one allocation per layer as the loader does.
    let layers: Vec<Vec<bf16>> = (0..n_layers)
        .map(|_| {
            (0..N_EXPERTS * 3 * per_matrix)
                .map(|_| bf16::from_f32((next(&mut seed) % 97) as f32 * 1e-3 - 0.048))
                .collect()
        })
        .collect();
    let routes: Vec<ExpertGroups> = (0..n_layers)
        .map(|_| {
            let mut ids = Vec::with_capacity(tokens * TOP_K);
            for _ in 0..tokens {
                let mut picked: Vec<u32> = Vec::with_capacity(TOP_K);
                while picked.len() < TOP_K {
                    let e = (next(&mut seed) % N_EXPERTS as u64) as u32;
                    if !picked.contains(&e) {
                        picked.push(e);
                    }
                }
                ids.extend(picked);
            }
            let w = vec![1.0 / TOP_K as f32; ids.len()];
            ExpertGroups::from_slices(&ids, &w, TOP_K, N_EXPERTS).expect("groups")
        })
        .collect();
    let x: Vec<f32> = (0..tokens * HIDDEN)
        .map(|i| (i % 13) as f32 * 0.1)
        .collect();
    let mut out = vec![0f32; tokens * HIDDEN];
    let active_bytes: usize = routes
        .iter()
        .map(|g| g.active_experts().count() * 3 * per_matrix * 2)
        .sum();
    fn slices(layer: &[bf16], e: usize, per_matrix: usize) -> ExpertSlices<'_, bf16> {
        let base = e * 3 * per_matrix;
        ExpertSlices {
            gate: &layer[base..base + per_matrix],
            up: &layer[base + per_matrix..base + 2 * per_matrix],
            down: &layer[base + 2 * per_matrix..base + 3 * per_matrix],
            gate_bias: None,
            up_bias: None,
            down_bias: None,
            scales: None,
        }
    }
    for round in 0..4 {
        let t = Instant::now();
        pool::run_on_pool(|| {
            for (layer, groups) in layers.iter().zip(&routes) {
                let experts: Vec<ExpertSlices<'_, bf16>> = groups
                    .active_experts()
                    .map(|e| slices(layer, e, per_matrix))
                    .collect();
                out.fill(0.0);
                grouped_expert_ffn(
                    &x,
                    HIDDEN,
                    INTER,
                    groups,
                    &experts,
                    ExpertActivation::SiluGlu,
                    &mut out,
                );
            }
        });
        let ffn = t.elapsed().as_secs_f64();
        // The same experts' bytes, read plainly (summed as u64 words), split over the pool.
        let t = Instant::now();
        let total = std::sync::atomic::AtomicU64::new(0);
        pool::run_on_pool(|| {
            for (layer, groups) in layers.iter().zip(&routes) {
                let active: Vec<usize> = groups.active_experts().collect();
                pool::for_each_task(active.len(), |i| {
                    let base = active[i] * 3 * per_matrix;
                    let part = &layer[base..base + 3 * per_matrix];
                    let mut acc = [0u16; 32];
                    for c in part.chunks_exact(32) {
                        for (a, v) in acc.iter_mut().zip(c) {
                            *a = a.wrapping_add(v.to_bits());
                        }
                    }
                    let s: u64 = acc.iter().map(|&v| v as u64).sum();
                    total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
        let read = t.elapsed().as_secs_f64();
        let gb = active_bytes as f64 / 1e9;
        println!(
            "round {round}: {tokens} token(s), {n_layers} layers, {:.1} experts/layer: ffn {:.2} ms/layer = {:.1} GB/s; plain read {:.1} GB/s; ratio {:.2} (sink {})",
            routes.iter().map(|g| g.active_experts().count()).sum::<usize>() as f64
                / n_layers as f64,
            ffn * 1e3 / n_layers as f64,
            gb / ffn,
            gb / read,
            read / ffn,
            total.into_inner() % 7 + out[0] as u64 % 2
        );
    }
}

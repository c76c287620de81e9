//! The fast grouped expert FFN of `moe_kernels::cpu` against the reference pipeline (each
//! expert with `expert_ffn_reference`, then `combine`), and its wave-by-wave form (what a
//! budgeted expert cache makes the MoE block use) against the all-at-once call: the same sums
//! in the same order, so bit-identical. Int8 experts (`--expert-dtype q8`) against the same
//! experts dequantized to f32 through the reference.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{values, Rng};
use moe_kernels::cpu::{fast_grouped_experts, fast_grouped_experts_in_waves};
use moe_kernels::{combine, expert_ffn_reference, ExpertActivation, ExpertGroups, ExpertWeights};

struct Case {
    n_tokens: usize,
    hidden: usize,
    intermediate: usize,
    n_experts: usize,
    top_k: usize,
}

fn tensor(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.vec(n, 0.5), dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn experts(rng: &mut Rng, c: &Case, dtype: DType) -> Vec<ExpertWeights> {
    (0..c.n_experts)
        .map(|_| {
            ExpertWeights::new(
                tensor(rng, &[c.intermediate, c.hidden], dtype),
                tensor(rng, &[c.intermediate, c.hidden], dtype),
                tensor(rng, &[c.hidden, c.intermediate], dtype),
            )
        })
        .collect()
}

fn groups(rng: &mut Rng, c: &Case) -> ExpertGroups {
    let ids = rng.routing(c.n_tokens, c.top_k, c.n_experts);
    let weights: Vec<f32> = (0..ids.len()).map(|_| rng.uniform().abs() + 0.05).collect();
    ExpertGroups::from_slices(&ids, &weights, c.top_k, c.n_experts).unwrap()
}

fn reference(x: &Tensor, g: &ExpertGroups, w: &[ExpertWeights], act: ExpertActivation) -> Tensor {
    let (n, h) = x.dims2().unwrap();
    let x32 = x.to_dtype(DType::F32).unwrap();
    let outputs: Vec<Tensor> = g
        .active_experts()
        .map(|e| {
            let rows = g.rows(e).0;
            let rows = Tensor::from_slice(rows, rows.len(), &Device::Cpu).unwrap();
            let f32_bias = |b: &Option<Tensor>| b.as_ref().map(|b| b.to_dtype(DType::F32).unwrap());
            let w32 = ExpertWeights {
                gate_bias: f32_bias(&w[e].gate_bias),
                up_bias: f32_bias(&w[e].up_bias),
                down_bias: f32_bias(&w[e].down_bias),
                ..ExpertWeights::new(
                    w[e].gate.to_dtype(DType::F32).unwrap(),
                    w[e].up.to_dtype(DType::F32).unwrap(),
                    w[e].down.to_dtype(DType::F32).unwrap(),
                )
            };
            expert_ffn_reference(&x32.index_select(&rows, 0).unwrap(), &w32, act).unwrap()
        })
        .collect();
    combine(n, h, g, &outputs, DType::F32, &Device::Cpu).unwrap()
}

const CASES: [Case; 4] = [
    // one token (decode)
    Case {
        n_tokens: 1,
        hidden: 64,
        intermediate: 24,
        n_experts: 8,
        top_k: 2,
    },
    // tokens >> experts, sizes not multiples of the vector width
    Case {
        n_tokens: 37,
        hidden: 45,
        intermediate: 19,
        n_experts: 4,
        top_k: 2,
    },
    // many experts with no token
    Case {
        n_tokens: 3,
        hidden: 32,
        intermediate: 16,
        n_experts: 64,
        top_k: 4,
    },
    // top_k = n_experts
    Case {
        n_tokens: 9,
        hidden: 40,
        intermediate: 8,
        n_experts: 5,
        top_k: 5,
    },
];

/// Both gated activations: SiLU-GLU and GPT-OSS's clamped SwiGLU.
const ACTIVATIONS: [ExpertActivation; 2] = [
    ExpertActivation::SiluGlu,
    ExpertActivation::ClampedSwiGlu {
        alpha: 1.702,
        limit: 7.0,
    },
];

#[test]
fn grouped_ffn_matches_the_reference_and_waves_match_one_call() {
    let mut rng = Rng::new("grouped_ffn");
    for dtype in [DType::F32, DType::BF16] {
        for act in ACTIVATIONS {
            for c in &CASES {
                let x = tensor(&mut rng, &[c.n_tokens, c.hidden], dtype);
                let w = experts(&mut rng, c, dtype);
                let g = groups(&mut rng, c);
                let active: Vec<usize> = g.active_experts().collect();
                let picked: Vec<&ExpertWeights> = active.iter().map(|&e| &w[e]).collect();
                let all = fast_grouped_experts(&x, &g, &picked, act)
                    .unwrap()
                    .expect("applies");
                assert_eq!(all.dtype(), dtype);
                // f32 kernel vs f32 reference: summation order only; bf16: one rounding of
                // the output (weights are the same bf16 values in both).
                let want = values(&reference(&x, &g, &w, act));
                let got = values(&all);
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                // f32: the summation order, and on CPUs with AVX512-VNNI the int16 rounding
                // of each row of x and of the activations before the down projection
                // (cpu::gemm_vnni: 1.5e-5 of the row's largest per element).
                let tol = if dtype == DType::F32 { 2e-4 } else { 8e-3 } * scale;
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{dtype:?} {act:?} tokens {} experts {}: element {i}: {a} vs {b}",
                        c.n_tokens,
                        c.n_experts
                    );
                }
                for wave in [1, 2, 3] {
                    let mut fetched = Vec::new();
                    let waves = fast_grouped_experts_in_waves(&x, &g, &active, wave, act, |ids| {
                        assert!(!ids.is_empty() && ids.len() <= wave, "a wave of 1..={wave}");
                        fetched.extend_from_slice(ids);
                        Ok(ids.iter().map(|&e| &w[e]).collect())
                    })
                    .unwrap()
                    .expect("applies");
                    assert_eq!(
                        fetched, active,
                        "every active expert fetched once, in order"
                    );
                    assert_eq!(values(&waves), got, "{dtype:?} waves of {wave} differ");
                }
            }
        }
    }
}

/// Int8 experts with per-row scales (and biases, so the scale must come before them) through
/// the grouped kernel vs the same experts dequantized to f32 (`scale × value`) through the
/// reference: the kernel scales each finished dot product instead of each weight, so only the
/// summation order and that one rounding differ (1e-5 relative, as f32), plus, on CPUs with
/// AVX512-VNNI, the int16 rounding of the kernel's inputs (2e-4 relative in all). Waves are
/// bit-identical to one call; the int8 result stays near the unquantized experts' (loose bound:
/// a wrong scale moves it by whole units).
#[test]
fn q8_grouped_ffn_matches_the_dequantized_reference() {
    let mut rng = Rng::new("q8_grouped_ffn");
    for dtype in [DType::F32, DType::BF16] {
        for act in ACTIVATIONS {
            for c in &CASES {
                let x = tensor(&mut rng, &[c.n_tokens, c.hidden], dtype);
                let float: Vec<ExpertWeights> = experts(&mut rng, c, DType::F32)
                    .into_iter()
                    .map(|w| ExpertWeights {
                        gate_bias: Some(tensor(&mut rng, &[c.intermediate], DType::F32)),
                        up_bias: Some(tensor(&mut rng, &[c.intermediate], DType::F32)),
                        down_bias: Some(tensor(&mut rng, &[c.hidden], DType::F32)),
                        ..w
                    })
                    .collect();
                let q8: Vec<ExpertWeights> =
                    float.iter().map(|w| w.quantize_q8().unwrap()).collect();
                let dequantized: Vec<ExpertWeights> = q8
                    .iter()
                    .map(|w| w.dequantized(DType::F32).unwrap().into_owned())
                    .collect();
                let g = groups(&mut rng, c);
                let active: Vec<usize> = g.active_experts().collect();
                let picked: Vec<&ExpertWeights> = active.iter().map(|&e| &q8[e]).collect();
                let all = fast_grouped_experts(&x, &g, &picked, act)
                    .unwrap()
                    .expect("applies to int8 experts");
                assert_eq!(all.dtype(), dtype);
                let got = values(&all);
                let want = values(&reference(&x, &g, &dequantized, act));
                let unquantized = values(&reference(&x, &g, &float, act));
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                // f32: the summation order, and on CPUs with AVX512-VNNI the int16 rounding
                // of each row of x and of the activations before the down projection
                // (cpu::gemm_vnni: 1.5e-5 of the row's largest per element).
                let tol = if dtype == DType::F32 { 2e-4 } else { 8e-3 } * scale;
                for (i, ((a, b), f)) in got.iter().zip(&want).zip(&unquantized).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{dtype:?} {act:?} tokens {} experts {}: element {i}: {a} vs {b}",
                        c.n_tokens,
                        c.n_experts
                    );
                    assert!(
                        (a - f).abs() <= 0.1 * scale,
                        "int8 far from float at {i}: {a} vs {f}"
                    );
                }
                for wave in [1, 2, 3] {
                    let waves = fast_grouped_experts_in_waves(&x, &g, &active, wave, act, |ids| {
                        Ok(ids.iter().map(|&e| &q8[e]).collect())
                    })
                    .unwrap()
                    .expect("applies");
                    assert_eq!(values(&waves), got, "int8 waves of {wave} differ");
                }
            }
        }
    }
}

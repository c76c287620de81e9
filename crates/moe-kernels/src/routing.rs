//! Top-k gating: router logits `[n_tokens, n_experts]` → [`Routing`] (expert ids and weights).
//!
//! Contract: ids of each row are ordered by decreasing selection score (ties: lower id first);
//! weights are f32 and already include renormalisation and the routing scale factor. The
//! output stays on the logits' device. Knows nothing of where experts live.

use candle_core::{DType, Device, Tensor, D};
use moe_core::{Result, Routing, RoutingSpec, ScoringFunction};

/// Routes every row of `logits` (`[n_tokens, n_experts]`, any float dtype) by `spec`.
pub fn route(logits: &Tensor, spec: &RoutingSpec) -> Result<Routing> {
    check_spec(logits, spec)?;
    match logits.device() {
        Device::Cpu => route_cpu(logits, spec),
        // The CUDA top-k kernel is a later stage of the project; until then the reference
        // path runs on the device and says so once.
        other => {
            warn_reference_once();
            let routing = route_reference(logits, spec)?;
            let _ = other;
            Ok(routing)
        }
    }
}

fn warn_reference_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("moe-kernels: no fused top-k kernel for this device; routing with the reference candle ops"));
}

fn check_spec(logits: &Tensor, spec: &RoutingSpec) -> Result<()> {
    let (_, n_experts) = logits.dims2()?;
    if n_experts != spec.n_experts || spec.top_k == 0 || spec.top_k > spec.n_experts {
        return Err(moe_core::Error::InvalidRequest(format!(
            "routing: logits have {n_experts} experts, spec has n_experts {} and top_k {}",
            spec.n_experts, spec.top_k
        )));
    }
    Ok(())
}

/// The CPU kernel: one pass per row, no allocation per row.
fn route_cpu(logits: &Tensor, spec: &RoutingSpec) -> Result<Routing> {
    let (n_tokens, n_experts) = logits.dims2()?;
    let k = spec.top_k;
    let values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut ids = vec![0u32; n_tokens * k];
    let mut weights = vec![0f32; n_tokens * k];
    let mut scores = vec![0f32; n_experts];
    let mut order: Vec<u32> = Vec::with_capacity(n_experts);
    for row in 0..n_tokens {
        let row_logits = &values[row * n_experts..(row + 1) * n_experts];
        match spec.scoring {
            ScoringFunction::Softmax => softmax_into(row_logits, &mut scores),
            ScoringFunction::TopKThenSoftmax => scores.copy_from_slice(row_logits),
        }
        order.clear();
        order.extend(0..n_experts as u32);
        // Partial selection then a sort of the k winners: O(E + k log k).
        let by_score = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        };
        if k < n_experts {
            order.select_nth_unstable_by(k - 1, by_score);
        }
        order[..k].sort_unstable_by(by_score);
        let row_ids = &mut ids[row * k..(row + 1) * k];
        let row_weights = &mut weights[row * k..(row + 1) * k];
        for (slot, &expert) in order[..k].iter().enumerate() {
            row_ids[slot] = expert;
            row_weights[slot] = scores[expert as usize];
        }
        if spec.scoring == ScoringFunction::TopKThenSoftmax {
            let chosen: Vec<f32> = row_weights.to_vec();
            softmax_into(&chosen, row_weights);
        }
        finish_weights(row_weights, spec);
    }
    let device = logits.device();
    Ok(Routing {
        expert_ids: Tensor::from_vec(ids, (n_tokens, k), device)?,
        weights: Tensor::from_vec(weights, (n_tokens, k), device)?,
    })
}

/// torch's f32 softmax (the router's `softmax(logits.float())`), bit for bit.
fn softmax_into(logits: &[f32], out: &mut [f32]) {
    crate::softmax::softmax_row(logits, out);
}

fn finish_weights(weights: &mut [f32], spec: &RoutingSpec) {
    if spec.renormalize {
        let sum: f32 = weights.iter().sum();
        for w in weights.iter_mut() {
            *w /= sum;
        }
    }
    if spec.scaling_factor != 1.0 {
        for w in weights.iter_mut() {
            *w *= spec.scaling_factor;
        }
    }
}

/// The same contract made of plain candle ops: the slow reference the kernels are tested
/// against, and the path for devices without a fused kernel.
pub fn route_reference(logits: &Tensor, spec: &RoutingSpec) -> Result<Routing> {
    check_spec(logits, spec)?;
    let logits = logits.to_dtype(DType::F32)?;
    let k = spec.top_k;
    let scores = match spec.scoring {
        ScoringFunction::Softmax => candle_nn_softmax(&logits)?,
        ScoringFunction::TopKThenSoftmax => logits.clone(),
    };
    // arg_sort is stable in candle's CPU backend, so ties keep the lower id first.
    let order = scores.arg_sort_last_dim(false)?;
    let expert_ids = order.narrow(D::Minus1, 0, k)?.contiguous()?;
    let mut weights = scores.gather(&expert_ids, D::Minus1)?;
    if spec.scoring == ScoringFunction::TopKThenSoftmax {
        weights = candle_nn_softmax(&weights)?;
    }
    if spec.renormalize {
        weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
    }
    if spec.scaling_factor != 1.0 {
        weights = (weights * spec.scaling_factor as f64)?;
    }
    Ok(Routing {
        expert_ids,
        weights,
    })
}

fn candle_nn_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        n_experts: usize,
        top_k: usize,
        scoring: ScoringFunction,
        renormalize: bool,
        scale: f32,
    ) -> RoutingSpec {
        RoutingSpec {
            n_experts,
            top_k,
            scoring,
            renormalize,
            scaling_factor: scale,
        }
    }

    fn random_logits(n_tokens: usize, n_experts: usize, seed: u64) -> Tensor {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let values: Vec<f32> = (0..n_tokens * n_experts)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
            })
            .collect();
        Tensor::from_vec(values, (n_tokens, n_experts), &Device::Cpu).unwrap()
    }

    #[test]
    fn cpu_kernel_matches_reference_on_random_and_edge_shapes() {
        let cases = [(1, 8, 2), (37, 8, 2), (5, 16, 16), (64, 12, 4), (3, 3, 1)];
        for (seed, &(n_tokens, n_experts, k)) in cases.iter().enumerate() {
            for scoring in [ScoringFunction::Softmax, ScoringFunction::TopKThenSoftmax] {
                for (renorm, scale) in [(false, 1.0), (true, 1.0), (false, 2.5)] {
                    let logits = random_logits(n_tokens, n_experts, seed as u64);
                    let s = spec(n_experts, k, scoring, renorm, scale);
                    let fast = route(&logits, &s).unwrap();
                    let slow = route_reference(&logits, &s).unwrap();
                    let fast_ids: Vec<Vec<u32>> = fast.expert_ids.to_vec2().unwrap();
                    assert_eq!(
                        fast_ids,
                        slow.expert_ids.to_vec2::<u32>().unwrap(),
                        "{n_tokens}x{n_experts} k{k}"
                    );
                    let diff = (fast.weights - slow.weights)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap();
                    assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn renormalised_weights_sum_to_scale() {
        let logits = random_logits(9, 8, 7);
        let routing = route(&logits, &spec(8, 3, ScoringFunction::Softmax, true, 2.0)).unwrap();
        for row in routing.weights.to_vec2::<f32>().unwrap() {
            assert!((row.iter().sum::<f32>() - 2.0).abs() < 1e-5);
        }
    }

    #[test]
    fn rejects_top_k_above_expert_count() {
        let logits = random_logits(2, 4, 1);
        assert!(route(&logits, &spec(4, 5, ScoringFunction::Softmax, false, 1.0)).is_err());
    }
}

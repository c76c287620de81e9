//! Top-k gating: router logits `[n_tokens, n_experts]` → [`Routing`] (expert ids and weights).
//!
//! Contract: ids of each row are ordered by decreasing selection score (ties: lower id first);
//! weights are f32 and already include renormalisation and the routing scale factor. The
//! output stays on the logits' device. Knows nothing of where experts live.

use candle_core::{DType, Device, Tensor, D};
use moe_core::{GroupScore, Result, Routing, RoutingSpec, ScoringFunction};

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
    if matches!(spec.scoring, ScoringFunction::SparseMixer { .. }) && spec.top_k != 2 {
        return Err(moe_core::Error::InvalidRequest(format!(
            "routing: sparsemixer always chooses 2 experts, spec has top_k {}",
            spec.top_k
        )));
    }
    if let Some(limit) = spec.scoring.group_limit() {
        let g = limit.n_group;
        let group_size = spec.n_experts.checked_div(g).unwrap_or(0);
        if g == 0
            || !spec.n_experts.is_multiple_of(g)
            || limit.topk_group == 0
            || limit.topk_group > g
            || limit.topk_group * group_size < spec.top_k
            || (limit.group_score == GroupScore::SumTop2 && group_size < 2)
        {
            return Err(moe_core::Error::InvalidRequest(format!(
                "routing: {} experts in {g} groups keeping {} groups cannot choose {} experts \
                 (groups must be equal, of at least 2 experts for a sum-of-top-2 score)",
                spec.n_experts, limit.topk_group, spec.top_k
            )));
        }
    }
    Ok(())
}

/// The CPU kernel: one pass per row, no allocation per row.
fn route_cpu(logits: &Tensor, spec: &RoutingSpec) -> Result<Routing> {
    if let ScoringFunction::SparseMixer { jitter_eps } = spec.scoring {
        return sparsemixer_cpu(logits, spec, jitter_eps);
    }
    if uses_choice_kernel(spec.scoring) {
        return choice_cpu(logits, None, spec);
    }
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
            ScoringFunction::SparseMixer { .. } => unreachable!("routed by sparsemixer_cpu"),
            ScoringFunction::Sigmoid
            | ScoringFunction::SoftmaxGroupLimited(_)
            | ScoringFunction::SigmoidGroupLimited(_) => unreachable!("routed by choice_cpu"),
        }
        select_top_k(&scores, k, &mut order);
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
/// Fills `order[..k]` with the ids of the `k` largest `keys`, largest first (ties: lower id
/// first). Partial selection then a sort of the winners: O(E + k log k), no allocation.
fn select_top_k(keys: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..keys.len() as u32);
    let by_key = |a: &u32, b: &u32| {
        keys[*b as usize]
            .total_cmp(&keys[*a as usize])
            .then(a.cmp(b))
    };
    if k < keys.len() {
        order.select_nth_unstable_by(k - 1, by_key);
    }
    order[..k].sort_unstable_by(by_key);
}

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
    if let ScoringFunction::SparseMixer { jitter_eps } = spec.scoring {
        return sparsemixer_reference(&logits, spec, jitter_eps);
    }
    if uses_choice_kernel(spec.scoring) {
        return choice_reference(&logits, None, spec);
    }
    let k = spec.top_k;
    let scores = match spec.scoring {
        ScoringFunction::Softmax => candle_nn_softmax(&logits)?,
        ScoringFunction::TopKThenSoftmax => logits.clone(),
        ScoringFunction::SparseMixer { .. } => unreachable!("routed by sparsemixer_reference"),
        ScoringFunction::Sigmoid
        | ScoringFunction::SoftmaxGroupLimited(_)
        | ScoringFunction::SigmoidGroupLimited(_) => unreachable!("routed by choice_reference"),
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

/// sparsemixer's mask threshold: transformers compares the f32 ratio with the Python float
/// `2 * jitter_eps`, which torch casts to f32.
fn sparsemixer_threshold(jitter_eps: f64) -> f32 {
    (2.0 * jitter_eps) as f32
}

/// Phi-MoE's sparsemixer (transformers' `sparsemixer`, `training=False`) on the CPU, one row
/// at a time: expert 1 is the largest logit `m1` (lowest id on ties), weighted by
/// `softmax(masked)[e1]` where `masked` drops (to -inf) every logit `s` with
/// `(m1 - s) / max(|s|, m1) > 2·jitter_eps`; expert 2 is the largest logit `m2` once `e1` is
/// removed, weighted the same way with `m2` in place of `m1` and `e1` also dropped.
fn sparsemixer_cpu(logits: &Tensor, spec: &RoutingSpec, jitter_eps: f64) -> Result<Routing> {
    let (n_tokens, n_experts) = logits.dims2()?;
    let threshold = sparsemixer_threshold(jitter_eps);
    let values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut ids = vec![0u32; n_tokens * 2];
    let mut weights = vec![0f32; n_tokens * 2];
    let mut masked = vec![0f32; n_experts];
    let mut probs = vec![0f32; n_experts];
    // Largest value and its first index, skipping `skip`.
    let arg_max = |row: &[f32], skip: Option<usize>| -> (usize, f32) {
        let mut best = (usize::MAX, f32::NEG_INFINITY);
        for (e, &v) in row.iter().enumerate() {
            if Some(e) != skip && (best.0 == usize::MAX || v > best.1) {
                best = (e, v);
            }
        }
        best
    };
    for row in 0..n_tokens {
        let s = &values[row * n_experts..(row + 1) * n_experts];
        let mut skip = None;
        for choice in 0..2 {
            let (expert, max) = arg_max(s, skip);
            for (e, (m, &v)) in masked.iter_mut().zip(s).enumerate() {
                // torch: `((max - scores) / scores.abs().clamp(min=max)) > 2 * jitter_eps`
                // (NaN, from 0/0, compares false and keeps the logit).
                let far = (max - v) / v.abs().max(max) > threshold;
                *m = if far || Some(e) == skip {
                    f32::NEG_INFINITY
                } else {
                    v
                };
            }
            softmax_into(&masked, &mut probs);
            ids[row * 2 + choice] = expert as u32;
            weights[row * 2 + choice] = probs[expert];
            skip = Some(expert);
        }
        finish_weights(&mut weights[row * 2..(row + 1) * 2], spec);
    }
    let device = logits.device();
    Ok(Routing {
        expert_ids: Tensor::from_vec(ids, (n_tokens, 2), device)?,
        weights: Tensor::from_vec(weights, (n_tokens, 2), device)?,
    })
}

/// sparsemixer's inference path as candle ops on f32 `logits`, step for step as transformers
/// writes it.
fn sparsemixer_reference(logits: &Tensor, spec: &RoutingSpec, jitter_eps: f64) -> Result<Routing> {
    let (n_tokens, n_experts) = logits.dims2()?;
    let device = logits.device();
    let threshold = sparsemixer_threshold(jitter_eps) as f64;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (n_tokens, n_experts), device)?;
    // softmax over `gates` with the logits far below `max` (relative to |logit|) masked out.
    let masked_softmax = |gates: &Tensor, max: &Tensor| -> candle_core::Result<Tensor> {
        let factor = logits.abs()?.broadcast_maximum(max)?;
        let far = max.broadcast_sub(logits)?.div(&factor)?.gt(threshold)?;
        candle_nn_softmax(&far.where_cond(&neg_inf, gates)?)
    };
    let max1 = logits.max_keepdim(D::Minus1)?;
    let first = logits.argmax_keepdim(D::Minus1)?;
    let w1 = masked_softmax(logits, &max1)?.gather(&first, D::Minus1)?;
    // `torch.scatter(scores, -1, selected_experts, -inf)`
    let expert_index = Tensor::arange(0u32, n_experts as u32, device)?.unsqueeze(0)?;
    let is_first = expert_index.broadcast_eq(&first)?;
    let rest = is_first.where_cond(&neg_inf, logits)?;
    let max2 = rest.max_keepdim(D::Minus1)?;
    let second = rest.argmax_keepdim(D::Minus1)?;
    let w2 = masked_softmax(&rest, &max2)?.gather(&second, D::Minus1)?;
    let expert_ids = Tensor::cat(&[first, second], D::Minus1)?;
    let mut weights = Tensor::cat(&[w1, w2], D::Minus1)?;
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

/// Routes like [`route`], with a per-expert correction bias (`[n_experts]`, DeepSeek-V3's
/// `e_score_correction_bias`) added to the selection scores for the choice only: the weights
/// are taken from the scores without it. Only for softmax or sigmoid scoring (plain or
/// group-limited); `None` is exactly [`route`].
pub fn route_with_bias(
    logits: &Tensor,
    bias: Option<&Tensor>,
    spec: &RoutingSpec,
) -> Result<Routing> {
    let Some(bias) = bias else {
        return route(logits, spec);
    };
    check_spec(logits, spec)?;
    check_bias(bias, spec)?;
    match logits.device() {
        Device::Cpu => choice_cpu(logits, Some(bias), spec),
        _ => {
            warn_reference_once();
            route_reference_with_bias(logits, Some(bias), spec)
        }
    }
}

/// [`route_with_bias`] made of plain candle ops.
pub fn route_reference_with_bias(
    logits: &Tensor,
    bias: Option<&Tensor>,
    spec: &RoutingSpec,
) -> Result<Routing> {
    let Some(bias) = bias else {
        return route_reference(logits, spec);
    };
    check_spec(logits, spec)?;
    check_bias(bias, spec)?;
    choice_reference(&logits.to_dtype(DType::F32)?, Some(bias), spec)
}

/// Scorings routed by [`choice_cpu`] / [`choice_reference`] (the only ones a bias applies to,
/// besides plain softmax).
fn uses_choice_kernel(scoring: ScoringFunction) -> bool {
    matches!(
        scoring,
        ScoringFunction::Sigmoid
            | ScoringFunction::SoftmaxGroupLimited(_)
            | ScoringFunction::SigmoidGroupLimited(_)
    )
}

fn check_bias(bias: &Tensor, spec: &RoutingSpec) -> Result<()> {
    if !matches!(spec.scoring, ScoringFunction::Softmax) && !uses_choice_kernel(spec.scoring) {
        return Err(moe_core::Error::InvalidRequest(format!(
            "routing: a correction bias needs softmax or sigmoid scores, not {:?}",
            spec.scoring
        )));
    }
    if bias.dims() != [spec.n_experts] {
        return Err(moe_core::Error::InvalidRequest(format!(
            "routing: correction bias has shape {:?}, expected [{}]",
            bias.dims(),
            spec.n_experts
        )));
    }
    Ok(())
}

/// Sigmoid scoring, plain or group-limited.
fn is_sigmoid(scoring: ScoringFunction) -> bool {
    matches!(
        scoring,
        ScoringFunction::Sigmoid | ScoringFunction::SigmoidGroupLimited(_)
    )
}

/// What renormalisation adds to the sum of the chosen weights (transformers' DeepSeek-V3
/// router adds 1e-20; the softmax routers add nothing).
fn renorm_epsilon(scoring: ScoringFunction) -> f32 {
    if is_sigmoid(scoring) {
        1e-20
    } else {
        0.0
    }
}

/// The CPU kernel for softmax/sigmoid scores with an optional correction bias and group limit,
/// one row at a time: scores → choice scores (+ bias) → keep the best `topk_group` groups
/// (others to -inf) → top-k of the choice scores → weights from the scores.
fn choice_cpu(logits: &Tensor, bias: Option<&Tensor>, spec: &RoutingSpec) -> Result<Routing> {
    let (n_tokens, n_experts) = logits.dims2()?;
    let k = spec.top_k;
    let values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bias: Option<Vec<f32>> = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1())
        .transpose()?;
    let limit = spec.scoring.group_limit();
    let sigmoid = is_sigmoid(spec.scoring);
    let eps = renorm_epsilon(spec.scoring);
    let mut ids = vec![0u32; n_tokens * k];
    let mut weights = vec![0f32; n_tokens * k];
    let mut scores = vec![0f32; n_experts];
    let mut choice = vec![0f32; n_experts];
    let mut order: Vec<u32> = Vec::with_capacity(n_experts);
    let n_group = limit.map_or(1, |l| l.n_group);
    let mut group_scores = vec![0f32; n_group];
    let mut group_order: Vec<usize> = Vec::with_capacity(n_group);
    for row in 0..n_tokens {
        let row_logits = &values[row * n_experts..(row + 1) * n_experts];
        if sigmoid {
            for (s, &l) in scores.iter_mut().zip(row_logits) {
                *s = 1.0 / (1.0 + (-l).exp());
            }
        } else {
            softmax_into(row_logits, &mut scores);
        }
        match &bias {
            Some(b) => {
                for ((c, &s), &b) in choice.iter_mut().zip(&scores).zip(b) {
                    *c = s + b;
                }
            }
            None => choice.copy_from_slice(&scores),
        }
        if let Some(limit) = limit {
            let group_size = n_experts / n_group;
            for (g, gs) in group_scores.iter_mut().enumerate() {
                let members = &choice[g * group_size..(g + 1) * group_size];
                *gs = match limit.group_score {
                    GroupScore::Max => members.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    GroupScore::SumTop2 => {
                        let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for &m in members {
                            if m > first {
                                second = first;
                                first = m;
                            } else if m > second {
                                second = m;
                            }
                        }
                        first + second
                    }
                };
            }
            group_order.clear();
            group_order.extend(0..n_group);
            group_order
                .sort_by(|&a, &b| group_scores[b].total_cmp(&group_scores[a]).then(a.cmp(&b)));
            for &g in &group_order[limit.topk_group..] {
                choice[g * group_size..(g + 1) * group_size].fill(f32::NEG_INFINITY);
            }
        }
        select_top_k(&choice, k, &mut order);
        let row_ids = &mut ids[row * k..(row + 1) * k];
        let row_weights = &mut weights[row * k..(row + 1) * k];
        for (slot, &expert) in order[..k].iter().enumerate() {
            row_ids[slot] = expert;
            row_weights[slot] = scores[expert as usize];
        }
        if spec.renormalize {
            let denominator = row_weights.iter().sum::<f32>() + eps;
            for w in row_weights.iter_mut() {
                *w /= denominator;
            }
        }
        if spec.scaling_factor != 1.0 {
            for w in row_weights.iter_mut() {
                *w *= spec.scaling_factor;
            }
        }
    }
    let device = logits.device();
    Ok(Routing {
        expert_ids: Tensor::from_vec(ids, (n_tokens, k), device)?,
        weights: Tensor::from_vec(weights, (n_tokens, k), device)?,
    })
}

/// [`choice_cpu`] as candle ops on f32 `logits`, step for step as transformers' DeepSeek
/// routers write it.
fn choice_reference(logits: &Tensor, bias: Option<&Tensor>, spec: &RoutingSpec) -> Result<Routing> {
    let (n_tokens, n_experts) = logits.dims2()?;
    let device = logits.device();
    let k = spec.top_k;
    let scores = if is_sigmoid(spec.scoring) {
        (logits.neg()?.exp()? + 1.0)?.recip()?
    } else {
        candle_nn_softmax(logits)?
    };
    let mut choice = match bias {
        Some(b) => scores.broadcast_add(&b.to_dtype(DType::F32)?.unsqueeze(0)?)?,
        None => scores.clone(),
    };
    if let Some(limit) = spec.scoring.group_limit() {
        let (g, group_size) = (limit.n_group, n_experts / limit.n_group);
        let grouped = choice.reshape((n_tokens, g, group_size))?;
        let group_scores = match limit.group_score {
            GroupScore::Max => grouped.max(D::Minus1)?,
            GroupScore::SumTop2 => grouped
                .sort_last_dim(false)?
                .0
                .narrow(D::Minus1, 0, 2)?
                .sum(D::Minus1)?,
        };
        // [n_tokens, topk_group] kept groups → [n_tokens, g] 0/1 mask → per expert.
        let kept = group_scores
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, limit.topk_group)?;
        let group_ids = Tensor::arange(0u32, g as u32, device)?.reshape((1, 1, g))?;
        let group_mask = kept
            .unsqueeze(2)?
            .broadcast_eq(&group_ids)?
            .to_dtype(DType::F32)?
            .sum(1)?;
        let expert_mask = group_mask
            .unsqueeze(2)?
            .broadcast_as((n_tokens, g, group_size))?
            .reshape((n_tokens, n_experts))?;
        let neg_inf = Tensor::full(f32::NEG_INFINITY, (n_tokens, n_experts), device)?;
        choice = expert_mask.gt(0.5)?.where_cond(&choice, &neg_inf)?;
    }
    let expert_ids = choice
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, k)?
        .contiguous()?;
    let mut weights = scores.gather(&expert_ids, D::Minus1)?;
    if spec.renormalize {
        let denominator = (weights.sum_keepdim(D::Minus1)? + renorm_epsilon(spec.scoring) as f64)?;
        weights = weights.broadcast_div(&denominator)?;
    }
    if spec.scaling_factor != 1.0 {
        weights = (weights * spec.scaling_factor as f64)?;
    }
    Ok(Routing {
        expert_ids,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    let s = RoutingSpec::new(n_experts, k, scoring, renorm, scale);
                    let fast = route(&logits, &s).unwrap();
                    let slow = route_reference(&logits, &s).unwrap();
                    // Scale 1.0: an absolute 1e-6 bound even when the factor is 2.5.
                    assert_same_routing(&fast, &slow, 1.0, &format!("{n_tokens}x{n_experts} k{k}"));
                }
            }
        }
    }

    #[test]
    fn renormalised_weights_sum_to_scale() {
        let logits = random_logits(9, 8, 7);
        let routing = route(
            &logits,
            &RoutingSpec::new(8, 3, ScoringFunction::Softmax, true, 2.0),
        )
        .unwrap();
        for row in routing.weights.to_vec2::<f32>().unwrap() {
            assert!((row.iter().sum::<f32>() - 2.0).abs() < 1e-5);
        }
    }

    #[test]
    fn rejects_top_k_above_expert_count() {
        let logits = random_logits(2, 4, 1);
        assert!(route(
            &logits,
            &RoutingSpec::new(4, 5, ScoringFunction::Softmax, false, 1.0)
        )
        .is_err());
    }

    #[test]
    fn sparsemixer_cpu_kernel_matches_reference() {
        // eps 0.01 (Phi-3.5-MoE) masks most of a spread-out row; larger ones keep more.
        let cases = [(1, 8), (37, 8), (64, 16), (5, 2), (23, 12)];
        for (seed, &(n_tokens, n_experts)) in cases.iter().enumerate() {
            for jitter_eps in [0.01, 0.05, 0.2, 1.0] {
                for spread in [8.0f64, 0.5] {
                    let logits = random_logits(n_tokens, n_experts, 100 + seed as u64)
                        .affine(spread / 8.0, 0.25 * spread)
                        .unwrap();
                    let s = RoutingSpec::new(
                        n_experts,
                        2,
                        ScoringFunction::SparseMixer { jitter_eps },
                        false,
                        1.0,
                    );
                    let fast = route(&logits, &s).unwrap();
                    let slow = route_reference(&logits, &s).unwrap();
                    let what = format!("{n_tokens}x{n_experts} eps {jitter_eps}");
                    assert_same_routing(&fast, &slow, 1.0, &what);
                }
            }
        }
    }

    #[test]
    fn sparsemixer_matches_a_hand_computed_row() {
        // Logits 4, 3.95, 3.9, 1, -5 with 2·eps = 0.02: the first choice (4) keeps the
        // logits within 2 % of it (4, 3.95); the second (3.95) keeps 3.95 and 3.9 (expert 0
        // is removed), 3.9 being 1.3 % below.
        let logits = Tensor::new(&[[3.9f32, 1.0, 4.0, -5.0, 3.95]], &Device::Cpu).unwrap();
        let s = RoutingSpec::new(
            5,
            2,
            ScoringFunction::SparseMixer { jitter_eps: 0.01 },
            false,
            1.0,
        );
        let routing = route(&logits, &s).unwrap();
        assert_eq!(
            routing.expert_ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 4]]
        );
        let w = routing.weights.to_vec2::<f32>().unwrap();
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((w[0][0] - sigmoid(0.05)).abs() < 1e-6, "{w:?}");
        assert!((w[0][1] - sigmoid(0.05)).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn sparsemixer_rejects_top_k_other_than_two() {
        let logits = random_logits(2, 8, 3);
        let s = RoutingSpec::new(
            8,
            3,
            ScoringFunction::SparseMixer { jitter_eps: 0.01 },
            false,
            1.0,
        );
        assert!(route(&logits, &s).is_err());
        assert!(route_reference(&logits, &s).is_err());
    }
    fn random_bias(n_experts: usize, seed: u64) -> Tensor {
        (random_logits(1, n_experts, seed + 1000).squeeze(0).unwrap() * 0.05).unwrap()
    }

    /// Same ids; weights within 1e-6 relative to `scale` (the routing scale factor, ≥ 1).
    fn assert_same_routing(fast: &Routing, slow: &Routing, scale: f32, what: &str) {
        assert_eq!(
            fast.expert_ids.to_vec2::<u32>().unwrap(),
            slow.expert_ids.to_vec2::<u32>().unwrap(),
            "{what}"
        );
        let diff = (&fast.weights - &slow.weights)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-6 * scale.max(1.0),
            "{what}: weights differ by {diff}"
        );
    }

    #[test]
    fn choice_kernel_matches_reference_with_groups_and_bias() {
        use moe_core::GroupLimit;
        let grouped = |n_group, topk_group, group_score| GroupLimit {
            n_group,
            topk_group,
            group_score,
        };
        // (n_tokens, n_experts, k, scoring)
        let cases = [
            (37, 16, 4, ScoringFunction::Sigmoid),
            (
                37,
                16,
                4,
                ScoringFunction::SigmoidGroupLimited(grouped(4, 2, GroupScore::SumTop2)),
            ),
            (
                21,
                16,
                6,
                ScoringFunction::SigmoidGroupLimited(grouped(8, 3, GroupScore::SumTop2)),
            ),
            (
                9,
                8,
                2,
                ScoringFunction::SigmoidGroupLimited(grouped(1, 1, GroupScore::SumTop2)),
            ),
            (
                37,
                16,
                4,
                ScoringFunction::SoftmaxGroupLimited(grouped(4, 2, GroupScore::Max)),
            ),
            (
                12,
                12,
                2,
                ScoringFunction::SoftmaxGroupLimited(grouped(6, 1, GroupScore::Max)),
            ),
            (
                12,
                12,
                3,
                ScoringFunction::SoftmaxGroupLimited(grouped(6, 2, GroupScore::Max)),
            ),
            (
                5,
                16,
                8,
                ScoringFunction::SoftmaxGroupLimited(grouped(4, 2, GroupScore::SumTop2)),
            ),
            (64, 12, 4, ScoringFunction::Softmax),
        ];
        for (seed, &(n_tokens, n_experts, k, scoring)) in cases.iter().enumerate() {
            let logits = random_logits(n_tokens, n_experts, seed as u64);
            let bias = random_bias(n_experts, seed as u64);
            for (renorm, scale) in [(false, 1.0), (true, 1.0), (true, 2.5), (false, 16.0)] {
                let s = RoutingSpec::new(n_experts, k, scoring, renorm, scale);
                for bias in [None, Some(&bias)] {
                    let what = format!(
                        "{scoring:?} {n_tokens}x{n_experts} k{k} bias {}",
                        bias.is_some()
                    );
                    let fast = route_with_bias(&logits, bias, &s).unwrap();
                    let slow = route_reference_with_bias(&logits, bias, &s).unwrap();
                    assert_same_routing(&fast, &slow, scale, &what);
                }
            }
        }
    }

    #[test]
    fn group_limit_excludes_the_best_expert_of_a_weak_group() {
        use moe_core::GroupLimit;
        // Group 0 holds the single best expert but a weak second; group 1 has two good ones.
        let logits = Tensor::new(&[[4.0f32, -4.0, 3.0, 3.0]], &Device::Cpu).unwrap();
        let limit = |group_score| GroupLimit {
            n_group: 2,
            topk_group: 1,
            group_score,
        };
        let sum2 = RoutingSpec::new(
            4,
            1,
            ScoringFunction::SigmoidGroupLimited(limit(GroupScore::SumTop2)),
            false,
            1.0,
        );
        let max = RoutingSpec::new(
            4,
            1,
            ScoringFunction::SoftmaxGroupLimited(limit(GroupScore::Max)),
            false,
            1.0,
        );
        for (s, expected) in [(&sum2, 2u32), (&max, 0)] {
            for routing in [
                route(&logits, s).unwrap(),
                route_reference(&logits, s).unwrap(),
            ] {
                assert_eq!(routing.expert_ids.to_vec2::<u32>().unwrap(), [[expected]]);
            }
        }
    }

    #[test]
    fn correction_bias_changes_the_choice_not_the_weights() {
        let logits = Tensor::new(&[[1.0f32, 0.9, -2.0]], &Device::Cpu).unwrap();
        let bias = Tensor::new(&[0.0f32, 0.5, 0.0], &Device::Cpu).unwrap();
        let s = RoutingSpec::new(3, 1, ScoringFunction::Sigmoid, false, 1.0);
        let plain = route(&logits, &s).unwrap();
        assert_eq!(plain.expert_ids.to_vec2::<u32>().unwrap(), [[0]]);
        for routing in [
            route_with_bias(&logits, Some(&bias), &s).unwrap(),
            route_reference_with_bias(&logits, Some(&bias), &s).unwrap(),
        ] {
            assert_eq!(routing.expert_ids.to_vec2::<u32>().unwrap(), [[1]]);
            let w = routing.weights.to_vec2::<f32>().unwrap()[0][0];
            assert!((w - 1.0 / (1.0 + (-0.9f32).exp())).abs() < 1e-7);
        }
    }

    #[test]
    fn rejects_impossible_group_limits_and_bias_shapes() {
        use moe_core::GroupLimit;
        let logits = random_logits(2, 8, 3);
        let limited = |n_group, topk_group, k| {
            let limit = GroupLimit {
                n_group,
                topk_group,
                group_score: GroupScore::SumTop2,
            };
            RoutingSpec::new(8, k, ScoringFunction::SigmoidGroupLimited(limit), true, 1.0)
        };
        assert!(route(&logits, &limited(3, 1, 2)).is_err()); // unequal groups
        assert!(route(&logits, &limited(4, 1, 3)).is_err()); // 2 experts kept, 3 wanted
        assert!(route(&logits, &limited(8, 8, 2)).is_err()); // top-2 of 1-expert groups
        assert!(route(&logits, &limited(4, 2, 4)).is_ok());
        let s = RoutingSpec::new(8, 2, ScoringFunction::Sigmoid, false, 1.0);
        let short = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        assert!(route_with_bias(&logits, Some(&short), &s).is_err());
        let mixer = RoutingSpec::new(8, 2, ScoringFunction::TopKThenSoftmax, false, 1.0);
        let bias = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        assert!(route_with_bias(&logits, Some(&bias), &mixer).is_err());
    }
}

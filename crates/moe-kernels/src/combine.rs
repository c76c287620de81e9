//! The weighted combine: scatter each expert's output rows back to their tokens, scaled by
//! the routing weight, summed over the token's experts in increasing expert order.
//!
//! Contract: `expert_outputs[i]` holds the output rows of the i-th active expert of `groups`
//! (same row order as `groups.rows`); the result is `[n_tokens, hidden]` in their dtype.
//! Weights are applied in f32 and the product rounded to the output dtype.

use candle_core::{DType, Device, Tensor};
use moe_core::Result;

use crate::grouping::ExpertGroups;

/// Sums the weighted expert outputs into `[n_tokens, hidden]`.
pub fn combine(
    n_tokens: usize,
    hidden: usize,
    groups: &ExpertGroups,
    expert_outputs: &[Tensor],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let output = Tensor::zeros((n_tokens, hidden), dtype, device)?;
    if expert_outputs.is_empty() {
        return Ok(output);
    }
    // Active experts' slots are contiguous and in expert order, so the concatenated outputs
    // line up with the slots of the active experts.
    let mut rows = Vec::new();
    let mut weights = Vec::new();
    for expert in groups.active_experts() {
        let (r, w) = groups.rows(expert);
        rows.extend_from_slice(r);
        weights.extend_from_slice(w);
    }
    let n_slots = rows.len();
    // [n_slots, hidden]
    let stacked = Tensor::cat(expert_outputs, 0)?;
    let weights = Tensor::from_vec(weights, (n_slots, 1), device)?;
    let weighted = stacked
        .to_dtype(DType::F32)?
        .broadcast_mul(&weights)?
        .to_dtype(dtype)?;
    let rows = Tensor::from_vec(rows, n_slots, device)?;
    Ok(output.index_add(&rows, &weighted, 0)?)
}

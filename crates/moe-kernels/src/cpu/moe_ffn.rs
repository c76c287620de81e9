//! The grouped expert FFN of one MoE layer on the CPU, for any number of tokens.
//!
//! 1. Gather: token rows are copied (f32) into slot order, so each expert's rows are
//!    contiguous ([`ExpertGroups`] slots).
//! 2. Gate + up + activation: one task per (expert, block of intermediate columns) computes
//!    both projections for all of that expert's rows and applies the activation while the
//!    block is in cache. Each expert's weights are streamed once per call, whatever its
//!    number of rows (16 decoding sequences share the experts they have in common).
//! 3. Down, accumulated: one task per block of hidden columns walks the active experts in
//!    increasing id order and adds `routing weight × (h · W_downᵀ + b)` straight into the
//!    tokens' output rows ([`AccumulateSink`]): no combine pass, and each token's experts are
//!    summed in a fixed order (deterministic). With few rows in all (decode, up to
//!    [`DOWN_BY_EXPERT_MAX_SLOTS`]) the products come first, one task per expert over its
//!    whole matrix (one long stream of weights instead of a short one per column block), and
//!    the column tasks only add them in: the same arithmetic in the same order, bit for bit.
//!
//! Weights are any [`WeightElem`]; int8 experts (`--expert-dtype q8`) carry one f32 scale per
//! output row and every projection's dot products pass through [`ScaledSink`] before the bias,
//! the activation or the routing weight: `w × (s · (x · q) + b)`.
//!
//! Numerics: f32 throughout, no intermediate rounding (fast mode of [`super::numerics`]).

use std::ops::Range;

use super::gemm::{matmul_nt_cols_prepared, PreparedRows, Sink, StoreSink};
use super::pool;
use super::q8::ScaledSink;
use super::shared::SharedMut;
use super::weights::WeightElem;
use crate::expert_ffn::ExpertActivation;
use crate::grouping::ExpertGroups;

/// One expert's matrices (HF `[out, in]` row-major), their per-row scales when they are
/// quantized, and f32 biases.
#[derive(Debug, Clone, Copy)]
pub struct ExpertSlices<'a, W> {
    /// `[intermediate, hidden]`
    pub gate: &'a [W],
    /// `[intermediate, hidden]`
    pub up: &'a [W],
    /// `[hidden, intermediate]`
    pub down: &'a [W],
    /// `[intermediate]`
    pub gate_bias: Option<&'a [f32]>,
    /// `[intermediate]`
    pub up_bias: Option<&'a [f32]>,
    /// `[hidden]`
    pub down_bias: Option<&'a [f32]>,
    /// Per-output-row scales of `gate`, `up` and `down` (`[intermediate]`, `[intermediate]`,
    /// `[hidden]`) when the matrices are int8 ([`super::q8`]); `None` for float weights.
    pub scales: Option<[&'a [f32]; 3]>,
}

/// `sink ← x · W[cols]ᵀ`, each dot product multiplied by its row's scale first when `scales`
/// is given (int8 weights).
fn project<W: WeightElem, S: Sink>(
    x: &PreparedRows<'_>,
    w: &[W],
    cols: Range<usize>,
    scales: Option<&[f32]>,
    sink: &S,
) {
    match scales {
        Some(scales) => {
            let scaled = ScaledSink {
                inner: sink,
                scales,
            };
            matmul_nt_cols_prepared(x, w, cols, &scaled)
        }
        None => matmul_nt_cols_prepared(x, w, cols, sink),
    }
}

/// Adds `weight[row] × (value + bias[col])` to `out[token_rows[row] * ld + col]`.
struct AccumulateSink<'s, 'a> {
    out: &'s SharedMut<'a>,
    ld: usize,
    token_rows: &'s [u32],
    weights: &'s [f32],
    bias: Option<&'s [f32]>,
}

// SAFETY: within one expert the token rows are distinct (a token picks an expert once), so
// distinct (row, col) pairs map to distinct elements; experts of one task run in sequence.
unsafe impl Sink for AccumulateSink<'_, '_> {
    #[inline(always)]
    unsafe fn put(&self, row: usize, col: usize, value: f32) {
        let b = self.bias.map_or(0.0, |b| b[col]);
        let i = self.token_rows[row] as usize * self.ld + col;
        // SAFETY: the column belongs to the calling task only (trait contract).
        unsafe { *self.out.at(i) += self.weights[row] * (value + b) };
    }
}

/// Runs the routed experts of one layer and adds their weighted outputs into `out`
/// (`[n_tokens, hidden]` f32, usually zeroed by the caller).
///
/// `x` is `[n_tokens, hidden]` f32; `experts[i]` holds the weights of the i-th active expert
/// of `groups` (increasing id order, as [`ExpertGroups::active_experts`]).
pub fn grouped_expert_ffn<W: WeightElem>(
    x: &[f32],
    hidden: usize,
    intermediate: usize,
    groups: &ExpertGroups,
    experts: &[ExpertSlices<'_, W>],
    activation: ExpertActivation,
    out: &mut [f32],
) {
    let by_expert = groups.token_rows.len() <= DOWN_BY_EXPERT_MAX_SLOTS;
    grouped_ffn(
        x,
        hidden,
        intermediate,
        groups,
        experts,
        activation,
        out,
        by_expert,
    );
}

/// [`grouped_expert_ffn`] with the down projection's split chosen by the caller: by experts
/// (`by_expert`) or by output columns.
#[allow(clippy::too_many_arguments)]
fn grouped_ffn<W: WeightElem>(
    x: &[f32],
    hidden: usize,
    intermediate: usize,
    groups: &ExpertGroups,
    experts: &[ExpertSlices<'_, W>],
    activation: ExpertActivation,
    out: &mut [f32],
    by_expert: bool,
) {
    let (h, inter) = (hidden, intermediate);
    let active: Vec<usize> = groups.active_experts().collect();
    assert_eq!(
        active.len(),
        experts.len(),
        "one weight set per active expert"
    );
    let n_slots = groups.token_rows.len();
    // 1. Gather the rows in slot order.
    let mut xg = vec![0f32; n_slots * h];
    for (slot, &row) in groups.token_rows.iter().enumerate() {
        let row = row as usize;
        xg[slot * h..(slot + 1) * h].copy_from_slice(&x[row * h..(row + 1) * h]);
    }
    // Each expert's rows, prepared once for its gate, up and every column task.
    let slots_of = |e: usize| groups.offsets[e]..groups.offsets[e + 1];
    let expert_rows: Vec<PreparedRows<'_>> = active
        .iter()
        .map(|&e| {
            let slots = slots_of(e);
            PreparedRows::new(&xg[slots.start * h..slots.end * h], slots.len(), h)
        })
        .collect();
    // 2. Gate and up with the activation fused.
    let mut gate = vec![0f32; n_slots * inter];
    let mut up = vec![0f32; n_slots * inter];
    {
        let total = active.len() * inter;
        // Multiples of 16 columns (the AMX tiles' width) where the matrix allows.
        let chunk = pool::chunk_size(total, 16, 16, 4).min(inter.div_ceil(4) * 4);
        let per_expert = inter.div_ceil(chunk);
        let (gate_s, up_s) = (SharedMut::new(&mut gate), SharedMut::new(&mut up));
        pool::for_each_task(active.len() * per_expert, |t| {
            let (i, c) = (t / per_expert, t % per_expert);
            let e = active[i];
            let w = &experts[i];
            let slots = slots_of(e);
            let xe = &expert_rows[i];
            let cols = c * chunk..((c + 1) * chunk).min(inter);
            let scales = w.scales.map(|[g, u, _]| (g, u));
            let g_sink = StoreSink::new(&gate_s, inter, slots.start, w.gate_bias);
            project(xe, w.gate, cols.clone(), scales.map(|s| s.0), &g_sink);
            let u_sink = StoreSink::new(&up_s, inter, slots.start, w.up_bias);
            project(xe, w.up, cols.clone(), scales.map(|s| s.1), &u_sink);
            for slot in slots {
                for col in cols.clone() {
                    let idx = slot * inter + col;
                    // SAFETY: this task alone owns columns `cols` of this expert's slots.
                    unsafe {
                        let g = *gate_s.at(idx);
                        let u = *up_s.at(idx);
                        *gate_s.at(idx) = activate(activation, g, u);
                    }
                }
            }
        });
    }
    let hidden_act = gate;
    // 3. Down, accumulated into the tokens' rows.
    assert!(
        out.len()
            >= groups
                .token_rows
                .iter()
                .map(|&r| r as usize + 1)
                .max()
                .unwrap_or(0)
                * h
    );
    // With few rows per expert (decode) each expert's whole down matrix is one task, a long
    // stream of weights, into `y`; the column tasks below then only add `y` into the tokens'
    // rows. With many rows (prefill) the column tasks compute it themselves. Either way each
    // output element adds its token's experts in increasing id order with the same arithmetic.
    let hidden_rows: Vec<PreparedRows<'_>> = active
        .iter()
        .map(|&e| {
            let slots = slots_of(e);
            let he = &hidden_act[slots.start * inter..slots.end * inter];
            PreparedRows::new(he, slots.len(), inter)
        })
        .collect();
    let y = by_expert.then(|| {
        let mut y = vec![0f32; n_slots * h];
        let y_s = SharedMut::new(&mut y);
        pool::for_each_task(active.len(), |i| {
            let sink = StoreSink::new(&y_s, h, slots_of(active[i]).start, None);
            let scales = experts[i].scales.map(|[_, _, d]| d);
            project(&hidden_rows[i], experts[i].down, 0..h, scales, &sink);
        });
        y
    });
    let chunk = pool::chunk_size(h, 16, 16, 4);
    let out_s = SharedMut::new(out);
    pool::for_each_task(h.div_ceil(chunk), |t| {
        let cols = t * chunk..((t + 1) * chunk).min(h);
        for (i, &e) in active.iter().enumerate() {
            let slots = slots_of(e);
            let sink = AccumulateSink {
                out: &out_s,
                ld: h,
                token_rows: &groups.token_rows[slots.clone()],
                weights: &groups.weights[slots.clone()],
                bias: experts[i].down_bias,
            };
            match &y {
                Some(y) => {
                    for (row, slot) in slots.enumerate() {
                        for col in cols.clone() {
                            // SAFETY: this task alone owns columns `cols` of the output.
                            unsafe { sink.put(row, col, y[slot * h + col]) };
                        }
                    }
                }
                None => {
                    let scales = experts[i].scales.map(|[_, _, d]| d);
                    project(
                        &hidden_rows[i],
                        experts[i].down,
                        cols.clone(),
                        scales,
                        &sink,
                    )
                }
            }
        }
    });
}

/// Slots (rows of `x` in slot order) from which the down projection splits by columns
/// instead of by experts: below it the per-expert outputs (`slots × hidden` f32) are small.
const DOWN_BY_EXPERT_MAX_SLOTS: usize = 256;

/// The gated activation of one element, in f32.
#[inline(always)]
fn activate(activation: ExpertActivation, gate: f32, up: f32) -> f32 {
    match activation {
        ExpertActivation::SiluGlu => gate / (1.0 + (-gate).exp()) * up,
        ExpertActivation::ClampedSwiGlu { alpha, limit } => {
            let g = gate.min(limit);
            let u = up.clamp(-limit, limit);
            (u + 1.0) * g / (1.0 + (-alpha * g).exp())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::lcg;
    use super::*;
    use half::bf16;

    /// The two splits of the down projection give the same bits, with bf16 and with scaled
    /// int8 weights, biases, and experts of 1 to 20 rows (register tiles and AMX tiles).
    fn splits_agree<W: WeightElem>(conv: fn(f32) -> W, scaled: bool) {
        let (h, inter, n_experts, top_k, n_tokens) = (96, 64, 6, 3, 20);
        let mut seed = 7u64;
        let mut mat = |rows: usize, cols: usize| -> Vec<W> {
            (0..rows * cols).map(|_| conv(lcg(&mut seed))).collect()
        };
        let weights: Vec<[Vec<W>; 3]> = (0..n_experts)
            .map(|_| [mat(inter, h), mat(inter, h), mat(h, inter)])
            .collect();
        let mut seed = 11u64;
        let mut vals = |n: usize| -> Vec<f32> { (0..n).map(|_| lcg(&mut seed)).collect() };
        let biases: Vec<[Vec<f32>; 3]> = (0..n_experts)
            .map(|_| [vals(inter), vals(inter), vals(h)])
            .collect();
        let scales: Vec<[Vec<f32>; 3]> = (0..n_experts)
            .map(|_| [vals(inter), vals(inter), vals(h)])
            .collect();
        let x = vals(n_tokens * h);
        // Expert 0 takes every token (20 rows), the others a few each.
        let ids: Vec<u32> = (0..n_tokens)
            .flat_map(|t| [0, 1 + (t % 5) as u32, 1 + ((t + 2) % 5) as u32])
            .collect();
        let route_w = vals(n_tokens * top_k);
        let groups = ExpertGroups::from_slices(&ids, &route_w, top_k, n_experts).unwrap();
        let slices: Vec<ExpertSlices<'_, W>> = groups
            .active_experts()
            .map(|e| ExpertSlices {
                gate: &weights[e][0],
                up: &weights[e][1],
                down: &weights[e][2],
                gate_bias: Some(&biases[e][0]),
                up_bias: Some(&biases[e][1]),
                down_bias: Some(&biases[e][2]),
                scales: scaled.then(|| [&scales[e][0][..], &scales[e][1][..], &scales[e][2][..]]),
            })
            .collect();
        let run = |by_expert: bool| {
            let mut out = vec![0f32; n_tokens * h];
            let act = ExpertActivation::SiluGlu;
            grouped_ffn(&x, h, inter, &groups, &slices, act, &mut out, by_expert);
            out
        };
        let (a, b) = (run(true), run(false));
        assert!(a.iter().any(|v| *v != 0.0));
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_eq!(p.to_bits(), q.to_bits(), "element {i}: {p} vs {q}");
        }
    }

    #[test]
    fn down_split_by_expert_is_bit_identical_to_by_columns() {
        splits_agree::<bf16>(bf16::from_f32, false);
        splits_agree::<f32>(|v| v, false);
        splits_agree::<i8>(|v| (v * 250.0) as i8, true);
    }
}

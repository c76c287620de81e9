//! Causal attention of one sequence on the CPU for the fast numerics: `softmax(q·kᵀ·scale +
//! mask)·v` with the scores kept in f32 from the product to the softmax (no rounding to the
//! compute dtype in between, no mask tensor), the two products on the fast GEMM kernels of
//! [`super::gemm`] (the AMX tiles for a bf16 cache where the CPU has them), and the masked
//! softmax parallel over rows.
//!
//! The torch-exact path (`Attention::attend` in moe-models) rounds the scores as transformers'
//! eager attention does and stays the reference for the bit-exact tests; this one differs from
//! it by those roundings only. Sink logits are not handled here (the caller keeps the general
//! path for them).

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, WithDType};
use half::bf16;
use moe_core::{Error, Result};

use super::gemm::{matmul_nt_into, StoreSink};
use super::pool;
use super::shared::SharedMut;
use super::tensors::{from_f32_vec, slice_of, to_f32_vec};
use super::weights::WeightElem;
use crate::softmax::softmax_row;

/// Which keys each query may see: query `i` of the call sits at position `n_past + i`, key `j`
/// of `k`/`v` at `first_key + j`; a key is visible when it is not in the future and, with a
/// sliding window, fewer than `window` positions back.
#[derive(Debug, Clone, Copy)]
pub struct CausalMask {
    /// Tokens of the sequence before this call's first query.
    pub n_past: usize,
    /// Position of the first key in `k` / `v`.
    pub first_key: usize,
    /// Sliding-window length, if the layer has one.
    pub window: Option<usize>,
}

impl CausalMask {
    /// The visible keys of query `i` as a range of key indices (never empty for a query whose
    /// own key is in `k`).
    fn visible(&self, i: usize, n_keys: usize) -> std::ops::Range<usize> {
        let q_pos = self.n_past + i;
        let hi = (q_pos + 1).saturating_sub(self.first_key).min(n_keys);
        let lo = self.window.map_or(0, |w| {
            (q_pos + 1).saturating_sub(w).saturating_sub(self.first_key)
        });
        lo.min(hi)..hi
    }
}

/// Whether [`fast_causal_attention`] takes these operands: CPU tensors, `q` bf16 or f32 and
/// `k`, `v` of the same dtype.
pub fn fast_attention_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    matches!(q.device(), Device::Cpu)
        && matches!(q.dtype(), DType::BF16 | DType::F32)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
}

/// `softmax(q·kᵀ·scale + mask)·v` for `q` `[n_kv, group × n_new, d]` (the query heads that share
/// a kv head stacked as rows, head-major: row `g × n_new + i` is query `i` of head `g`) and
/// `k`, `v` `[n_kv, n_keys, d]`; returns `[n_kv, group × n_new, d]` in `q`'s dtype.
pub fn fast_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_new: usize,
    scale: f32,
    mask: CausalMask,
) -> Result<Tensor> {
    blocked_attention(q, k, v, n_new, scale, mask, SCORE_BLOCK_BYTES)
}

/// [`fast_causal_attention`] with the query rows in blocks whose scores take about
/// `block_bytes` (at least 64 rows a block).
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_new: usize,
    scale: f32,
    mask: CausalMask,
    block_bytes: usize,
) -> Result<Tensor> {
    match k.dtype() {
        DType::BF16 => attention_typed::<bf16>(q, k, v, n_new, scale, mask, block_bytes),
        DType::F32 => attention_typed::<f32>(q, k, v, n_new, scale, mask, block_bytes),
        dt => Err(Error::InvalidRequest(format!(
            "fast attention: a kv cache in {dt:?}"
        ))),
    }
}

/// Bytes of f32 scores one block of query rows may take (rows are processed in blocks).
const SCORE_BLOCK_BYTES: usize = 8 << 20;

/// Score elements below which the softmax rows are not split over the pool.
const SERIAL_SOFTMAX_MAX: usize = 1 << 14;

thread_local! {
    /// Per-thread row buffer of the softmax (no allocation per row).
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn attention_typed<W: WeightElem + WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_new: usize,
    scale: f32,
    mask: CausalMask,
    block_bytes: usize,
) -> Result<Tensor> {
    let (n_kv, rows, d) = q.dims3()?;
    let n_keys = k.dim(1)?;
    if k.dims3()? != (n_kv, n_keys, d)
        || v.dims3()? != (n_kv, n_keys, d)
        || n_new == 0
        || rows % n_new != 0
    {
        return Err(Error::InvalidRequest(format!(
            "fast attention: q {:?}, k {:?}, v {:?} with {n_new} new tokens do not match",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    // Keys padded to a multiple of 32 (zero probabilities, zero values): the AMX tiles take
    // `k` in steps of 32, and the P·V product's `k` is the number of keys.
    let kp = n_keys.div_ceil(32) * 32;
    let qf = to_f32_vec(q)?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    // Rows in blocks, so the scores of a long prompt never take more than about
    // `block_bytes` (and stay in cache between the three steps below).
    let block = (block_bytes / (kp * 4)).clamp(64, rows.max(64));
    let mut scores = vec![0f32; block.min(rows) * kp];
    let mut out = vec![0f32; n_kv * rows * d];
    {
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let not_cpu = || Error::InvalidRequest("fast attention: kv cache not on the CPU".into());
        let kw: &[W] = slice_of(&k_storage, k_layout).ok_or_else(not_cpu)?;
        let vw: &[W] = slice_of(&v_storage, v_layout).ok_or_else(not_cpu)?;
        // vᵀ per kv head, `[d, kp]`: the P·V product reads it as `[out, in]` weights.
        let zero = W::from_f64(0.0);
        let mut vt = vec![zero; n_kv * d * kp];
        for h in 0..n_kv {
            for j in 0..n_keys {
                let src = &vw[(h * n_keys + j) * d..][..d];
                for (c, &e) in src.iter().enumerate() {
                    vt[(h * d + c) * kp + j] = e;
                }
            }
        }
        let out_s = SharedMut::new(&mut out);
        for h in 0..n_kv {
            let kh = &kw[h * n_keys * d..(h + 1) * n_keys * d];
            let vh = &vt[h * d * kp..(h + 1) * d * kp];
            let mut r0 = 0;
            while r0 < rows {
                let n_rows = block.min(rows - r0);
                let blk = &mut scores[..n_rows * kp];
                let first = (h * rows + r0) * d;
                // 1. Scores, row stride kp.
                let scores_s = SharedMut::new(blk);
                let sink = StoreSink::new(&scores_s, kp, 0, None);
                matmul_nt_into(&qf[first..first + n_rows * d], n_rows, d, kh, n_keys, &sink);
                // 2. Scale, mask and softmax each row in place (masked keys and padding
                // become 0). A decode step's few short rows run on the calling thread.
                let chunk = if n_rows * kp < SERIAL_SOFTMAX_MAX {
                    n_rows
                } else {
                    pool::chunk_size(n_rows, 1, 4, 4)
                };
                pool::for_each_task(n_rows.div_ceil(chunk), |t| {
                    ROW.with_borrow_mut(|tmp| {
                        for r in t * chunk..((t + 1) * chunk).min(n_rows) {
                            let seen = mask.visible((r0 + r) % n_new, n_keys);
                            // SAFETY: each task owns whole rows r of the block.
                            let row =
                                unsafe { std::slice::from_raw_parts_mut(scores_s.at(r * kp), kp) };
                            let visible = &mut row[seen.clone()];
                            visible.iter_mut().for_each(|s| *s *= scale);
                            tmp.resize(visible.len(), 0.0);
                            softmax_row(visible, tmp);
                            visible.copy_from_slice(tmp);
                            row[..seen.start].fill(0.0);
                            row[seen.end..].fill(0.0);
                        }
                    });
                });
                // 3. P · v.
                let sink = StoreSink::new(&out_s, d, h * rows + r0, None);
                matmul_nt_into(&scores[..n_rows * kp], n_rows, kp, vh, d, &sink);
                r0 += n_rows;
            }
        }
    }
    from_f32_vec(out, &[n_kv, rows, d], q.dtype(), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel against a plain f64 softmax attention, with and without a window and
    /// with keys before the first query (a cache), in f32 and bf16.
    #[test]
    fn matches_a_reference_attention() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (n_kv, group, n_new, n_past, d, window) in [
                (2, 2, 5, 0, 32, None),
                (1, 4, 1, 9, 64, None),
                (2, 1, 7, 3, 16, Some(4)),
                (1, 2, 40, 0, 32, None),
                // 150 rows in blocks of 64 (block_bytes below), a window across blocks.
                (1, 3, 50, 20, 32, Some(30)),
            ] {
                let n_keys = n_past + n_new;
                let rows = group * n_new;
                let gen = |n: usize, seed: f32| -> Vec<f32> {
                    (0..n)
                        .map(|i| (i as f32 * 0.37 + seed).sin() * 2.0)
                        .collect()
                };
                let qv = gen(n_kv * rows * d, 0.1);
                let kv = gen(n_kv * n_keys * d, 1.3);
                let vv = gen(n_kv * n_keys * d, 2.9);
                let dev = Device::Cpu;
                let t = |v: &Vec<f32>, dims: (usize, usize, usize)| {
                    Tensor::from_vec(v.clone(), dims, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (q, k, v) = (
                    t(&qv, (n_kv, rows, d)),
                    t(&kv, (n_kv, n_keys, d)),
                    t(&vv, (n_kv, n_keys, d)),
                );
                // The reference sees the same (rounded) inputs.
                let back = |x: &Tensor| -> Vec<f32> {
                    x.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                let (qr, kr, vr) = (back(&q), back(&k), back(&v));
                let scale = 1.0 / (d as f32).sqrt();
                let mask = CausalMask {
                    n_past,
                    first_key: 0,
                    window,
                };
                // Blocks of 64 rows: 64 × kp × 4 bytes.
                let block_bytes = 64 * n_keys.div_ceil(32) * 32 * 4;
                let got = blocked_attention(&q, &k, &v, n_new, scale, mask, block_bytes);
                let got = back(&got.unwrap());
                for h in 0..n_kv {
                    for r in 0..rows {
                        let i = r % n_new;
                        let q_pos = n_past + i;
                        let vis: Vec<usize> = (0..n_keys)
                            .filter(|&j| j <= q_pos && window.is_none_or(|w| j + w > q_pos))
                            .collect();
                        let s: Vec<f64> = vis
                            .iter()
                            .map(|&j| {
                                (0..d)
                                    .map(|c| {
                                        qr[(h * rows + r) * d + c] as f64
                                            * kr[(h * n_keys + j) * d + c] as f64
                                    })
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for c in 0..d {
                            let want: f64 = vis
                                .iter()
                                .zip(&e)
                                .map(|(&j, p)| p / z * vr[(h * n_keys + j) * d + c] as f64)
                                .sum();
                            let g = got[(h * rows + r) * d + c] as f64;
                            assert!(
                                (g - want).abs() <= tol * (1.0 + want.abs()),
                                "{dtype:?} {n_kv}x{group}x{n_new} past {n_past} window {window:?} \
                                 [{h},{r},{c}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

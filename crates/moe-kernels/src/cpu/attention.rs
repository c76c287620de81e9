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
    let (n_kv, rows, d) = q.dims3()?;
    let n_keys = k.dim(1)?;
    if k.dims3()? != (n_kv, n_keys, d)
        || v.dims3()? != (n_kv, n_keys, d)
        || n_new == 0
        || !rows.is_multiple_of(n_new)
    {
        return Err(Error::InvalidRequest(format!(
            "fast attention: q {:?}, k {:?}, v {:?} with {n_new} new tokens do not match",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let shape = AttentionShape {
        n_kv,
        rows,
        d,
        n_new,
    };
    // Contiguous keys and values are a cache whose capacity is its keys.
    let caches = (&k.contiguous()?, &v.contiguous()?);
    let out = attend_cache(
        &to_f32_vec(q)?,
        shape,
        caches,
        n_keys,
        scale,
        mask,
        block_bytes,
    )?;
    from_f32_vec(out, &[n_kv, rows, d], q.dtype(), q.device())
}

/// Bytes of f32 scores one block of query rows may take (rows are processed in blocks).
const SCORE_BLOCK_BYTES: usize = 8 << 20;

/// Score elements below which the softmax rows are not split over the pool.
const SERIAL_SOFTMAX_MAX: usize = 1 << 14;

thread_local! {
    /// Per-thread row buffer of the softmax (no allocation per row).
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`fast_causal_attention`] over a kv cache kept with room to grow: `k_cache`, `v_cache`
/// (`[n_kv, capacity, d]`, contiguous, bf16 or f32) hold the sequence's keys and values in
/// their first `n_keys` positions, read in place. `q` is f32 `[n_kv, rows, d]` as
/// [`fast_causal_attention`] takes it (`rows` = group × `n_new`); returns f32 `[n_kv, rows, d]`.
#[allow(clippy::too_many_arguments)]
pub fn fast_attention_over_cache(
    q: &[f32],
    rows: usize,
    k_cache: &Tensor,
    v_cache: &Tensor,
    n_keys: usize,
    n_new: usize,
    scale: f32,
    mask: CausalMask,
) -> Result<Vec<f32>> {
    let (n_kv, capacity, d) = k_cache.dims3()?;
    if v_cache.dims3()? != (n_kv, capacity, d)
        || n_keys > capacity
        || n_new == 0
        || !rows.is_multiple_of(n_new)
        || q.len() != n_kv * rows * d
    {
        return Err(Error::InvalidRequest(format!(
            "fast attention: {} query values ({rows} rows, {n_new} new) against caches {:?} / {:?} \
             holding {n_keys} keys do not match",
            q.len(),
            k_cache.dims(),
            v_cache.dims()
        )));
    }
    let shape = AttentionShape {
        n_kv,
        rows,
        d,
        n_new,
    };
    let caches = (k_cache, v_cache);
    attend_cache(q, shape, caches, n_keys, scale, mask, SCORE_BLOCK_BYTES)
}

/// The attention of f32 `q` over the first `n_keys` positions of contiguous
/// `[n_kv, capacity, d]` caches (shapes checked by the callers), read in place in their dtype.
fn attend_cache(
    q: &[f32],
    shape: AttentionShape,
    (k_cache, v_cache): (&Tensor, &Tensor),
    n_keys: usize,
    scale: f32,
    mask: CausalMask,
    block_bytes: usize,
) -> Result<Vec<f32>> {
    fn typed<W: WeightElem + WithDType>(
        q: &[f32],
        shape: AttentionShape,
        (k_cache, v_cache): (&Tensor, &Tensor),
        n_keys: usize,
        (scale, mask, block_bytes): (f32, CausalMask, usize),
    ) -> Result<Vec<f32>> {
        let (k_storage, k_layout) = k_cache.storage_and_layout();
        let (v_storage, v_layout) = v_cache.storage_and_layout();
        let not_cpu =
            || Error::InvalidRequest("fast attention: kv cache not contiguous on the CPU".into());
        let head_stride = k_cache.dim(1)? * shape.d;
        let heads = |data| KvHeads {
            data,
            head_stride,
            n_keys,
        };
        let keys = heads(slice_of::<W>(&k_storage, k_layout).ok_or_else(not_cpu)?);
        let values = heads(slice_of::<W>(&v_storage, v_layout).ok_or_else(not_cpu)?);
        Ok(attention_core(
            q,
            shape,
            keys,
            values,
            scale,
            mask,
            block_bytes,
        ))
    }
    let caches = (k_cache, v_cache);
    let params = (scale, mask, block_bytes);
    match (k_cache.dtype(), v_cache.dtype()) {
        (DType::BF16, DType::BF16) => typed::<bf16>(q, shape, caches, n_keys, params),
        (DType::F32, DType::F32) => typed::<f32>(q, shape, caches, n_keys, params),
        (k, v) => Err(Error::InvalidRequest(format!(
            "fast attention: a kv cache in {k:?} / {v:?}"
        ))),
    }
}

/// The sizes of one attention call: `n_kv` kv heads, each with `rows` query rows (the query
/// heads sharing it, `n_new` tokens each) of width `d`.
#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    n_kv: usize,
    rows: usize,
    d: usize,
    n_new: usize,
}

/// Keys or values of one sequence: head `h`'s `n_keys` rows of `d` start at `h * head_stride`
/// of `data` (a cache with room to grow has `head_stride` > `n_keys * d`).
#[derive(Clone, Copy)]
struct KvHeads<'a, W> {
    data: &'a [W],
    head_stride: usize,
    n_keys: usize,
}

impl<W> KvHeads<'_, W> {
    /// The `n_keys × d` rows of head `h`.
    fn head(&self, h: usize, d: usize) -> &[W] {
        &self.data[h * self.head_stride..][..self.n_keys * d]
    }
}

/// Query blocks of at most this many rows (a decode step) take the scores and the P·V product
/// directly, one key or value row at a time for all the rows, on the calling thread; larger
/// blocks use the GEMM kernels (and transpose `v` once per head for them).
const DIRECT_MAX_ROWS: usize = 32;

/// The attention itself, on host slices: `q` f32 `[n_kv, rows, d]`; returns f32
/// `[n_kv, rows, d]`.
fn attention_core<W: WeightElem + WithDType>(
    qf: &[f32],
    shape: AttentionShape,
    keys: KvHeads<'_, W>,
    values: KvHeads<'_, W>,
    scale: f32,
    mask: CausalMask,
    block_bytes: usize,
) -> Vec<f32> {
    let AttentionShape {
        n_kv,
        rows,
        d,
        n_new,
    } = shape;
    let n_keys = keys.n_keys;
    // Keys padded to a multiple of 32 (zero probabilities, zero values): the AMX tiles take
    // `k` in steps of 32, and the P·V product's `k` is the number of keys.
    let kp = n_keys.div_ceil(32) * 32;
    // Rows in blocks, so the scores of a long prompt never take more than about
    // `block_bytes` (and stay in cache between the three steps below).
    let block = (block_bytes / (kp * 4)).clamp(64, rows.max(64));
    let mut scores = vec![0f32; block.min(rows) * kp];
    let mut out = vec![0f32; n_kv * rows * d];
    let zero = W::from_f64(0.0);
    let mut vt = Vec::new();
    let out_s = SharedMut::new(&mut out);
    for h in 0..n_kv {
        let kh = keys.head(h, d);
        let vh = values.head(h, d);
        let mut transposed = false;
        let mut r0 = 0;
        while r0 < rows {
            let n_rows = block.min(rows - r0);
            let blk = &mut scores[..n_rows * kp];
            let first = (h * rows + r0) * d;
            let direct = n_rows <= DIRECT_MAX_ROWS;
            // 1. Scores, row stride kp.
            if direct {
                query_key_scores(&qf[first..first + n_rows * d], kh, n_keys, d, kp, blk);
            }
            let scores_s = SharedMut::new(blk);
            if !direct {
                let sink = StoreSink::new(&scores_s, kp, 0, None);
                matmul_nt_into(&qf[first..first + n_rows * d], n_rows, d, kh, n_keys, &sink);
            }
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
            if direct {
                // SAFETY: this block's output rows, written by this thread only.
                let out_rows =
                    unsafe { std::slice::from_raw_parts_mut(out_s.at(first), n_rows * d) };
                probabilities_times_values(&scores[..n_rows * kp], kp, vh, n_keys, d, out_rows);
            } else {
                if !transposed {
                    // vᵀ of this head, `[d, kp]`: the product reads it as `[out, in]` weights.
                    vt.clear();
                    vt.resize(d * kp, zero);
                    for j in 0..n_keys {
                        for (c, &e) in vh[j * d..][..d].iter().enumerate() {
                            vt[c * kp + j] = e;
                        }
                    }
                    transposed = true;
                }
                let sink = StoreSink::new(&out_s, d, h * rows + r0, None);
                matmul_nt_into(&scores[..n_rows * kp], n_rows, kp, &vt, d, &sink);
            }
            r0 += n_rows;
        }
    }
    out
}

/// `scores[r, j] = q[r] · k[j]` for the `n_rows = q.len() / d` rows of `q` and the `n_keys`
/// rows of `k` (`[n_keys, d]`), row stride `kp` in `scores`.
fn query_key_scores<W: WeightElem>(
    q: &[f32],
    k: &[W],
    n_keys: usize,
    d: usize,
    kp: usize,
    scores: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && super::gemm::has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present (checked above) and `d` is a multiple of 8.
        return unsafe { query_key_scores_avx2(q, k, n_keys, d, kp, scores) };
    }
    for (r, qr) in q.chunks(d).enumerate() {
        for j in 0..n_keys {
            let kj = &k[j * d..][..d];
            scores[r * kp + j] = qr.iter().zip(kj).map(|(&a, &b)| a * b.to_f32()).sum();
        }
    }
}

/// [`query_key_scores`] with 8-wide FMAs.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `d` must be a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn query_key_scores_avx2<W: WeightElem>(
    q: &[f32],
    k: &[W],
    n_keys: usize,
    d: usize,
    kp: usize,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n_rows = q.len() / d;
    assert!(k.len() >= n_keys * d && scores.len() >= (n_rows.max(1) - 1) * kp + n_keys);
    let mut widened = [0f32; 512];
    for j in 0..n_keys {
        // The key row widened once (in chunks of 512) for all the query rows.
        for c0 in (0..d).step_by(512) {
            let width = 512.min(d - c0);
            for c in (0..width).step_by(8) {
                // SAFETY: `c0 + c + 8 <= d` and `j < n_keys`, within `k`.
                _mm256_storeu_ps(
                    widened.as_mut_ptr().add(c),
                    W::load8(k.as_ptr().add(j * d + c0 + c)),
                );
            }
            for r in 0..n_rows {
                let mut acc = _mm256_setzero_ps();
                for c in (0..width).step_by(8) {
                    // SAFETY: `c + 8 <= width`, within `widened` and query row `r`.
                    let qv = _mm256_loadu_ps(q.as_ptr().add(r * d + c0 + c));
                    acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(widened.as_ptr().add(c)), acc);
                }
                let lanes: [f32; 8] = std::mem::transmute(acc);
                let dot: f32 = lanes.iter().sum();
                let at = r * kp + j;
                if c0 == 0 {
                    scores[at] = dot;
                } else {
                    scores[at] += dot;
                }
            }
        }
    }
}

/// `out[r] = Σ_j p[r, j] · v[j]` for the `n_rows = out.len() / d` probability rows of `p`
/// (row stride `kp`) and the `n_keys` rows of `v` (`[n_keys, d]`): each value row is read once
/// for all the query rows.
fn probabilities_times_values<W: WeightElem>(
    p: &[f32],
    kp: usize,
    v: &[W],
    n_keys: usize,
    d: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && super::gemm::has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present (checked above) and `d` is a multiple of 8.
        return unsafe { probabilities_times_values_avx2(p, kp, v, n_keys, d, out) };
    }
    let n_rows = out.len() / d;
    for j in 0..n_keys {
        let vj = &v[j * d..][..d];
        for r in 0..n_rows {
            let pr = p[r * kp + j];
            if pr != 0.0 {
                for (o, &e) in out[r * d..][..d].iter_mut().zip(vj) {
                    *o += pr * e.to_f32();
                }
            }
        }
    }
}

/// [`probabilities_times_values`] with 8-wide FMAs.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `d` must be a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn probabilities_times_values_avx2<W: WeightElem>(
    p: &[f32],
    kp: usize,
    v: &[W],
    n_keys: usize,
    d: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n_rows = out.len() / d;
    assert!(v.len() >= n_keys * d && p.len() >= (n_rows.max(1) - 1) * kp + n_keys);
    for c in (0..d).step_by(8) {
        for j in 0..n_keys {
            // SAFETY (all loads and stores): `c + 8 <= d`, `j < n_keys`, `r < n_rows`, within
            // the lengths asserted above.
            let vj = W::load8(v.as_ptr().add(j * d + c));
            for r in 0..n_rows {
                let pr = *p.get_unchecked(r * kp + j);
                let o = out.as_mut_ptr().add(r * d + c);
                _mm256_storeu_ps(
                    o,
                    _mm256_fmadd_ps(_mm256_set1_ps(pr), vj, _mm256_loadu_ps(o)),
                );
            }
        }
    }
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

    /// A cache with room to grow (capacity past the keys, filled with values that must not be
    /// read) gives what the contiguous keys give, bf16 and f32.
    #[test]
    fn a_cache_with_spare_capacity_reads_only_its_keys() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let (n_kv, group, n_new, n_keys, capacity, d) = (2, 4, 1, 21, 64, 32);
            let rows = group * n_new;
            let fill = |n: usize, seed: f32| -> Vec<f32> {
                (0..n).map(|i| (i as f32 * 0.53 + seed).sin()).collect()
            };
            let cache = |seed: f32| {
                let mut v = fill(n_kv * capacity * d, seed);
                for h in 0..n_kv {
                    v[(h * capacity + n_keys) * d..(h + 1) * capacity * d].fill(1e4);
                }
                Tensor::from_vec(v, (n_kv, capacity, d), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (k_cache, v_cache) = (cache(0.4), cache(2.2));
            let q = Tensor::from_vec(fill(n_kv * rows * d, 1.7), (n_kv, rows, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let mask = CausalMask {
                n_past: n_keys - n_new,
                first_key: 0,
                window: None,
            };
            let keys = |c: &Tensor| c.narrow(1, 0, n_keys).unwrap().contiguous().unwrap();
            let want =
                fast_causal_attention(&q, &keys(&k_cache), &keys(&v_cache), n_new, 0.2, mask)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
            let qf = to_f32_vec(&q).unwrap();
            let got =
                fast_attention_over_cache(&qf, rows, &k_cache, &v_cache, n_keys, n_new, 0.2, mask)
                    .unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // `want` is rounded to the dtype, `got` is not.
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "{dtype:?} [{i}]: {g} vs {w}"
                );
            }
        }
    }
}

//! `x · Wᵀ` for int8 weights (`--expert-dtype q8`, `--dense-dtype q8`) on CPUs with
//! AVX512-VNNI, with few rows (decode; prefill's many rows go to the widened panels of
//! [`super::gemm_packed`], which measured 12–15 % faster at 512 tokens): `x` is quantized to int16 once per set of rows (one
//! scale per row) and `vpdpwssd` multiplies 32 int16 pairs into 16 int32 lanes per
//! instruction, twice an FMA's multiply-adds, after one sign extension of 32 weights
//! (`vpmovsxbw`) that every row of the tile shares. The widening kernel spends two
//! conversions and two FMAs on the same 32 weights per row, which left the int8 decode
//! compute-bound at half the bandwidth roofline on the Xeon measured here.
//!
//! Numerics: row `i` of `x` becomes `round(x / s_i)` with `s_i = max|x_i| / 32767`, so each
//! element carries an error of at most `s_i / 2` (a relative 1.5e-5 of the row's largest);
//! products and sums are exact in int32, and the sum times `s_i` is the dot product (the
//! weights' own per-row scale is applied by the caller's sink, as for the other kernels). An
//! int32 lane takes at most [`K_BLOCK`] / 32 sums of two products of at most 32767 · 128
//! (2.1e8 at most: no overflow); longer rows are summed in f32 block by block.
//!
//! The work is cut as in [`super::gemm_avx512`]: the same [`tiles`] loop (weight rows read
//! one after the other, up to 8 rows of `x` per loaded step). `MOE_INFER_NO_VNNI=1` turns it
//! off (the widening kernels then run).

use std::ops::Range;
use std::sync::OnceLock;

use super::gemm::Sink;
use super::gemm_avx512::{prefetch_ahead, tiles, RowTile, STEP};

/// Whether the VNNI kernel runs here: AVX-512 is in use, the CPU has AVX512-VNNI and the
/// user did not set `MOE_INFER_NO_VNNI` (checked once; said once when turned off).
pub fn use_vnni() -> bool {
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = is_x86_feature_detected!("avx512vnni");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        if !has || !super::gemm_avx512::use_avx512() {
            return false;
        }
        if std::env::var_os("MOE_INFER_NO_VNNI").is_some_and(|v| v != "0") {
            eprintln!("moe-kernels: MOE_INFER_NO_VNNI is set; int8 projections widen to f32");
            return false;
        }
        true
    })
}

/// Elements of `k` an int32 lane sums before the block is added into f32 (see the module
/// notes on overflow).
const K_BLOCK: usize = 8192;

/// Rows of `x` quantized to int16 for [`matmul_nt_rows_i8`]: `values[i * k + p] · scales[i]`
/// approximates `x[i][p]`.
#[derive(Debug, Default)]
pub struct QuantizedRows {
    /// `[m, k]` row-major.
    pub values: Vec<i16>,
    /// One per row.
    pub scales: Vec<f32>,
}

/// Quantizes `m` rows of `k` elements of `x` to int16 with one scale per row (zero rows get
/// scale 0 and zeros).
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> QuantizedRows {
    let mut q = QuantizedRows {
        values: vec![0; m * k],
        scales: vec![0.0; m],
    };
    for ((row, out), scale) in x[..m * k]
        .chunks_exact(k)
        .zip(q.values.chunks_exact_mut(k))
        .zip(&mut q.scales)
    {
        // `f32::max` skips NaN, so a NaN is looked for apart (as the largest value, it would be
        // lost: rounded to 0 and the row's outputs silently finite).
        let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        if max == 0.0 || !max.is_finite() || row.iter().any(|v| v.is_nan()) {
            // Zeros stay zeros; a non-finite row poisons its outputs as the f32 kernels would.
            *scale = if max == 0.0 { 0.0 } else { f32::NAN };
            continue;
        }
        *scale = max / 32767.0;
        let inv = 32767.0 / max;
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (v * inv).round() as i16;
        }
    }
    q
}

/// Multiplies each dot product by its row's scale on the way to `inner`.
struct RowScaledSink<'a, S> {
    inner: &'a S,
    scales: &'a [f32],
}

// SAFETY: forwards every put to `inner` at the same (row, col).
unsafe impl<S: Sink> Sink for RowScaledSink<'_, S> {
    #[inline(always)]
    unsafe fn put(&self, row: usize, col: usize, value: f32) {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.put(row, col, value * self.scales[row]) };
    }
}

/// `sink ← x · W[cols]ᵀ` for int8 `w` and `x` quantized by [`quantize_rows`] (`m` rows).
///
/// # Safety
/// [`use_vnni`] must have returned true; `x` must hold `m * k` values and `m` scales and `w`
/// `cols.end * k` elements.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_rows_i8(
    x: &QuantizedRows,
    m: usize,
    k: usize,
    w: &[i8],
    cols: Range<usize>,
    sink: &impl Sink,
) {
    assert!(x.values.len() >= m * k && x.scales.len() >= m && w.len() >= cols.end * k);
    let scaled = RowScaledSink {
        inner: sink,
        scales: &x.scales,
    };
    // SAFETY: forwarded from the caller.
    unsafe { tiles::<I16Dot, _>(&x.values, m, k, w, cols, &scaled) };
}

/// The `vpdpwssd` tile.
struct I16Dot;

#[cfg(target_arch = "x86_64")]
impl RowTile for I16Dot {
    type X = i16;
    type W = i8;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<S: Sink, const R: usize, const C: usize>(
        x: *const i16,
        w: *const i8,
        k: usize,
        r0: usize,
        c0: usize,
        sink: &S,
    ) {
        use std::arch::x86_64::*;
        // SAFETY (whole body): loads read inside rows of length k from x / w (`p + 2 * STEP
        // <= end` or `p + STEP <= end` with end <= k in the vector loops, `q < k` in the
        // tail).
        unsafe {
            let widen =
                |p: *const i8| _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i));
            let load = |p: *const i16| _mm512_loadu_si512(p as *const __m512i);
            // One weight row after the other, each read front to back (a sequential stream).
            for j in 0..C {
                let wr = w.add(j * k);
                let mut sums = [_mm512_setzero_ps(); R];
                let mut p = 0;
                while p + STEP <= k {
                    let end = (p + K_BLOCK).min(k);
                    // two chains of int32 sums per row of x
                    let mut acc = [[_mm512_setzero_si512(); 2]; R];
                    while p + 2 * STEP <= end {
                        // one cache line of weights per step (2 × 32 int8)
                        prefetch_ahead(wr.add(p) as *const u8);
                        let (w0, w1) = (widen(wr.add(p)), widen(wr.add(p + STEP)));
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xi = x.add(i * k + p);
                            a[0] = _mm512_dpwssd_epi32(a[0], load(xi), w0);
                            a[1] = _mm512_dpwssd_epi32(a[1], load(xi.add(STEP)), w1);
                        }
                        p += 2 * STEP;
                    }
                    if p + STEP <= end {
                        let w0 = widen(wr.add(p));
                        for (i, a) in acc.iter_mut().enumerate() {
                            a[0] = _mm512_dpwssd_epi32(a[0], load(x.add(i * k + p)), w0);
                        }
                        p += STEP;
                    }
                    for (s, a) in sums.iter_mut().zip(&acc) {
                        *s = _mm512_add_ps(*s, _mm512_cvtepi32_ps(_mm512_add_epi32(a[0], a[1])));
                    }
                }
                for (i, s) in sums.iter().enumerate() {
                    let mut tail = 0i32;
                    for q in p..k {
                        tail += *x.add(i * k + q) as i32 * *wr.add(q) as i32;
                    }
                    sink.put(r0 + i, c0 + j, _mm512_reduce_add_ps(*s) + tail as f32);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::gemm::{matmul_nt_cols_avx2, StoreSink};
    use super::super::shared::SharedMut;
    use super::super::test_util::{lcg, FEW_ROWS_SHAPES};
    use super::*;

    /// The VNNI tiles against the AVX2 tiles on int8 weights, on shapes off the step, the
    /// tile, the 8-row group and the column block, and one row longer than [`K_BLOCK`]:
    /// within the int16 rounding of `x` (at most half a step of each row's scale per
    /// element).
    #[test]
    fn vnni_tiles_match_avx2_within_the_int16_rounding() {
        if !use_vnni() {
            eprintln!("skipped: no AVX512-VNNI here");
            return;
        }
        let long_row = (2, K_BLOCK + 96 + 7, 5);
        for &(m, k, n) in FEW_ROWS_SHAPES.iter().chain([&long_row]) {
            let mut seed = (m * 7919 + k * 31 + n) as u64;
            let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            if m > 1 {
                // a row of zeros
                x[k..2 * k].iter_mut().for_each(|v| *v = 0.0);
            }
            let w: Vec<i8> = (0..n * k).map(|_| (lcg(&mut seed) * 255.0) as i8).collect();
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let cols = 1..n;
            let q = quantize_rows(&x, m, k);
            // SAFETY: VNNI detected above; operand sizes match.
            unsafe {
                matmul_nt_rows_i8(&q, m, k, &w, cols.clone(), &StoreSink::new(&sa, n, 0, None))
            };
            matmul_nt_cols_avx2(&x, m, k, &w, cols, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            for (idx, (got, want)) in a.iter().zip(&b).enumerate() {
                let (i, j) = (idx / n, idx % n);
                if j == 0 {
                    assert!(got.is_nan(), "column 0 is outside the range");
                    continue;
                }
                // |Σ e_p w_p| ≤ (s/2) Σ |w_p|, plus f32 rounding of the sums
                let abs_w: f32 = w[j * k..(j + 1) * k]
                    .iter()
                    .map(|v| (*v as f32).abs())
                    .sum();
                let tol = q.scales[i] / 2.0 * abs_w + 1e-4 * (1.0 + want.abs());
                assert!(
                    (got - want).abs() <= tol,
                    "{m}x{k}x{n} ({i},{j}): {got} vs {want} (tol {tol})"
                );
                if i == 1 && m > 1 {
                    assert_eq!(*got, 0.0, "a zero row gives zeros");
                }
            }
        }
    }

    #[test]
    fn quantized_rows_reconstruct_x() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 3.0, -0.001, 2.0];
        let q = quantize_rows(&x, 3, 3);
        assert_eq!(q.values[1], -32767);
        assert_eq!(q.scales[1], 0.0);
        assert_eq!(&q.values[3..6], &[0, 0, 0]);
        for i in [0, 2] {
            for p in 0..3 {
                let back = q.values[i * 3 + p] as f32 * q.scales[i];
                assert!((back - x[i * 3 + p]).abs() <= q.scales[i] / 2.0 + 1e-7);
            }
        }
        // A NaN or an infinity poisons its row's outputs (scale NaN), as in the f32 kernels.
        let bad = [1.0f32, f32::NAN, 2.0, 1.0, f32::INFINITY, 2.0];
        let q = quantize_rows(&bad, 2, 3);
        assert!(q.scales[0].is_nan() && q.scales[1].is_nan());
    }
}

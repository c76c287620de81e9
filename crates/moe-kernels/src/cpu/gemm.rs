//! `x · Wᵀ` for f32 activations `x` (`[m, k]`, row-major) and weights `W` (`[n, k]`, HF's
//! `[out, in]` layout, any [`WeightElem`]), the layout checkpoints store: no transpose or
//! copy of the weights per call.
//!
//! The work is cut into tiles of up to 3 rows of `x` × 4 rows of `W`; each tile keeps its
//! 12 dot products in AVX2 registers, widening 8 weights per load and reusing them for every
//! row of `x` (so a decode step with a few rows per matrix streams each weight once). Columns
//! (rows of `W`) are split over the [`pool`](super::pool); each finished dot product goes to a
//! [`Sink`], which stores it ([`StoreSink`]) or, in the MoE FFN, scatter-accumulates it.
//! From [`PACKED_MIN_ROWS`](super::gemm_packed::PACKED_MIN_ROWS) rows of `x` on (prefill)
//! the columns go through widened packed panels instead ([`super::gemm_packed`]).
//! With AVX-512 (detected at run time) the case of fewer than
//! [`PACKED_MIN_ROWS_AVX512`](super::gemm_packed::PACKED_MIN_ROWS_AVX512) rows goes to
//! [`super::gemm_avx512`] instead, and the packed panels use an 8×32 AVX-512 microkernel. Without AVX2/FMA a scalar
//! loop computes the same tiles, and says so once on stderr.

use std::sync::OnceLock;

use super::pool;
use super::shared::SharedMut;
use super::weights::WeightElem;

/// Rows of `x` per tile.
const TILE_ROWS: usize = 3;
/// Rows of `W` (output columns) per tile.
const TILE_COLS: usize = 4;
/// Output columns a task walks before moving to the next rows of `x` (keeps that slice of
/// `W` in L2 while all rows of `x` pass over it).
const COL_BLOCK: usize = 64;
/// Below this many weight elements a product runs on the calling thread.
pub(super) const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// Receives finished dot products.
///
/// # Safety
/// Implementations write through shared pointers. The kernels call [`Sink::put`] at most once
/// per `(row, col)` pair per product and never for the same output element from two threads
/// at once (tasks own disjoint column ranges); implementations must not map two different
/// `(row, col)` pairs of one product to the same memory unless they are on the same task.
pub unsafe trait Sink: Sync {
    /// `value` is `x[row] · W[col]`.
    ///
    /// # Safety
    /// See the trait: no two threads call this for the same output element.
    unsafe fn put(&self, row: usize, col: usize, value: f32);
}

/// Stores `x · Wᵀ (+ bias)` into a row-major f32 buffer: element `(row, col)` goes to
/// `out[(row_offset + row) * ld + col]`.
pub struct StoreSink<'s, 'a> {
    out: &'s SharedMut<'a>,
    ld: usize,
    row_offset: usize,
    bias: Option<&'s [f32]>,
}

impl<'s, 'a> StoreSink<'s, 'a> {
    /// A sink writing into `out` (`ld` floats per row) from row `row_offset` on, adding
    /// `bias[col]` if given.
    pub fn new(
        out: &'s SharedMut<'a>,
        ld: usize,
        row_offset: usize,
        bias: Option<&'s [f32]>,
    ) -> Self {
        Self {
            out,
            ld,
            row_offset,
            bias,
        }
    }
}

// SAFETY: distinct (row, col) pairs map to distinct elements (col < ld for a valid `ld`).
unsafe impl Sink for StoreSink<'_, '_> {
    #[inline(always)]
    unsafe fn put(&self, row: usize, col: usize, value: f32) {
        let b = self.bias.map_or(0.0, |b| b[col]);
        // SAFETY: no other thread writes this element (trait contract).
        unsafe { *self.out.at((self.row_offset + row) * self.ld + col) = value + b };
    }
}

/// Whether the AVX2/FMA tiles can run here (checked once; the fallback is logged once).
pub fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        if !has {
            eprintln!(
                "moe-kernels: no AVX2/FMA on this CPU; the fast projections use a scalar loop"
            );
        }
        has
    })
}

/// `sink ← x · Wᵀ` for `x` `[m, k]` and `w` `[n, k]`, columns split over the thread pool.
pub fn matmul_nt_into<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    sink: &S,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "matmul_nt_into: short operands"
    );
    if m == 0 || n == 0 {
        return;
    }
    let rows = PreparedRows::new(x, m, k);
    if n * k < PARALLEL_MIN_WEIGHTS {
        matmul_nt_cols_prepared(&rows, w, 0..n, sink);
        return;
    }
    // Multiples of 16 columns: the AMX tiles' width (and four of the AVX2 tiles).
    let chunk = pool::chunk_size(n, 16, 16, 4);
    pool::for_each_task(n.div_ceil(chunk), |t| {
        let cols = t * chunk..((t + 1) * chunk).min(n);
        matmul_nt_cols_prepared(&rows, w, cols, sink);
    });
}

/// Rows of `x` (`[m, k]` f32, row-major) for one or more products: the form a kernel packs
/// them into (the AMX tiles' bf16 pairs) is made on first use and shared by every product and
/// thread that uses these rows, so an expert's gate and up, or the column tasks of one
/// projection, pack their common rows once.
pub struct PreparedRows<'a> {
    x: &'a [f32],
    pub(super) m: usize,
    pub(super) k: usize,
    /// `x` packed for [`super::gemm_amx`], made by the first AMX product.
    amx: OnceLock<Vec<u32>>,
    /// `x` packed as bf16 pairs for [`super::gemm_bf16dot::matmul_nt_packed_bf16`].
    bf16_pairs: OnceLock<Vec<u32>>,
    /// `x` quantized to int16 for [`super::gemm_vnni::matmul_nt_rows_i8`].
    int16: OnceLock<super::gemm_vnni::QuantizedRows>,
    /// `x` rounded to bf16 for [`super::gemm_bf16dot::matmul_nt_rows_bf16`].
    bf16: OnceLock<Vec<half::bf16>>,
}

impl<'a> PreparedRows<'a> {
    /// The first `m` rows of `k` elements of `x`.
    pub fn new(x: &'a [f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k, "PreparedRows: short rows");
        Self {
            x,
            m,
            k,
            amx: OnceLock::new(),
            bf16_pairs: OnceLock::new(),
            int16: OnceLock::new(),
            bf16: OnceLock::new(),
        }
    }

    /// `x` rounded to bf16, row-major ([`super::gemm_bf16dot::round_rows`]).
    fn bf16_rows(&self) -> &[half::bf16] {
        self.bf16
            .get_or_init(|| super::gemm_bf16dot::round_rows(self.x, self.m, self.k))
    }

    /// `x` quantized to int16 per row ([`super::gemm_vnni::quantize_rows`]).
    fn int16(&self) -> &super::gemm_vnni::QuantizedRows {
        self.int16
            .get_or_init(|| super::gemm_vnni::quantize_rows(self.x, self.m, self.k))
    }

    /// `x` packed as bf16 pairs ([`super::gemm_bf16dot::pack_x_pairs`]).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn bf16_pairs(&self) -> &[u32] {
        self.bf16_pairs.get_or_init(|| {
            let mut packed = Vec::new();
            super::gemm_bf16dot::pack_x_pairs(self.x, self.m, self.k, &mut packed);
            packed
        })
    }

    /// `x` packed as the AMX tiles' B operand ([`super::gemm_amx::pack_x`]).
    #[cfg(target_arch = "x86_64")]
    fn amx_packed(&self) -> &[u32] {
        self.amx.get_or_init(|| {
            let mut packed = Vec::new();
            super::gemm_amx::pack_x(self.x, self.m, self.k, &mut packed);
            packed
        })
    }
}

/// `sink ← x · W[cols]ᵀ` on the calling thread: output columns `cols` for all `m` rows.
pub fn matmul_nt_cols<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
) {
    matmul_nt_cols_prepared(&PreparedRows::new(x, m, k), w, cols, sink);
}

/// [`matmul_nt_cols`] for rows that several products share ([`PreparedRows`]).
pub fn matmul_nt_cols_prepared<W: WeightElem, S: Sink>(
    rows: &PreparedRows<'_>,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
) {
    let (x, m, k) = (rows.x, rows.m, rows.k);
    assert!(w.len() >= cols.end * k, "matmul_nt_cols: short operands");
    #[cfg(target_arch = "x86_64")]
    let cols = match amx_first(rows, w, cols, sink) {
        Some(left) => left,
        None => return,
    };
    #[cfg(target_arch = "x86_64")]
    let packed_from = if super::gemm_avx512::use_avx512() {
        super::gemm_packed::PACKED_MIN_ROWS_AVX512
    } else {
        super::gemm_packed::PACKED_MIN_ROWS
    };
    #[cfg(target_arch = "x86_64")]
    if m >= packed_from && k.is_multiple_of(2) && super::gemm_bf16dot::use_bf16_dot() {
        if let Some(wb) = W::as_bf16(w) {
            // SAFETY: AVX512-BF16 detected, k even; the packed rows and w's rows up to
            // cols.end (asserted above) are in bounds.
            unsafe {
                super::gemm_bf16dot::matmul_nt_packed_bf16(rows.bf16_pairs(), m, k, wb, cols, sink)
            };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && m >= packed_from {
        // SAFETY: AVX2/FMA detected; operand lengths asserted above.
        unsafe { super::gemm_packed::matmul_nt_packed(x, m, k, w, cols, sink) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::gemm_avx512::use_avx512() {
        if let Some(wb) = W::as_bf16(w).filter(|_| super::gemm_bf16dot::use_bf16_dot()) {
            // SAFETY: AVX512-BF16 detected; operand lengths asserted above.
            unsafe {
                super::gemm_bf16dot::matmul_nt_rows_bf16(rows.bf16_rows(), m, k, wb, cols, sink)
            };
            return;
        }
        if let Some(wi) = W::as_i8(w).filter(|_| super::gemm_vnni::use_vnni()) {
            // SAFETY: AVX512-VNNI detected; the quantized rows and w's rows up to cols.end
            // (asserted above) are in bounds.
            unsafe { super::gemm_vnni::matmul_nt_rows_i8(rows.int16(), m, k, wi, cols, sink) };
            return;
        }
        // SAFETY: AVX-512 F/BW detected; operand lengths asserted above.
        unsafe { super::gemm_avx512::matmul_nt_rows(x, m, k, w, cols, sink) };
        return;
    }
    matmul_nt_cols_avx2(x, m, k, w, cols, sink);
}

/// Runs what it can of `x · W[cols]ᵀ` on the AMX tiles ([`super::gemm_amx`]: bf16 weights,
/// enough rows, `k` a multiple of 32, AMX granted) and returns the columns still to do, or
/// `None` when none are left.
#[cfg(target_arch = "x86_64")]
fn amx_first<W: WeightElem, S: Sink>(
    rows: &PreparedRows<'_>,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
) -> Option<std::ops::Range<usize>> {
    use super::gemm_amx::{matmul_nt_amx, use_amx, AMX_MIN_ROWS, K_STEP};
    let (m, k) = (rows.m, rows.k);
    if m < AMX_MIN_ROWS || !k.is_multiple_of(K_STEP) {
        return Some(cols);
    }
    let Some(wb) = W::as_bf16(w) else {
        return Some(cols);
    };
    if !use_amx() {
        return Some(cols);
    }
    // SAFETY: AMX granted; the packed rows and w's rows up to cols.end (asserted by the
    // caller) are in bounds; k % 32 == 0.
    let left = unsafe { matmul_nt_amx(rows.amx_packed(), m, k, wb, cols, sink) };
    (!left.is_empty()).then_some(left)
}

/// [`matmul_nt_cols`] through the AVX2/FMA register tiles (or their scalar fallback), whatever
/// the number of rows: the few-rows path of CPUs without AVX-512, and the twin the AVX-512
/// tiles are tested against.
pub fn matmul_nt_cols_avx2<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
) {
    assert!(
        x.len() >= m * k && w.len() >= cols.end * k,
        "matmul_nt_cols_avx2: short operands"
    );
    let avx2 = has_avx2_fma();
    let mut c0 = cols.start;
    while c0 < cols.end {
        let c1 = (c0 + COL_BLOCK).min(cols.end);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(TILE_ROWS);
            let mut c = c0;
            while c < c1 {
                let n_cols = if rows == 1 && c1 - c >= 2 * TILE_COLS {
                    // One row (decode): 8 weight streams in flight.
                    2 * TILE_COLS
                } else if c1 - c >= TILE_COLS {
                    TILE_COLS
                } else {
                    1
                };
                // SAFETY: rows r..r+rows of x and rows c..c+n_cols of w are in bounds
                // (asserted above); AVX2/FMA were detected when `avx2` is true.
                unsafe { tile(avx2, x, k, w, r, rows, c, n_cols, sink) };
                c += n_cols;
            }
            r += rows;
        }
        c0 = c1;
    }
}

/// One tile: `rows` (1..=3) rows of `x` from `r` × `n_cols` (1, 4, or 8 when `rows` is 1)
/// rows of `w` from `c`.
///
/// # Safety
/// The rows must be in bounds of `x` and `w`; `avx2` only if the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<W: WeightElem, S: Sink>(
    avx2: bool,
    x: &[f32],
    k: usize,
    w: &[W],
    r: usize,
    rows: usize,
    c: usize,
    n_cols: usize,
    sink: &S,
) {
    let xp = x[r * k..].as_ptr();
    let wp = w[c * k..].as_ptr();
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: forwarded from the caller.
        unsafe {
            match (rows, n_cols) {
                (1, 8) => tile_avx2::<W, S, 1, 8>(xp, wp, k, r, c, sink),
                (1, 4) => tile_avx2::<W, S, 1, 4>(xp, wp, k, r, c, sink),
                (2, 4) => tile_avx2::<W, S, 2, 4>(xp, wp, k, r, c, sink),
                (3, 4) => tile_avx2::<W, S, 3, 4>(xp, wp, k, r, c, sink),
                (1, _) => tile_avx2::<W, S, 1, 1>(xp, wp, k, r, c, sink),
                (2, _) => tile_avx2::<W, S, 2, 1>(xp, wp, k, r, c, sink),
                _ => tile_avx2::<W, S, 3, 1>(xp, wp, k, r, c, sink),
            }
        }
        return;
    }
    let _ = avx2;
    for i in 0..rows {
        for j in 0..n_cols {
            let xr = &x[(r + i) * k..(r + i + 1) * k];
            let wr = &w[(c + j) * k..(c + j + 1) * k];
            // SAFETY: one put per (row, col) of this tile.
            unsafe { sink.put(r + i, c + j, dot_scalar(xr, wr)) };
        }
    }
}

/// Scalar dot product with 8 partial sums (the fallback's order matches the AVX2 lanes).
fn dot_scalar<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [0f32; 8];
    let main = x.len() / 8 * 8;
    for p in (0..main).step_by(8) {
        for l in 0..8 {
            acc[l] += x[p + l] * w[p + l].to_f32();
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for p in main..x.len() {
        s += x[p] * w[p].to_f32();
    }
    s
}

/// The AVX2/FMA tile: `R` rows of `x` × `C` rows of `w`, all `R × C` sums in registers.
///
/// # Safety
/// `x..x + R*k` and `w..w + C*k` must be readable; the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<W: WeightElem, S: Sink, const R: usize, const C: usize>(
    x: *const f32,
    w: *const W,
    k: usize,
    r0: usize,
    c0: usize,
    sink: &S,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut p = 0;
    // One cache line of each of the next tile's weight rows is prefetched every
    // `line_step` elements (the hardware prefetcher alone leaves bandwidth unused).
    let line_step = 64 / std::mem::size_of::<W>();
    // SAFETY (whole body): every load reads inside rows of length k starting at x / w, as
    // `p + 8 <= k` in the vector loop and `p < k` in the tail. Prefetches may point past
    // `w`'s end: wrapping pointer arithmetic, and a prefetch never faults.
    unsafe {
        while p + 8 <= k {
            if p % line_step == 0 {
                for j in 0..C {
                    let next = w.wrapping_add((C + j) * k + p);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                }
            }
            let mut xv = [_mm256_setzero_ps(); R];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(i * k + p));
            }
            for j in 0..C {
                let wv = W::load8(w.add(j * k + p));
                for i in 0..R {
                    acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
            p += 8;
        }
        for i in 0..R {
            for j in 0..C {
                let v = acc[i][j];
                let lo = _mm256_castps256_ps128(v);
                let hi = _mm256_extractf128_ps(v, 1);
                let s4 = _mm_add_ps(lo, hi);
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                let mut s = _mm_cvtss_f32(s1);
                for q in p..k {
                    s += *x.add(i * k + q) * (*w.add(j * k + q)).to_f32();
                }
                sink.put(r0 + i, c0 + j, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::lcg;
    use super::*;
    use half::bf16;

    fn check<W: WeightElem>(m: usize, k: usize, n: usize, conv: fn(f32) -> W) {
        let mut seed = (m * 1000 + k * 10 + n) as u64;
        let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let w: Vec<W> = (0..n * k).map(|_| conv(lcg(&mut seed))).collect();
        if W::as_bf16(&w).is_some() {
            // With bf16 weights the AMX tiles (where the CPU has them) round x to bf16, as a
            // bf16 run's activations already are: give every path bf16 inputs.
            x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let mut out = vec![f32::NAN; m * n];
        let shared = SharedMut::new(&mut out);
        matmul_nt_into(&x, m, k, &w, n, &StoreSink::new(&shared, n, 0, Some(&bias)));
        drop(shared);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p].to_f32() as f64)
                    .sum::<f64>()
                    + bias[j] as f64;
                let got = out[i * n + j] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (k as f64).sqrt(),
                    "{m}x{k}x{n} ({i},{j}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_edge_shapes() {
        // Sizes off the vector width (k), off the tile (m, n), one row, and a parallel case.
        for (m, k, n) in [
            (1, 1, 1),
            (1, 7, 5),
            (1, 33, 9),
            (2, 64, 4),
            (3, 17, 7),
            (4, 40, 13),
            (7, 100, 130),
            (1, 256, 300),
            (5, 96, 1100),
            (8, 33, 17),
            (13, 64, 40),
            (50, 130, 70),
        ] {
            check::<f32>(m, k, n, |v| v);
            check::<bf16>(m, k, n, bf16::from_f32);
        }
    }

    #[test]
    fn scalar_fallback_matches_avx2() {
        let (m, k, n) = (3, 37, 6);
        let mut seed = 7;
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let mut a = vec![0f32; m * n];
        let mut b = vec![0f32; m * n];
        let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
        for c in 0..n {
            // SAFETY: in bounds; avx2 only when detected.
            unsafe {
                tile(
                    false,
                    &x,
                    k,
                    &w,
                    0,
                    m,
                    c,
                    1,
                    &StoreSink::new(&sa, n, 0, None),
                );
                tile(
                    has_avx2_fma(),
                    &x,
                    k,
                    &w,
                    0,
                    m,
                    c,
                    1,
                    &StoreSink::new(&sb, n, 0, None),
                );
            }
        }
        drop((sa, sb));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}

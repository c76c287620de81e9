//! The few-rows (decode) case of [`super::gemm`] on CPUs with AVX-512: `x · Wᵀ` streaming each
//! weight once, 32 weights per step, with the next tile's rows prefetched.
//!
//! Decode is bound by memory bandwidth, so this kernel is about reading weights as fast as the
//! memory delivers them:
//! - one 64-byte load gives 32 bf16 weights; they are widened without a shuffle, the even
//!   elements by a shift and the odd ones by a mask ([`WeightElem::load32_split`]), so `x` is
//!   reordered the same way once per call ([`WeightElem::split_x`]) and each step is one load,
//!   two integer ops and two FMAs per weight row;
//! - while a tile of `C` weight rows is read, the same offsets of the next tile's rows are
//!   prefetched, one cache line per row per step (the hardware prefetcher alone left a fifth
//!   of the bandwidth unused here);
//! - all `R × C` sums stay in registers; one horizontal sum per output.
//!
//! Measured on the 2-core Xeon of this project's machines (bf16, k = 1024, 151,936 rows, the
//! bench model's lm_head): 23 GB/s against 15 GB/s for the AVX2 tiles, with a plain read of
//! the same bytes at 20–24 GB/s (`examples/gemv_speed.rs`).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use super::gemm::Sink;
use super::weights::WeightElem;

/// Weights per step (one 512-bit load of bf16).
pub const STEP: usize = 32;

/// Whether the AVX-512 tiles run here: the CPU has AVX-512 F and BW and the user did not set
/// `MOE_INFER_NO_AVX512` (checked once; the choice is logged once).
pub fn use_avx512() -> bool {
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        let disabled = std::env::var_os("MOE_INFER_NO_AVX512").is_some_and(|v| v != "0");
        if has && disabled {
            eprintln!("moe-kernels: MOE_INFER_NO_AVX512 is set; decode projections use AVX2");
        } else if !has {
            eprintln!("moe-kernels: no AVX-512 on this CPU; decode projections use AVX2");
        }
        has && !disabled
    })
}

thread_local! {
    /// Per-thread buffer for the reordered `x` (no allocation per call once warm).
    static SPLIT_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `sink ← x · W[cols]ᵀ` for `x` `[m, k]` with few rows (AVX-512 F/BW required).
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `x` must hold `m * k` and `w` `cols.end * k` elements.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_rows<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: Range<usize>,
    sink: &S,
) {
    assert!(x.len() >= m * k && w.len() >= cols.end * k);
    if !W::SPLITS_X {
        // SAFETY: forwarded from the caller; x needs no reordering for this weight type.
        unsafe { tiles(x, m, k, w, cols, sink) };
        return;
    }
    SPLIT_X.with_borrow_mut(|xs| {
        xs.resize(m * k, 0.0);
        for (row, out) in x[..m * k].chunks_exact(k).zip(xs.chunks_exact_mut(k)) {
            W::split_x(row, out);
        }
        // SAFETY: forwarded from the caller; xs is x reordered for `W`.
        unsafe { tiles(xs, m, k, w, cols, sink) };
    });
}

/// The tile loop of [`matmul_nt_rows`] over `xs`, `x` in the order [`WeightElem::split_x`]
/// gives.
///
/// # Safety
/// As [`matmul_nt_rows`].
#[cfg(target_arch = "x86_64")]
unsafe fn tiles<W: WeightElem, S: Sink>(
    xs: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: Range<usize>,
    sink: &S,
) {
    // Columns in blocks whose weights stay in L2 while every group of rows passes over them:
    // the weights stream from memory once whatever the number of rows.
    let mut c0 = cols.start;
    while c0 < cols.end {
        let c1 = (c0 + COL_BLOCK).min(cols.end);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(3);
            let mut c = c0;
            while c < c1 {
                let left = c1 - c;
                let xp = xs[r * k..].as_ptr();
                let wp = w[c * k..].as_ptr();
                // SAFETY: rows r..r+rows of x and rows c..c+n of w are in bounds (n ≤ left);
                // AVX-512 is this function's precondition.
                let n = unsafe {
                    match (rows, left) {
                        (1, 8..) => tile::<W, S, 1, 8>(xp, wp, k, r, c, sink),
                        (2, 4..) => tile::<W, S, 2, 4>(xp, wp, k, r, c, sink),
                        (3, 4..) => tile::<W, S, 3, 4>(xp, wp, k, r, c, sink),
                        (1, 4..) => tile::<W, S, 1, 4>(xp, wp, k, r, c, sink),
                        (1, _) => tile::<W, S, 1, 1>(xp, wp, k, r, c, sink),
                        (2, _) => tile::<W, S, 2, 1>(xp, wp, k, r, c, sink),
                        _ => tile::<W, S, 3, 1>(xp, wp, k, r, c, sink),
                    }
                };
                c += n;
            }
            r += rows;
        }
        c0 = c1;
    }
}

/// Output columns per block of [`tiles`]: 64 rows of `w` (128 KiB of bf16 at k = 1024).
const COL_BLOCK: usize = 64;

/// One tile: `R` rows of the reordered `x` × `C` rows of `w`; returns `C`.
///
/// # Safety
/// `x..x + R*k` and `w..w + C*k` readable; the CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile<W: WeightElem, S: Sink, const R: usize, const C: usize>(
    x: *const f32,
    w: *const W,
    k: usize,
    r0: usize,
    c0: usize,
    sink: &S,
) -> usize {
    use std::arch::x86_64::*;
    let line = 64 / std::mem::size_of::<W>();
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut p = 0;
    // SAFETY (whole body): loads read inside rows of length k from x / w (`p + STEP <= k` in
    // the vector loop, `q < k` in the tail). Prefetches may point past `w`'s end (the next
    // tile may not exist): they use wrapping pointer arithmetic and never fault.
    unsafe {
        while p + STEP <= k {
            let mut x0 = [_mm512_setzero_ps(); R];
            let mut x1 = [_mm512_setzero_ps(); R];
            for i in 0..R {
                x0[i] = _mm512_loadu_ps(x.add(i * k + p));
                x1[i] = _mm512_loadu_ps(x.add(i * k + p + 16));
            }
            for j in 0..C {
                let (w0, w1) = W::load32_split(w.add(j * k + p));
                for i in 0..R {
                    acc[i][j] = _mm512_fmadd_ps(x0[i], w0, acc[i][j]);
                    acc[i][j] = _mm512_fmadd_ps(x1[i], w1, acc[i][j]);
                }
                let next = w.wrapping_add((C + j) * k + p);
                let mut off = 0;
                while off < STEP {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(off) as *const i8);
                    off += line;
                }
            }
            p += STEP;
        }
        for i in 0..R {
            for j in 0..C {
                let mut s = _mm512_reduce_add_ps(acc[i][j]);
                // The tail of x is not reordered (split_x leaves it in place).
                for q in p..k {
                    s += *x.add(i * k + q) * (*w.add(j * k + q)).to_f32();
                }
                sink.put(r0 + i, c0 + j, s);
            }
        }
    }
    C
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::gemm::{matmul_nt_cols_avx2, StoreSink};
    use super::super::shared::SharedMut;
    use super::super::test_util::{assert_agree_outside_column_0, lcg};
    use super::*;
    use half::bf16;

    /// The AVX-512 tiles against the AVX2 tiles (the CPU twin every other path is tested
    /// against) on shapes off the step, the tile and the row block.
    fn agrees_with_avx2<W: WeightElem>(conv: fn(f32) -> W) {
        if !use_avx512() {
            eprintln!("skipped: no AVX-512 here");
            return;
        }
        for (m, k, n) in [
            (1, 32, 8),
            (1, 1024, 300),
            (1, 33, 9),
            (2, 256, 13),
            (3, 100, 7),
            (4, 64, 17),
            (7, 1000, 41),
            (1, 5, 3),
            // Several 64-column blocks, with up to 31 rows (the tiles' range with AVX-512).
            (16, 160, 150),
            (31, 96, 200),
        ] {
            let mut seed = (m * 7919 + k * 31 + n) as u64;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<W> = (0..n * k).map(|_| conv(lcg(&mut seed))).collect();
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let cols = 1..n;
            // SAFETY: AVX-512 detected above; operand sizes match.
            unsafe { matmul_nt_rows(&x, m, k, &w, cols.clone(), &StoreSink::new(&sa, n, 0, None)) };
            matmul_nt_cols_avx2(&x, m, k, &w, cols, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            assert_agree_outside_column_0(&a, &b, m, k, n);
        }
    }

    #[test]
    fn avx512_tiles_match_avx2_for_bf16() {
        agrees_with_avx2::<bf16>(bf16::from_f32);
    }

    #[test]
    fn avx512_tiles_match_avx2_for_f32() {
        agrees_with_avx2::<f32>(|v| v);
    }

    #[test]
    fn avx512_tiles_match_avx2_for_i8() {
        agrees_with_avx2::<i8>(|v| (v * 250.0) as i8);
    }
}

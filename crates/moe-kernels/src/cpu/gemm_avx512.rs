//! The few-rows (decode) case of [`super::gemm`] on CPUs with AVX-512: `x · Wᵀ` streaming each
//! weight once, 32 weights per step.
//!
//! Decode is bound by memory bandwidth, so these kernels are about reading weights as fast as
//! the memory delivers them:
//! - one 64-byte load gives 32 bf16 weights; they are widened without a shuffle, the even
//!   elements by a shift and the odd ones by a mask ([`WeightElem::load32_split`]), so `x` is
//!   reordered the same way once per call ([`WeightElem::split_x`]) and each step is one load,
//!   two integer ops and two FMAs per row of `x` (bf16 weights on CPUs with AVX512-BF16 take
//!   [`super::gemm_bf16dot`]'s one-instruction step instead, through the same [`tiles`] loop);
//! - the weight rows of a tile are read one after the other, each front to back, so the
//!   weights are one sequential stream, asked for ahead of the loads ([`PREFETCH_AHEAD_BYTES`],
//!   twice that in the widening tile): the hardware prefetcher restarts late on each of a
//!   decode step's many small matrices; the few rows of `x` (L1-resident) are reread for
//!   every weight row. Reading the tile's rows side by side, one cache line of each per step
//!   with the next tile prefetched by hand, reached about half
//!   the bandwidth of a plain read on the 2-core AMD EPYC (Zen 4) of this project's machines;
//!   the sequential order reaches 0.9–1.15 of it there (bf16, k = 1024, the bench model's
//!   151,936-row lm_head, `examples/gemv_speed.rs`), and was level with the side-by-side order
//!   on the Xeon measured before;
//! - one horizontal sum per output.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use super::gemm::Sink;
use super::weights::WeightElem;

/// Weights per step (one 512-bit load of bf16).
pub const STEP: usize = 32;

/// How far ahead of the weights it is reading a few-rows tile asks for the next ones
/// ([`prefetch_ahead`]). A decode step reads many small matrices (an expert's 256 KiB, an
/// attention projection's 256 KiB to 2 MiB) each once: the hardware prefetcher starts late on
/// every new stream. On the bench model (a 2-core Sapphire Rapids Xeon, alternated runs)
/// asking 16 cache lines ahead measured +13 % batch-1 and +15 % 16-sequence int8 decode over
/// none, 32 lines another +3 %, 64 lines no more. In the widening tile (bf16 there) 32 lines
/// measured +2–12 % batch-1 and +9–11 % 16-sequence decode over none, and 64 lines a little
/// more ([`WIDEN_PREFETCH_AHEAD_BYTES`]).
pub(crate) const PREFETCH_AHEAD_BYTES: usize = 2048;

/// Hints the cache line [`PREFETCH_AHEAD_BYTES`] past `p` into L1. A hint never faults, so it
/// may point past the end of the weights.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8) {
    prefetch_line(p.wrapping_add(PREFETCH_AHEAD_BYTES));
}

/// How far ahead the widening tile ([`WidenFma`]) asks for its weights: twice
/// [`PREFETCH_AHEAD_BYTES`]. With bf16 weights (64 bytes a step) on the bench model, 2-core
/// Sapphire Rapids, four runs each: 4 KiB 40.8–43.7 tok/s batch-1 and 140.8–144.0 at 16
/// sequences, 2 KiB 39.5–40.8 and 137.1–141.6; 8 KiB no better than 4.
const WIDEN_PREFETCH_AHEAD_BYTES: usize = 2 * PREFETCH_AHEAD_BYTES;

/// Hints the cache line at `p` into L1. A hint never faults, so `p` may be any address.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: prefetch is a hint: it reads nothing architecturally and cannot fault, whatever
    // the address (callers form it with `wrapping_add`, which keeps that arithmetic defined).
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
}

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
        unsafe { tiles::<WidenFma<W>, S>(x, m, k, w, cols, sink) };
        return;
    }
    SPLIT_X.with_borrow_mut(|xs| {
        xs.resize(m * k, 0.0);
        for (row, out) in x[..m * k].chunks_exact(k).zip(xs.chunks_exact_mut(k)) {
            W::split_x(row, out);
        }
        // SAFETY: forwarded from the caller; xs is x reordered for `W`.
        unsafe { tiles::<WidenFma<W>, S>(xs, m, k, w, cols, sink) };
    });
}

/// One register tile of a few-rows kernel: `R` rows of `x` (as the kernel stores them, `X`)
/// times `C` rows of the weights (`W`), every dot product handed to the sink. The kernels
/// differ in how a step of [`STEP`] weights is multiplied (widened and FMA'd, or a bf16 dot
/// instruction); [`tiles`] walks the output in the same order for all of them.
pub(crate) trait RowTile {
    /// Element of `x` as the tile reads it.
    type X;
    /// Weight element.
    type W;

    /// Runs one `R × C` tile at `x` (row stride `k`) and `w` (row stride `k`) and puts the
    /// results at rows `r0..r0 + R`, columns `c0..c0 + C` of `sink`.
    ///
    /// # Safety
    /// `x..x + R*k` and `w..w + C*k` readable; the CPU has what the kernel needs.
    unsafe fn tile<S: Sink, const R: usize, const C: usize>(
        x: *const Self::X,
        w: *const Self::W,
        k: usize,
        r0: usize,
        c0: usize,
        sink: &S,
    );
}

/// The tile loop of the few-rows kernels over `xs` (`m` rows of `k`, in the form `T` reads).
///
/// # Safety
/// `xs` holds `m * k` and `w` `cols.end * k` elements; the CPU has what `T` needs.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn tiles<T: RowTile, S: Sink>(
    xs: &[T::X],
    m: usize,
    k: usize,
    w: &[T::W],
    cols: Range<usize>,
    sink: &S,
) {
    debug_assert!(xs.len() >= m * k && w.len() >= cols.end * k);
    // Columns in blocks whose weights stay in L2 while every group of rows passes over them:
    // the weights stream from memory once whatever the number of rows.
    let mut c0 = cols.start;
    while c0 < cols.end {
        let c1 = (c0 + COL_BLOCK).min(cols.end);
        let mut r = 0;
        while r < m {
            // Groups of rows as even as possible, at most MAX_TILE_ROWS each (16 rows: 8 + 8,
            // not 8 + 8 in one and a lone row in another).
            let groups_left = (m - r).div_ceil(MAX_TILE_ROWS);
            let rows = (m - r).div_ceil(groups_left);
            let mut c = c0;
            while c < c1 {
                let n = if c1 - c >= 4 { 4 } else { 1 };
                let xp = xs[r * k..].as_ptr();
                let wp = w[c * k..].as_ptr();
                // SAFETY: rows r..r+rows of x and rows c..c+n of w are in bounds (n ≤ c1 - c);
                // the CPU features are this function's precondition.
                unsafe {
                    match (rows, n) {
                        (1, 4) => T::tile::<S, 1, 4>(xp, wp, k, r, c, sink),
                        (2, 4) => T::tile::<S, 2, 4>(xp, wp, k, r, c, sink),
                        (3, 4) => T::tile::<S, 3, 4>(xp, wp, k, r, c, sink),
                        (4, 4) => T::tile::<S, 4, 4>(xp, wp, k, r, c, sink),
                        (5, 4) => T::tile::<S, 5, 4>(xp, wp, k, r, c, sink),
                        (6, 4) => T::tile::<S, 6, 4>(xp, wp, k, r, c, sink),
                        (7, 4) => T::tile::<S, 7, 4>(xp, wp, k, r, c, sink),
                        (8, 4) => T::tile::<S, 8, 4>(xp, wp, k, r, c, sink),
                        (1, _) => T::tile::<S, 1, 1>(xp, wp, k, r, c, sink),
                        (2, _) => T::tile::<S, 2, 1>(xp, wp, k, r, c, sink),
                        (3, _) => T::tile::<S, 3, 1>(xp, wp, k, r, c, sink),
                        (4, _) => T::tile::<S, 4, 1>(xp, wp, k, r, c, sink),
                        (5, _) => T::tile::<S, 5, 1>(xp, wp, k, r, c, sink),
                        (6, _) => T::tile::<S, 6, 1>(xp, wp, k, r, c, sink),
                        (7, _) => T::tile::<S, 7, 1>(xp, wp, k, r, c, sink),
                        _ => T::tile::<S, 8, 1>(xp, wp, k, r, c, sink),
                    }
                };
                c += n;
            }
            r += rows;
        }
        c0 = c1;
    }
}

/// Most rows of `x` a tile multiplies each loaded weight step with. The widening tile spends
/// two integer ops per step on the weights whatever the rows, on the same ports as the FMAs
/// (two per row): 3 rows left a quarter of those slots to the widening, 8 leave a ninth. With
/// two chains per row, 8 rows keep 16 accumulators and 32 KiB of f32 `x` (L1) in play.
const MAX_TILE_ROWS: usize = 8;

/// Output columns per block of [`tiles`]: 64 rows of `w` (128 KiB of bf16 at k = 1024).
const COL_BLOCK: usize = 64;

/// The widening tile: each step loads 32 weights, widens them to f32
/// ([`WeightElem::load32_split`]) and FMAs them with `x` reordered by
/// [`WeightElem::split_x`].
struct WidenFma<W>(std::marker::PhantomData<W>);

#[cfg(target_arch = "x86_64")]
impl<W: WeightElem> RowTile for WidenFma<W> {
    type X = f32;
    type W = W;

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tile<S: Sink, const R: usize, const C: usize>(
        x: *const f32,
        w: *const W,
        k: usize,
        r0: usize,
        c0: usize,
        sink: &S,
    ) {
        use std::arch::x86_64::*;
        // SAFETY (whole body): loads read inside rows of length k from x / w (`p + STEP <= k`
        // in the vector loop, `q < k` in the tail).
        unsafe {
            // One weight row after the other, each read front to back: a single sequential
            // stream, asked for ahead of the loads ([`WIDEN_PREFETCH_AHEAD_BYTES`]), a line
            // at a time.
            let step_bytes = STEP * std::mem::size_of::<W>();
            for j in 0..C {
                let wr = w.add(j * k);
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                let mut p = 0;
                while p + STEP <= k {
                    let step_start = wr.add(p) as *const u8;
                    for line in (0..step_bytes).step_by(64) {
                        prefetch_line(step_start.wrapping_add(line + WIDEN_PREFETCH_AHEAD_BYTES));
                    }
                    let (w0, w1) = W::load32_split(wr.add(p));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xi = x.add(i * k + p);
                        a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xi), w0, a[0]);
                        a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xi.add(16)), w1, a[1]);
                    }
                    p += STEP;
                }
                for (i, a) in acc.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
                    // The tail of x is not reordered (split_x leaves it in place).
                    for q in p..k {
                        s += *x.add(i * k + q) * (*wr.add(q)).to_f32();
                    }
                    sink.put(r0 + i, c0 + j, s);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::gemm::{matmul_nt_cols_avx2, StoreSink};
    use super::super::shared::SharedMut;
    use super::super::test_util::{assert_agree_outside_column_0, lcg, FEW_ROWS_SHAPES};
    use super::*;
    use half::bf16;

    /// The AVX-512 tiles against the AVX2 tiles (the CPU twin every other path is tested
    /// against) on shapes off the step, the tile and the row block.
    fn agrees_with_avx2<W: WeightElem>(conv: fn(f32) -> W) {
        if !use_avx512() {
            eprintln!("skipped: no AVX-512 here");
            return;
        }
        for &(m, k, n) in FEW_ROWS_SHAPES {
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

//! The many-rows (prefill) case of [`super::gemm`]: `x · Wᵀ` through packed panels.
//!
//! 16 output columns at a time, the weights are widened once into an f32 panel laid out
//! `[k][16]` (the layout the microkernel reads, 64 KiB for k = 1024, L2-resident); then every
//! block of up to 6 rows of `x` runs the 6×16 AVX2 microkernel over it: per step of `k`, two
//! panel loads, six broadcasts of `x` and twelve FMAs, all 12 accumulators in registers. The
//! widening cost is paid once per 16 columns instead of once per 3 rows, and no horizontal sums
//! are needed. Used by [`super::gemm::matmul_nt_cols`] when `x` has at least
//! [`PACKED_MIN_ROWS`] rows and the CPU has AVX2/FMA.

use super::gemm::Sink;
use super::weights::WeightElem;

/// Rows of `x` from which the packed path beats the register tiles.
pub const PACKED_MIN_ROWS: usize = 8;
/// Output columns per panel (two AVX2 vectors).
const PANEL: usize = 16;
/// Rows of `x` per microkernel call.
const MR: usize = 6;

/// `sink ← x · W[cols]ᵀ` for `x` `[m, k]` with packed panels (AVX2/FMA required).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` must hold `m * k` and `w` `cols.end * k` elements.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_packed<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
) {
    assert!(x.len() >= m * k && w.len() >= cols.end * k);
    let mut panel = vec![0f32; k * PANEL];
    let mut c0 = cols.start;
    while c0 < cols.end {
        let nc = (cols.end - c0).min(PANEL);
        for j in 0..PANEL {
            if j < nc {
                let row = &w[(c0 + j) * k..(c0 + j + 1) * k];
                for (p, v) in row.iter().enumerate() {
                    panel[p * PANEL + j] = v.to_f32();
                }
            } else {
                for p in 0..k {
                    panel[p * PANEL + j] = 0.0;
                }
            }
        }
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(MR);
            let xp = x[r0 * k..].as_ptr();
            // SAFETY: `rows` rows of x from r0 and the k × 16 panel are in bounds; AVX2/FMA
            // are the caller's promise.
            let out = unsafe {
                match rows {
                    1 => micro::<1>(xp, k, panel.as_ptr()),
                    2 => micro::<2>(xp, k, panel.as_ptr()),
                    3 => micro::<3>(xp, k, panel.as_ptr()),
                    4 => micro::<4>(xp, k, panel.as_ptr()),
                    5 => micro::<5>(xp, k, panel.as_ptr()),
                    _ => micro::<6>(xp, k, panel.as_ptr()),
                }
            };
            for (i, row) in out.iter().take(rows).enumerate() {
                for (j, &v) in row.iter().take(nc).enumerate() {
                    // SAFETY: one put per (row, col); this task owns columns `cols`.
                    unsafe { sink.put(r0 + i, c0 + j, v) };
                }
            }
            r0 += rows;
        }
        c0 += nc;
    }
}

/// The 6×16 microkernel for `R` rows: `out[i][j] = Σ_p x[i][p] · panel[p][j]`.
///
/// # Safety
/// `x..x + R*k` and `panel..panel + 16*k` readable; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const R: usize>(x: *const f32, k: usize, panel: *const f32) -> [[f32; PANEL]; MR] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // SAFETY (whole body): p < k keeps every x and panel read inside the bounds above.
    unsafe {
        for p in 0..k {
            let b0 = _mm256_loadu_ps(panel.add(p * PANEL));
            let b1 = _mm256_loadu_ps(panel.add(p * PANEL + 8));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(i * k + p));
                a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
            }
        }
        let mut out = [[0f32; PANEL]; MR];
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
        out
    }
}

//! The many-rows (prefill) case of [`super::gemm`]: `x · Wᵀ` through packed panels.
//!
//! 16 output columns at a time, the weights are widened once into an f32 panel laid out
//! `[k][16]` (the layout the microkernel reads, 64 KiB for k = 1024, L2-resident); then every
//! block of up to 6 rows of `x` runs the 6×16 AVX2 microkernel over it: per step of `k`, two
//! panel loads, six broadcasts of `x` and twelve FMAs, all 12 accumulators in registers. The
//! widening cost is paid once per 16 columns instead of once per 3 rows, and no horizontal sums
//! are needed. With AVX-512, 32-column panels feed an 8×32 microkernel (two 512-bit panel
//! loads, 8 broadcasts and 16 FMAs per step), `x` is packed into 8-row blocks and a group of
//! panels is widened at once so each block of `x` stays in cache across them. The Xeons
//! measured first issue two 512-bit FMAs a cycle (twice the AVX2 kernel's multiply-adds) and
//! their `vdpbf16ps` at a quarter of that; on CPUs where it issues as fast as an FMA (Zen 4)
//! bf16 weights take [`super::gemm_bf16dot`]'s packed kernel instead. Used by
//! [`super::gemm::matmul_nt_cols`] when `x` has at least [`PACKED_MIN_ROWS`] rows
//! ([`PACKED_MIN_ROWS_AVX512`] with AVX-512) and the CPU has AVX2/FMA.

use super::gemm::Sink;
use super::weights::WeightElem;

/// Rows of `x` from which the packed path beats the AVX2 register tiles.
pub const PACKED_MIN_ROWS: usize = 8;

/// Rows of `x` from which the packed path beats the AVX-512 register tiles, which stream the
/// weights once per 64-column block whatever the number of rows and widen them without
/// packing. Packing widens and transposes every weight, which pays only when enough rows use
/// it: below 32 rows (16 decoded sequences' lm_head and projections, a prefill's experts) the
/// tiles won in A/B pairs on the bench model (16 sequences +7.5 %, prefill 128 +6–13 %, 512
/// +3 %); 32 and 64 measured the same.
pub const PACKED_MIN_ROWS_AVX512: usize = 32;
/// Output columns per panel (two AVX2 vectors).
const PANEL: usize = 16;
/// Rows of `x` per microkernel call.
const MR: usize = 6;
/// Rows of `x` per AVX-512 microkernel call.
const MR_AVX512: usize = 8;
/// Output columns per AVX-512 panel (two 512-bit vectors: 16 accumulators for 8 rows).
const PANEL_AVX512: usize = 32;

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
    if super::gemm_avx512::use_avx512() {
        // SAFETY: AVX-512 detected (AVX2 is this function's precondition).
        unsafe { matmul_nt_packed_avx512(x, m, k, w, cols, sink) };
        return;
    }
    BUFFERS.with_borrow_mut(|(_, panel)| {
        panel.resize(k * PANEL, 0.0);
        // SAFETY: forwarded from the caller.
        unsafe { packed_avx2(x, m, k, w, cols, sink, panel) }
    });
}

/// [`matmul_nt_packed`] with the 6×16 AVX2 microkernel, one panel at a time in `panel`.
///
/// # Safety
/// As [`matmul_nt_packed`]; `panel` holds `k * 16` floats.
#[cfg(target_arch = "x86_64")]
unsafe fn packed_avx2<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
    panel: &mut [f32],
) {
    let mut c0 = cols.start;
    while c0 < cols.end {
        let nc = (cols.end - c0).min(PANEL);
        // SAFETY: AVX2/FMA are this function's precondition.
        unsafe { pack_panel(w, k, c0, nc, panel, PANEL) };
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
            // SAFETY: this task owns columns `cols`; each (row, col) is emitted once.
            unsafe { emit(&out, rows, nc, r0, c0, sink) };
            r0 += rows;
        }
        c0 += nc;
    }
}

/// `x` in blocks of 8 rows, each laid out `[k][8]` (the last block padded with zeros), so the
/// microkernel's 8 broadcasts per step read one contiguous 32-byte run instead of 8 rows `4k`
/// bytes apart (which all fall in one L1 set). Whole 8 × 8 tiles go through the register
/// transpose; the ragged edges are copied one by one. Writes into `out` (resized).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_x_blocks(x: &[f32], m: usize, k: usize, out: &mut Vec<f32>) {
    let blocks = m.div_ceil(MR_AVX512);
    // Every element is written below (padding included), so no zero fill of the whole buffer.
    out.resize(blocks * k * MR_AVX512, 0.0);
    let k8 = k / 8 * 8;
    for (b, block) in out.chunks_exact_mut(k * MR_AVX512).enumerate() {
        let rows = MR_AVX512.min(m - b * MR_AVX512);
        let mut done = 0;
        if rows == MR_AVX512 {
            for p in (0..k8).step_by(8) {
                // SAFETY: rows b*8..b*8+8 of x have k elements, p + 8 <= k; the 8 writes of 8
                // floats at (p + q) * 8 stay inside this block; AVX2 is the caller's promise.
                unsafe {
                    transpose8(
                        x,
                        k,
                        b * MR_AVX512,
                        p,
                        block.as_mut_ptr().add(p * MR_AVX512),
                        8,
                    )
                };
            }
            done = k8;
        }
        for i in 0..rows {
            let row = &x[(b * MR_AVX512 + i) * k..][..k];
            for p in done..k {
                block[p * MR_AVX512 + i] = row[p];
            }
        }
        for i in rows..MR_AVX512 {
            for p in 0..k {
                block[p * MR_AVX512 + i] = 0.0;
            }
        }
    }
}

/// Bytes of widened panels packed together by the AVX-512 path: every 8-row block of `x`
/// then runs against all of them while it is in L1/L2 (instead of `x` streaming from L3
/// once per 16 columns).
const PANEL_GROUP_BYTES: usize = 1 << 20;

/// [`matmul_nt_packed`] with the 8×32 AVX-512 microkernel: `x` packed into 8-row blocks
/// once, the weights widened into a group of panels (up to [`PANEL_GROUP_BYTES`]), then each
/// block of `x` against each panel of the group.
///
/// # Safety
/// The CPU must have AVX2 and AVX-512 F; `x` holds `m * k` and `w` `cols.end * k` elements.
#[cfg(target_arch = "x86_64")]
unsafe fn matmul_nt_packed_avx512<W: WeightElem, S: Sink>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    cols: std::ops::Range<usize>,
    sink: &S,
) {
    const NP: usize = PANEL_AVX512;
    let group = (PANEL_GROUP_BYTES / (k * NP * 4)).max(1);
    BUFFERS.with_borrow_mut(|(x_blocks, panels)| {
        // SAFETY: AVX2 is the caller's promise.
        unsafe { pack_x_blocks(x, m, k, x_blocks) };
        panels.resize(group * k * NP, 0.0);
        let mut c0 = cols.start;
        while c0 < cols.end {
            let c1 = (c0 + group * NP).min(cols.end);
            let used = &mut panels[..(c1 - c0).div_ceil(NP) * k * NP];
            for (g, panel) in used.chunks_exact_mut(k * NP).enumerate() {
                let start = c0 + g * NP;
                // SAFETY: AVX2 is the caller's promise; rows start..start + nc exist.
                unsafe { pack_panel(w, k, start, (c1 - start).min(NP), panel, NP) };
            }
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(MR_AVX512);
                for (g, panel) in used.chunks_exact(k * NP).enumerate() {
                    let start = c0 + g * NP;
                    let nc = (c1 - start).min(NP);
                    // SAFETY: x and the panel are packed; AVX-512 is the caller's promise.
                    unsafe { block_panel_avx512(x_blocks, r0, rows, k, panel, start, nc, sink) };
                }
                r0 += rows;
            }
            c0 = c1;
        }
    });
}

thread_local! {
    /// Per-thread buffers of the packed paths: `x` packed by [`pack_x_blocks`] and the widened
    /// panels (no allocation per call once warm).
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Rows `r0..r0 + rows` (one block of [`pack_x_blocks`]) against one packed 32-column panel
/// (columns `c0..c0 + nc`): two panel loads, `rows` broadcasts and `2 × rows` FMAs per step
/// of `k` (with one 16-wide vector per row the broadcasts saturated the load ports).
///
/// # Safety
/// The CPU must have AVX-512 F; the block at `r0` must be inside `x_blocks` and `panel` hold
/// `k * 32` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_panel_avx512<S: Sink>(
    x_blocks: &[f32],
    r0: usize,
    rows: usize,
    k: usize,
    panel: &[f32],
    c0: usize,
    nc: usize,
    sink: &S,
) {
    assert!(x_blocks.len() >= (r0 + MR_AVX512) * k && panel.len() >= k * PANEL_AVX512);
    let xp = x_blocks[r0 * k..].as_ptr();
    let pp = panel.as_ptr();
    // SAFETY: `rows` rows of x from r0 and the k × 32 panel are in bounds; AVX-512 is the
    // caller's promise.
    let out = unsafe {
        match rows {
            1 => micro_avx512::<1>(xp, k, pp),
            2 => micro_avx512::<2>(xp, k, pp),
            3 => micro_avx512::<3>(xp, k, pp),
            4 => micro_avx512::<4>(xp, k, pp),
            5 => micro_avx512::<5>(xp, k, pp),
            6 => micro_avx512::<6>(xp, k, pp),
            7 => micro_avx512::<7>(xp, k, pp),
            _ => micro_avx512::<8>(xp, k, pp),
        }
    };
    // SAFETY: the calling task owns these columns; each (row, col) is emitted once.
    unsafe { emit(&out, rows, nc, r0, c0, sink) };
}

/// Hands the first `rows` × `nc` sums of a microkernel's output to `sink`, at rows from `r0`
/// and columns from `c0`.
///
/// # Safety
/// The [`Sink`] contract: the calling task owns these output columns and emits each
/// `(row, col)` once.
pub(super) unsafe fn emit<S: Sink, const N: usize>(
    out: &[[f32; N]],
    rows: usize,
    nc: usize,
    r0: usize,
    c0: usize,
    sink: &S,
) {
    for (i, row) in out.iter().take(rows).enumerate() {
        for (j, &v) in row.iter().take(nc).enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe { sink.put(r0 + i, c0 + j, v) };
        }
    }
}

/// The 8×32 AVX-512 microkernel for `R` rows of one packed block of `x` (`[k][8]`):
/// `out[i][j] = Σ_p x[p][i] · panel[p][j]`.
///
/// # Safety
/// `x..x + 8*k` and `panel..panel + 32*k` readable; the CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const R: usize>(
    x: *const f32,
    k: usize,
    panel: *const f32,
) -> [[f32; PANEL_AVX512]; MR_AVX512] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY (whole body): p < k keeps every x and panel read inside the bounds above.
    unsafe {
        for p in 0..k {
            let b0 = _mm512_loadu_ps(panel.add(p * PANEL_AVX512));
            let b1 = _mm512_loadu_ps(panel.add(p * PANEL_AVX512 + 16));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(p * MR_AVX512 + i));
                a[0] = _mm512_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, b1, a[1]);
            }
        }
        let mut out = [[0f32; PANEL_AVX512]; MR_AVX512];
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
        }
        out
    }
}

/// Widens rows `c0..c0 + nc` of `w` into `panel` as `[k][width]` (missing columns zero):
/// 8×8 blocks transposed in AVX2 registers, a scalar loop for the ragged edges.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_panel<W: WeightElem>(
    w: &[W],
    k: usize,
    c0: usize,
    nc: usize,
    panel: &mut [f32],
    width: usize,
) {
    assert!(panel.len() >= k * width && w.len() >= (c0 + nc) * k && width % 8 == 0);
    let k8 = k / 8 * 8;
    for group in 0..width / 8 {
        let j0 = group * 8;
        if nc >= j0 + 8 {
            for p in (0..k8).step_by(8) {
                // SAFETY: rows c0+j0..c0+j0+8 have k elements, p + 8 <= k; the panel writes
                // (p + q) * 16 + j0 + 8 <= k * 16; AVX2 is this function's precondition.
                unsafe {
                    transpose8(
                        w,
                        k,
                        c0 + j0,
                        p,
                        panel.as_mut_ptr().add(p * width + j0),
                        width,
                    )
                };
            }
            for j in j0..j0 + 8 {
                for p in k8..k {
                    panel[p * width + j] = w[(c0 + j) * k + p].to_f32();
                }
            }
        } else {
            for j in j0..j0 + 8 {
                for p in 0..k {
                    panel[p * width + j] = if j < nc {
                        w[(c0 + j) * k + p].to_f32()
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Loads 8 elements at column `p` of 8 consecutive rows (from `row`) of `w`, widened, and
/// stores them transposed: `out[q * stride + i] = w[row + i][p + q]`.
///
/// # Safety
/// The 8 × 8 block must be inside `w`, the 8 strided 8-float writes inside `out`'s buffer,
/// and the CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8<W: WeightElem>(
    w: &[W],
    k: usize,
    row: usize,
    p: usize,
    out: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): bounds as documented above.
    unsafe {
        let base = w.as_ptr();
        let r: [__m256; 8] = std::array::from_fn(|i| W::load8(base.add((row + i) * k + p)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let rows = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (q, v) in rows.iter().enumerate() {
            _mm256_storeu_ps(out.add(q * stride), *v);
        }
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

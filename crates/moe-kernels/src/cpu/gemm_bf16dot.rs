//! The few-rows (decode) case of [`super::gemm`] for bf16 weights on CPUs with AVX512-BF16
//! (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids): `vdpbf16ps` multiplies 32
//! bf16 pairs and adds them into 16 f32 lanes in one instruction, where the widening kernel
//! ([`super::gemm_avx512`]) needs two integer ops and two FMAs for the same 32 weights.
//!
//! `x` is rounded to bf16 (nearest even) once per call. In a bf16 run the activations reaching
//! a projection already are bf16, so this rounds nothing away there (the exception is the
//! experts' `act(gate)·up`, which transformers' bf16 forward rounds too); it is the same
//! choice as the AMX tiles ([`super::gemm_amx`]). The products of two bf16 values are exact
//! in f32; the sums are f32, in a different order than the widening kernel's. The instruction
//! treats subnormal inputs as zero and flushes subnormal results (values below 1e-38).
//!
//! Two kernels:
//! - few rows (decode): [`matmul_nt_rows_bf16`], the [`super::gemm_avx512`] tile loop with a
//!   `vdpbf16ps` step;
//! - many rows (prefill): [`matmul_nt_packed_bf16`], packed like [`super::gemm_packed`]'s
//!   AVX-512 path but without widening: a panel holds 32 weight rows as `[k/2][32]` bf16
//!   pairs, `x` is packed as `[k/2][8]` bf16 pairs per 8-row block, and the 8×32
//!   microkernel does per pair of `k` two panel loads, 8 pair broadcasts and 16 `vdpbf16ps`
//!   (32 multiply-adds each, twice an FMA's 16).
//!
//! They pay only where a `vdpbf16ps` issues about as often as an FMA: on Zen 4 it does; on
//! the Xeons measured (Sapphire/Emerald Rapids class) it costs four FMAs' time, which made
//! bf16 decode and prefill slower there than the widening kernels. So [`use_bf16_dot`] times
//! both instructions once at start-up ([`MAX_DOT_COST_OVER_FMA`]) and says on stderr when it
//! leaves the kernels off. `MOE_INFER_NO_BF16_DOT=1` turns them off too.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use super::gemm::Sink;
use super::gemm_avx512::{prefetch_ahead, tiles, RowTile, STEP};

/// Whether this CPU can run the bf16 dot kernels: AVX-512 is in use and the CPU has
/// AVX512-BF16 (whether they pay is [`use_bf16_dot`]'s question).
pub fn has_bf16_dot() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has && super::gemm_avx512::use_avx512()
    })
}

/// Whether the bf16 dot kernels run here: [`has_bf16_dot`], the user did not set
/// `MOE_INFER_NO_BF16_DOT`, and the instruction issues fast enough to pay (a probe, once; the
/// choice is logged once when it is off on a CPU that has the instruction).
pub fn use_bf16_dot() -> bool {
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| {
        if !has_bf16_dot() {
            return false;
        }
        if std::env::var_os("MOE_INFER_NO_BF16_DOT").is_some_and(|v| v != "0") {
            eprintln!("moe-kernels: MOE_INFER_NO_BF16_DOT is set; bf16 projections widen to f32");
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: AVX-512 F and AVX512-BF16 detected (has_bf16_dot).
            let cost = unsafe { dot_cost_over_fma() };
            if cost > MAX_DOT_COST_OVER_FMA {
                eprintln!(
                    "moe-kernels: vdpbf16ps costs {cost:.2} FMAs here (it pays below \
                     {MAX_DOT_COST_OVER_FMA}); bf16 projections widen to f32"
                );
                return false;
            }
        }
        true
    })
}

/// The most a `vdpbf16ps` may cost, in FMAs issued in the same time, for the dot kernels to
/// run: one does the multiply-adds of two FMAs (32 against 16) and needs no widening, so it
/// wins below 2 (Zen 4: about 1); 1.5 keeps a margin for the probe's noise. The Xeons
/// measured before issue it at a quarter of their FMA rate (cost about 4).
const MAX_DOT_COST_OVER_FMA: f64 = 1.5;

/// Time per `vdpbf16ps` over time per 512-bit FMA, both issued from 12 independent chains
/// (throughput, not latency), the best of 5 alternating rounds of about 0.1 ms each: a probe
/// of the core's issue rates, not of memory, so a busy neighbour slows both alike.
///
/// # Safety
/// The CPU has AVX-512 F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_cost_over_fma() -> f64 {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;
    const ROUNDS: usize = 8192;
    const CHAINS: usize = 12;
    let bits = _mm512_set1_epi32(black_box(0x3f80_3f80));
    // SAFETY: __m512i, __m512bh and __m512 are all 64 bytes of plain bits.
    let (pairs, floats) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(bits),
            std::mem::transmute::<__m512i, __m512>(bits),
        )
    };
    let mut best = [f64::MAX; 2];
    for _ in 0..5 {
        let t = Instant::now();
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..ROUNDS {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, pairs, pairs);
            }
        }
        black_box(acc);
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..ROUNDS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, floats, floats);
            }
        }
        black_box(acc);
        best[1] = best[1].min(t.elapsed().as_secs_f64());
    }
    best[0] / best[1]
}

/// `sink ← x · W[cols]ᵀ` for `x` `[m, k]` with few rows, already rounded to bf16
/// ([`round_rows`]), and bf16 weights.
///
/// # Safety
/// [`has_bf16_dot`] must have returned true; `x` must hold `m * k` and `w` `cols.end * k`
/// elements.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_rows_bf16(
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    cols: Range<usize>,
    sink: &impl Sink,
) {
    assert!(x.len() >= m * k && w.len() >= cols.end * k);
    // SAFETY: forwarded from the caller.
    unsafe { tiles::<Bf16Dot, _>(x, m, k, w, cols, sink) };
}

/// Rows of `x` per packed block and output columns per panel of [`matmul_nt_packed_bf16`]
/// (and of the panels stored at load, [`super::gemm_panels`]).
const MR: usize = 8;
pub(super) const NR: usize = 32;

/// Bytes of packed panels made together: every 8-row block of `x` then runs against all of
/// them while it is in L1/L2.
pub(super) const PANEL_GROUP_BYTES: usize = 1 << 19;

thread_local! {
    /// Per-thread buffer of the packed kernel's panels.
    static PANELS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `sink ← x · W[cols]ᵀ` for `x` `[m, k]` with many rows and bf16 weights, `k` even; `x_blocks`
/// is `x` packed by [`pack_x_pairs`].
///
/// # Safety
/// [`use_bf16_dot`] must have returned true; `k` must be even; `w` must hold `cols.end * k`
/// elements.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_packed_bf16(
    x_blocks: &[u32],
    m: usize,
    k: usize,
    w: &[bf16],
    cols: Range<usize>,
    sink: &impl Sink,
) {
    let kp = k / 2;
    assert!(k % 2 == 0 && x_blocks.len() >= m.div_ceil(MR) * kp * MR && w.len() >= cols.end * k);
    let group = (PANEL_GROUP_BYTES / (kp * NR * 4)).max(1);
    PANELS.with_borrow_mut(|panels| {
        panels.resize(group * kp * NR, 0);
        let mut c0 = cols.start;
        while c0 < cols.end {
            let c1 = (c0 + group * NR).min(cols.end);
            let used = &mut panels[..(c1 - c0).div_ceil(NR) * kp * NR];
            for (g, panel) in used.chunks_exact_mut(kp * NR).enumerate() {
                let start = c0 + g * NR;
                pack_panel_pairs(w, k, start, (c1 - start).min(NR), panel);
            }
            // SAFETY: the caller's promises; `used` holds the panels of columns c0..c1.
            unsafe { blocks_against_panels(x_blocks, m, kp, used, c0..c1, sink) };
            c0 = c1;
        }
    });
}

/// Every 8-row block of `x` (`x_blocks`, packed by [`pack_x_pairs`]) against consecutive
/// panels (`[kp][32]` pairs each) holding the output columns `cols`, into `sink`: the loop
/// shared by the per-call packing above and the panels stored at load
/// ([`super::gemm_panels`]).
///
/// # Safety
/// The CPU has AVX512-BF16; `x_blocks` holds `m.div_ceil(8) * kp * 8` pairs and `panels`
/// `cols.len().div_ceil(32)` panels; the calling task owns `cols`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn blocks_against_panels(
    x_blocks: &[u32],
    m: usize,
    kp: usize,
    panels: &[u32],
    cols: Range<usize>,
    sink: &impl Sink,
) {
    let mut r0 = 0;
    while r0 < m {
        let rows = (m - r0).min(MR);
        let xp = x_blocks[r0 * kp..].as_ptr();
        for (g, panel) in panels.chunks_exact(kp * NR).enumerate() {
            let start = cols.start + g * NR;
            let nc = (cols.end - start).min(NR);
            // SAFETY: the block at r0 holds kp * 8 pairs and the panel kp * 32; the CPU has
            // AVX512-BF16 (the caller's promise).
            let out = unsafe { micro_rows(rows, xp, kp, panel.as_ptr()) };
            // SAFETY: the calling task owns these columns; each (row, col) is put once.
            unsafe { super::gemm_packed::emit(&out, rows, nc, r0, start, sink) };
        }
        r0 += rows;
    }
}

/// Two bf16 values as the `u32` a pair broadcast or panel element holds: `lo` in the low half
/// (the element `vdpbf16ps` multiplies first).
#[inline(always)]
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

/// `x` (`[m, k]`, `k` even) rounded to bf16 in blocks of 8 rows, each laid out `[k/2][8]`
/// pairs (the last block padded with zeros). Writes into `out` (resized).
pub(crate) fn pack_x_pairs(x: &[f32], m: usize, k: usize, out: &mut Vec<u32>) {
    let kp = k / 2;
    out.clear();
    out.resize(m.div_ceil(MR) * kp * MR, 0);
    let mut row = vec![bf16::ZERO; k];
    for (b, block) in out.chunks_exact_mut(kp * MR).enumerate() {
        for i in 0..MR.min(m - b * MR) {
            round_row(&x[(b * MR + i) * k..][..k], &mut row);
            for (p, two) in row.chunks_exact(2).enumerate() {
                block[p * MR + i] = pair(two[0], two[1]);
            }
        }
    }
}

/// `x` (`[m, k]`) rounded to bf16 (nearest even), row-major: the form
/// [`matmul_nt_rows_bf16`] reads.
pub(crate) fn round_rows(x: &[f32], m: usize, k: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; m * k];
    if k > 0 {
        for (row, dst) in x[..m * k].chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            round_row(row, dst);
        }
    }
    out
}

/// `out ← row` rounded to bf16 (nearest even), 32 values per instruction where the CPU
/// converts in hardware.
fn round_row(row: &[f32], out: &mut [bf16]) {
    assert_eq!(row.len(), out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_bf16_dot() {
        // SAFETY: AVX512-BF16 detected; equal lengths asserted.
        done = unsafe { round_row_avx512(row, out) };
    }
    for (o, &v) in out[done..].iter_mut().zip(&row[done..]) {
        *o = bf16::from_f32(v);
    }
}

/// The whole blocks of 32 of [`round_row`] with `vcvtne2ps2bf16`; returns how many values it
/// rounded.
///
/// # Safety
/// The CPU has AVX512-BF16; `out` is as long as `row`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_row_avx512(row: &[f32], out: &mut [bf16]) -> usize {
    use std::arch::x86_64::*;
    let blocks = row.len() / 32 * 32;
    for (src, dst) in row[..blocks].chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        // SAFETY: 32 readable floats at src, 32 writable bf16 (64 bytes) at dst; __m512bh is
        // 64 bytes.
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr());
            let hi = _mm512_loadu_ps(src.as_ptr().add(16));
            let packed = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                dst.as_mut_ptr() as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(packed),
            );
        }
    }
    blocks
}

/// Weight rows `c0..c0 + nc` as `[k/2][32]` pairs (missing columns zero).
pub(super) fn pack_panel_pairs(w: &[bf16], k: usize, c0: usize, nc: usize, panel: &mut [u32]) {
    let kp = k / 2;
    for j in 0..NR {
        if j < nc {
            let row = &w[(c0 + j) * k..][..k];
            for (p, two) in row.chunks_exact(2).enumerate() {
                panel[p * NR + j] = pair(two[0], two[1]);
            }
        } else {
            for p in 0..kp {
                panel[p * NR + j] = 0;
            }
        }
    }
}

/// [`micro`] for `rows` (1..=8) rows.
///
/// # Safety
/// As for [`micro`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn micro_rows(rows: usize, x: *const u32, kp: usize, panel: *const u32) -> [[f32; NR]; MR] {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            1 => micro::<1>(x, kp, panel),
            2 => micro::<2>(x, kp, panel),
            3 => micro::<3>(x, kp, panel),
            4 => micro::<4>(x, kp, panel),
            5 => micro::<5>(x, kp, panel),
            6 => micro::<6>(x, kp, panel),
            7 => micro::<7>(x, kp, panel),
            _ => micro::<8>(x, kp, panel),
        }
    }
}

/// The 8×32 microkernel for `R` rows of one packed block of `x` (`[kp][8]` pairs) against
/// one panel (`[kp][32]` pairs): `out[i][j] = Σ_p x[p][i] · panel[p][j]` over pairs.
///
/// # Safety
/// `x..x + 8*kp` and `panel..panel + 32*kp` readable; the CPU has AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro<const R: usize>(x: *const u32, kp: usize, panel: *const u32) -> [[f32; NR]; MR] {
    use std::arch::x86_64::*;
    let bh = |v: __m512i| {
        // SAFETY: __m512i and __m512bh are both 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // With 1 or 2 rows, 2R chains of sums would wait on the instruction's latency: odd
    // pairs go to a second set (registers to spare there).
    let mut odd = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY (whole body): p < kp keeps every x and panel read inside the bounds above.
    unsafe {
        let step = |p: usize, acc: &mut [[__m512; 2]; R]| {
            let b0 = bh(_mm512_loadu_si512(panel.add(p * NR) as *const __m512i));
            let b1 = bh(_mm512_loadu_si512(panel.add(p * NR + 16) as *const __m512i));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = bh(_mm512_set1_epi32(*x.add(p * MR + i) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], xv, b0);
                a[1] = _mm512_dpbf16_ps(a[1], xv, b1);
            }
        };
        let mut p = 0;
        if R <= 2 {
            while p + 2 <= kp {
                step(p, &mut acc);
                step(p + 1, &mut odd);
                p += 2;
            }
        }
        while p < kp {
            step(p, &mut acc);
            p += 1;
        }
        if R <= 2 {
            for (a, o) in acc.iter_mut().zip(&odd) {
                a[0] = _mm512_add_ps(a[0], o[0]);
                a[1] = _mm512_add_ps(a[1], o[1]);
            }
        }
        let mut out = [[0f32; NR]; MR];
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
        }
        out
    }
}

/// The `vdpbf16ps` tile.
struct Bf16Dot;

#[cfg(target_arch = "x86_64")]
impl RowTile for Bf16Dot {
    type X = bf16;
    type W = bf16;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<S: Sink, const R: usize, const C: usize>(
        x: *const bf16,
        w: *const bf16,
        k: usize,
        r0: usize,
        c0: usize,
        sink: &S,
    ) {
        use std::arch::x86_64::*;
        let load = |p: *const half::bf16| {
            // SAFETY: the caller's bounds (below); __m512i and __m512bh are both 64 bytes.
            unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
            }
        };
        // SAFETY (whole body): loads read inside rows of length k from x / w (`p + 2 * STEP
        // <= k` or `p + STEP <= k` in the vector loops, `q < k` in the tail).
        unsafe {
            // One weight row after the other, each read front to back: a single sequential
            // stream, asked for ahead of the loads ([`prefetch_ahead`]).
            for j in 0..C {
                let wr = w.add(j * k);
                // two chains of sums per row of x
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                let mut p = 0;
                while p + 2 * STEP <= k {
                    // two cache lines of weights per step (2 × 32 bf16)
                    prefetch_ahead(wr.add(p) as *const u8);
                    prefetch_ahead(wr.add(p + STEP) as *const u8);
                    let (w0, w1) = (load(wr.add(p)), load(wr.add(p + STEP)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        a[0] = _mm512_dpbf16_ps(a[0], load(x.add(i * k + p)), w0);
                        a[1] = _mm512_dpbf16_ps(a[1], load(x.add(i * k + p + STEP)), w1);
                    }
                    p += 2 * STEP;
                }
                if p + STEP <= k {
                    let w0 = load(wr.add(p));
                    for (i, a) in acc.iter_mut().enumerate() {
                        a[0] = _mm512_dpbf16_ps(a[0], load(x.add(i * k + p)), w0);
                    }
                    p += STEP;
                }
                for (i, a) in acc.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
                    for q in p..k {
                        s += (*x.add(i * k + q)).to_f32() * (*wr.add(q)).to_f32();
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

    /// The bf16 dot tiles against the AVX2 tiles (the CPU twin) on bf16-exact `x` (what a bf16
    /// run feeds them), on shapes off the step, the tile and the row group. Run wherever the
    /// CPU has the instruction, whether or not the probe lets the engine use it.
    #[test]
    fn bf16_dot_tiles_match_avx2() {
        if !has_bf16_dot() {
            eprintln!("skipped: no AVX512-BF16 here");
            return;
        }
        for &(m, k, n) in FEW_ROWS_SHAPES {
            let mut seed = (m * 7919 + k * 31 + n) as u64;
            let x: Vec<f32> = (0..m * k)
                .map(|_| bf16::from_f32(lcg(&mut seed)).to_f32())
                .collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let cols = 1..n;
            let xb = round_rows(&x, m, k);
            // SAFETY: the kernel is available (checked above); operand sizes match.
            unsafe {
                matmul_nt_rows_bf16(
                    &xb,
                    m,
                    k,
                    &w,
                    cols.clone(),
                    &StoreSink::new(&sa, n, 0, None),
                )
            };
            matmul_nt_cols_avx2(&x, m, k, &w, cols, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            assert_agree_outside_column_0(&a, &b, m, k, n);
        }
    }

    /// The rounding of [`round_row`] (in hardware where the CPU has it) is half's
    /// nearest-even rounding, on a row longer than two blocks of 32 with an odd tail, values
    /// of every magnitude and exact ties; [`pack_x_pairs`] pairs the rounded values in order.
    #[test]
    fn rounding_is_nearest_even() {
        let mut seed = 7u64;
        let mut row: Vec<f32> = (0..71)
            .map(|i| lcg(&mut seed) * 10f32.powi(i % 7 - 3))
            .collect();
        // ties: 1 + 2^-8 rounds to 1 (even), 1 + 3 * 2^-8 to 1 + 2^-6
        row[3] = 1.0 + 1.0 / 256.0;
        row[4] = 1.0 + 3.0 / 256.0;
        let rounded = round_rows(&row, 1, 71);
        for (p, (got, &v)) in rounded.iter().zip(&row).enumerate() {
            assert_eq!(got.to_bits(), bf16::from_f32(v).to_bits(), "{p}");
        }
        let mut pairs = Vec::new();
        pack_x_pairs(&row[..70], 1, 70, &mut pairs);
        for p in 0..35 {
            assert_eq!(
                pairs[p * MR],
                pair(rounded[2 * p], rounded[2 * p + 1]),
                "{p}"
            );
        }
    }

    /// The packed bf16 dot kernel against the AVX2 tiles on bf16-exact `x`, on shapes off the
    /// 8-row block, the 32-column panel and the panel group.
    #[test]
    fn packed_bf16_dot_matches_avx2() {
        if !has_bf16_dot() {
            eprintln!("skipped: no AVX512-BF16 here");
            return;
        }
        for (m, k, n) in [(32, 64, 40), (33, 130, 97), (9, 2, 33), (64, 1024, 300)] {
            let mut seed = (m * 7919 + k * 31 + n) as u64;
            let x: Vec<f32> = (0..m * k)
                .map(|_| bf16::from_f32(lcg(&mut seed)).to_f32())
                .collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let cols = 1..n;
            let mut packed = Vec::new();
            pack_x_pairs(&x, m, k, &mut packed);
            // SAFETY: the kernel is available (checked above); k is even; sizes match.
            unsafe {
                matmul_nt_packed_bf16(
                    &packed,
                    m,
                    k,
                    &w,
                    cols.clone(),
                    &StoreSink::new(&sa, n, 0, None),
                )
            };
            matmul_nt_cols_avx2(&x, m, k, &w, cols, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            assert_agree_outside_column_0(&a, &b, m, k, n);
        }
    }
}

//! The many-rows case of [`super::gemm`] for bf16 weights on CPUs with AMX (AMX-TILE and
//! AMX-BF16: Sapphire Rapids and later Xeons): `x · Wᵀ` on the tile unit, where one
//! instruction (`tdpbf16ps`) does 16 × 16 × 32 multiply-adds, sixteen times what the two
//! 512-bit FMA ports do in the same cycles.
//!
//! Layout: the weights are read as checkpoints store them. Sixteen rows of `W` × 32 bf16 of
//! `k` (64 bytes each) are one "A" tile, loaded with `W`'s own row stride: no packing, no
//! widening. `x` is the "B" operand, which AMX wants pair-interleaved: row `p` of a B tile
//! holds, for each of 16 rows of `x`, the two bf16 `x[r][2p], x[r][2p + 1]`. So `x` is
//! rounded to bf16 and transposed by 32-bit pairs once per set of rows ([`pack_x`], made once
//! for all products that share the rows: [`super::gemm::PreparedRows`]), in blocks of 16
//! rows (the last one zero-padded). A tile product then adds 16 output columns × 16 rows of
//! dot products over 32 elements of `k` into an f32 accumulator tile; two A and two B tiles
//! feed four accumulators, so each tile load serves two products.
//!
//! Numerics: `x` is rounded to bf16 (to nearest even) and products are summed in f32 with
//! denormals flushed. In a bf16 run the activations between layers already are bf16, so for
//! the attention projections and the experts' gate and up this loses nothing; the experts'
//! f32 intermediate `act(gate) · up` is rounded once before the down projection, as
//! transformers' bf16 forward rounds it. Used by [`super::gemm::matmul_nt_cols`] for bf16
//! weights when `x` has at least [`AMX_MIN_ROWS`] rows, `k` is a multiple of 32 and
//! [`use_amx`] says the CPU and the OS allow it; columns past the last whole 16 take the
//! AVX-512 path.

use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use super::gemm::Sink;

/// Rows of `x` from which the AMX tiles replace the AVX-512 paths for bf16 weights.
pub const AMX_MIN_ROWS: usize = 4;
/// Elements of `k` per tile product (one 64-byte tile row of bf16).
pub const K_STEP: usize = 32;
/// Rows of `x` per B tile and output columns per A tile.
const TILE: usize = 16;

/// `arch_prctl` request for permission to use an extended state component.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
/// The AMX tile-data state component.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether the AMX tiles run here: the CPU has AMX-TILE, AMX-BF16 and AVX-512, Linux granted
/// this process the tile state, and the user did not set `MOE_INFER_NO_AMX` (decided once;
/// every reason not to use them is logged once).
pub fn use_amx() -> bool {
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| {
        if !cpu_has_amx_bf16() {
            if super::gemm_avx512::use_avx512() {
                eprintln!(
                    "moe-kernels: no AMX-BF16 on this CPU; bf16 prefill projections use AVX-512 FMA"
                );
            }
            return false;
        }
        if !super::gemm_avx512::use_avx512() {
            eprintln!("moe-kernels: AVX-512 is off, so the AMX tiles are too");
            return false;
        }
        if std::env::var_os("MOE_INFER_NO_AMX").is_some_and(|v| v != "0") {
            eprintln!("moe-kernels: MOE_INFER_NO_AMX is set; bf16 prefill projections use AVX-512 FMA");
            return false;
        }
        match request_tile_state() {
            Ok(()) => true,
            Err(why) => {
                eprintln!(
                    "moe-kernels: the OS did not grant AMX tile state ({why}); bf16 prefill projections use AVX-512 FMA"
                );
                false
            }
        }
    })
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
#[allow(unused_unsafe)]
fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only if the CPU has it.
        unsafe {
            if __cpuid(0).eax < 7 {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks Linux for the AMX tile-data state (required once per process before any tile
/// instruction, or it faults).
fn request_tile_state() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // SAFETY: arch_prctl with these arguments only changes this process's permissions.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("arch_prctl: {}", std::io::Error::last_os_error()))
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    Err("only Linux is supported".into())
}

/// The palette-1 tile configuration `ldtilecfg` reads: all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    const ALL_16X64: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };
}

/// `x` (`[m, k]` f32) rounded to bf16 and laid out as B tiles: blocks of 16 rows, each
/// `[k / 2][16]` pairs, pair `(p, r)` = `x[r][2p]` in the low half and `x[r][2p + 1]` in the
/// high half; rows past `m` are zero. Writes into `out` (resized).
pub fn pack_x(x: &[f32], m: usize, k: usize, out: &mut Vec<u32>) {
    assert!(k.is_multiple_of(2) && x.len() >= m * k);
    let blocks = m.div_ceil(TILE);
    let half = k / 2;
    out.resize(blocks * half * TILE, 0);
    for (b, block) in out.chunks_exact_mut(half * TILE).enumerate() {
        let rows = TILE.min(m - b * TILE);
        #[cfg(target_arch = "x86_64")]
        if super::gemm_avx512::use_avx512() && k.is_multiple_of(K_STEP) {
            // SAFETY: AVX-512 detected; the block's rows of x and the block are in bounds.
            unsafe { pack_block_avx512(&x[b * TILE * k..], rows, k, block) };
            continue;
        }
        for r in 0..TILE {
            for p in 0..half {
                block[p * TILE + r] = if r < rows {
                    let row = &x[(b * TILE + r) * k..];
                    pair(row[2 * p], row[2 * p + 1])
                } else {
                    0
                };
            }
        }
    }
}

/// Two f32 rounded to bf16 (to nearest even), `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
}

/// [`pack_x`] for one block of `rows` (≤ 16) rows with AVX-512: per 32 elements of `k`, each
/// row's 32 floats become 16 pairs in one register (rounded to nearest even with integer
/// ops), and the 16 × 16 pairs are transposed in registers.
///
/// # Safety
/// AVX-512 F; `x` holds `rows * k` floats, `block` `k / 2 * 16` pairs, `k % 32 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_block_avx512(x: &[f32], rows: usize, k: usize, block: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(rows <= TILE && x.len() >= rows * k && block.len() >= k / 2 * TILE);
    // SAFETY (whole body): reads stay in rows < rows of length k; writes in block.
    unsafe {
        let mut kk = 0;
        while kk < k {
            let mut r = [_mm512_setzero_si512(); TILE];
            for (i, reg) in r.iter_mut().enumerate().take(rows) {
                let p = x.as_ptr().add(i * k + kk);
                let lo = round_to_bf16(_mm512_loadu_ps(p));
                let hi = round_to_bf16(_mm512_loadu_ps(p.add(16)));
                // Elements 0..16 and 16..32 as bf16 in the low 16 bits of each lane: pack
                // them into one register of 32 bf16 in order (pairs of neighbours per lane).
                let both = _mm512_packus_epi32(lo, hi);
                // packus interleaves the 128-bit lanes of lo and hi: put them back in order.
                *reg = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), both);
            }
            let t = transpose16(r);
            let dst = block.as_mut_ptr().add(kk / 2 * TILE);
            for (p, v) in t.iter().enumerate() {
                _mm512_storeu_si512(dst.add(p * TILE) as *mut __m512i, *v);
            }
            kk += K_STEP;
        }
    }
}

/// Each f32 lane rounded to bf16 (to nearest even; NaN stays NaN), in the lane's low 16 bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn round_to_bf16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: register-only AVX-512 F operations (the caller's target features).
    unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        // A NaN keeps its top bits, with the quiet bit set.
        let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
        _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, quiet), 16)
    }
}

/// Transposes a 16 × 16 matrix of 32-bit elements held one row per register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // SAFETY: register-only AVX-512 F operations (the caller's target features).
    unsafe {
        // 2 × 2 blocks of elements, then 4 × 4 inside each 128-bit lane.
        let mut a = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        // b[4g + j], lane l, holds rows 4g..4g+4 at column 4l + j. Now the 128-bit lanes:
        // first pair groups g and g + 1 (lanes 0, 2 of each / 1, 3), then g and g + 2.
        let mut c = [_mm512_setzero_si512(); 16];
        for g in [0, 2] {
            for j in 0..4 {
                let (x, y) = (b[4 * g + j], b[4 * (g + 1) + j]);
                c[4 * g + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x, y);
                c[4 * (g + 1) + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x, y);
            }
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for h in 0..2 {
            for j in 0..4 {
                let (x, y) = (c[4 * h + j], c[4 * (h + 2) + j]);
                out[4 * h + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x, y);
                out[4 * (h + 2) + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x, y);
            }
        }
        out
    }
}

/// `sink ← x · W[cols]ᵀ` for bf16 `W` on the AMX tiles, `x` given as [`pack_x`] packed its
/// `m` rows of `k`; returns the columns it left (the last `cols.len() % 16`), for the caller
/// to run on another path.
///
/// # Safety
/// [`use_amx`] must have returned true; `packed` holds `m` rows packed by [`pack_x`] and `w`
/// `cols.end * k` elements; `k % 32 == 0`.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_amx<S: Sink>(
    packed: &[u32],
    m: usize,
    k: usize,
    w: &[bf16],
    cols: Range<usize>,
    sink: &S,
) -> Range<usize> {
    let blocks = m.div_ceil(TILE);
    assert!(
        k.is_multiple_of(K_STEP)
            && packed.len() >= blocks * (k / 2) * TILE
            && w.len() >= cols.end * k
    );
    let whole = cols.start + (cols.len() / TILE) * TILE;
    if whole == cols.start || m == 0 {
        return cols;
    }
    {
        let config = TileConfig::ALL_16X64;
        // SAFETY: AMX is granted (the caller's promise); the config is a valid palette 1.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack)) };
        let mut acc = [[0f32; TILE * TILE]; 4];
        let mut c = cols.start;
        while c < whole {
            let na = if whole - c >= 2 * TILE { 2 } else { 1 };
            let mut b = 0;
            while b < blocks {
                let nb = (blocks - b).min(2);
                let a = w[c * k..].as_ptr();
                let xb = packed[b * (k / 2) * TILE..].as_ptr();
                // SAFETY: na × 16 rows of w from c and nb blocks of packed x from b exist;
                // tiles are configured above.
                unsafe {
                    match (na, nb) {
                        (2, 2) => products::<2, 2>(a, k, xb, &mut acc),
                        (2, _) => products::<2, 1>(a, k, xb, &mut acc),
                        (_, 2) => products::<1, 2>(a, k, xb, &mut acc),
                        _ => products::<1, 1>(a, k, xb, &mut acc),
                    }
                }
                for ai in 0..na {
                    for bi in 0..nb {
                        let tile = &acc[ai * 2 + bi];
                        let r0 = (b + bi) * TILE;
                        let rows = TILE.min(m - r0);
                        for (i, out) in tile.chunks_exact(TILE).enumerate() {
                            for (j, &v) in out.iter().take(rows).enumerate() {
                                // SAFETY: this task owns columns `cols`; each (row, col) is
                                // emitted once.
                                unsafe { sink.put(r0 + j, c + ai * TILE + i, v) };
                            }
                        }
                    }
                }
                b += nb;
            }
            c += na * TILE;
        }
        // SAFETY: releases this thread's tile state (no tile is used after this).
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
    whole..cols.end
}

/// `NA` A tiles (16 rows of `w` each, from `a`) × `NB` B tiles (16 packed rows of `x` each,
/// from `xb`) over all of `k`; accumulator `2 × ai + bi` is stored to `acc[2 × ai + bi]` as
/// `[column][row]`.
///
/// # Safety
/// Tiles configured 16 × 64 bytes; `a` has `NA * 16` rows of `k` bf16; `xb` has `NB` packed
/// blocks of `k / 2 * 16` pairs; `k % 32 == 0`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn products<const NA: usize, const NB: usize>(
    a: *const bf16,
    k: usize,
    xb: *const u32,
    acc: &mut [[f32; TILE * TILE]; 4],
) {
    use std::arch::asm;
    let stride = k * 2;
    let block = k / 2 * TILE;
    // SAFETY (whole body): every tile load reads 16 rows of 64 bytes inside the operands
    // described above; the stores write the four 1 KiB accumulators of `acc`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let mut kk = 0;
        while kk < k {
            let a0 = a.add(kk);
            // The second A / B tile may not exist (NA or NB is 1): wrapping arithmetic, and
            // the asm below reads it only when it does.
            let a1 = a.wrapping_add(TILE * k + kk);
            let b0 = xb.add(kk / 2 * TILE);
            let b1 = xb.wrapping_add(block + kk / 2 * TILE);
            match (NA, NB) {
                (2, 2) => asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {t}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {t}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                    s = in(reg) stride, t = in(reg) 64usize,
                    options(nostack, readonly)
                ),
                (2, _) => asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {t}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                    s = in(reg) stride, t = in(reg) 64usize,
                    options(nostack, readonly)
                ),
                (_, 2) => asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {t}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {t}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                    s = in(reg) stride, t = in(reg) 64usize,
                    options(nostack, readonly)
                ),
                _ => asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {t}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    a0 = in(reg) a0, b0 = in(reg) b0,
                    s = in(reg) stride, t = in(reg) 64usize,
                    options(nostack, readonly)
                ),
            }
            kk += K_STEP;
        }
        asm!(
            "tilestored [{c0} + {t}*1], tmm0",
            "tilestored [{c1} + {t}*1], tmm1",
            "tilestored [{c2} + {t}*1], tmm2",
            "tilestored [{c3} + {t}*1], tmm3",
            c0 = in(reg) acc[0].as_mut_ptr(), c1 = in(reg) acc[1].as_mut_ptr(),
            c2 = in(reg) acc[2].as_mut_ptr(), c3 = in(reg) acc[3].as_mut_ptr(),
            t = in(reg) 64usize,
            options(nostack)
        );
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::gemm::{matmul_nt_cols_avx2, StoreSink};
    use super::super::shared::SharedMut;
    use super::super::test_util::{assert_agree_outside_column_0, lcg};
    use super::*;

    #[test]
    fn packing_matches_the_scalar_layout() {
        for (m, k) in [(1, 32), (5, 64), (16, 96), (17, 32), (40, 128)] {
            let mut seed = (m * 131 + k) as u64;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 7.0).collect();
            let mut fast = Vec::new();
            pack_x(&x, m, k, &mut fast);
            let half = k / 2;
            assert_eq!(fast.len(), m.div_ceil(TILE) * half * TILE);
            for b in 0..m.div_ceil(TILE) {
                for p in 0..half {
                    for r in 0..TILE {
                        let row = b * TILE + r;
                        let want = if row < m {
                            pair(x[row * k + 2 * p], x[row * k + 2 * p + 1])
                        } else {
                            0
                        };
                        let got = fast[(b * half + p) * TILE + r];
                        assert_eq!(got, want, "{m}x{k} block {b} pair {p} row {r}");
                    }
                }
            }
        }
    }

    /// The AMX tiles against the AVX2 tiles on `x` rounded to bf16 (so both see the same
    /// inputs), on shapes off the tile in rows and columns.
    #[test]
    fn amx_tiles_match_avx2_on_bf16_inputs() {
        if !use_amx() {
            eprintln!("skipped: no AMX here");
            return;
        }
        for (m, k, n) in [
            (1, 32, 16),
            (4, 64, 40),
            (16, 1024, 64),
            (17, 96, 33),
            (33, 256, 100),
            (64, 128, 48),
        ] {
            let mut seed = (m * 7919 + k * 31 + n) as u64;
            let x: Vec<f32> = (0..m * k)
                .map(|_| bf16::from_f32(lcg(&mut seed)).to_f32())
                .collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let cols = 1..n;
            // SAFETY: AMX granted above; operand sizes match; k % 32 == 0.
            let mut packed = Vec::new();
            pack_x(&x, m, k, &mut packed);
            let left = unsafe {
                matmul_nt_amx(
                    &packed,
                    m,
                    k,
                    &w,
                    cols.clone(),
                    &StoreSink::new(&sa, n, 0, None),
                )
            };
            assert_eq!(left.len(), (n - 1) % TILE);
            matmul_nt_cols_avx2(&x, m, k, &w, left, &StoreSink::new(&sa, n, 0, None));
            matmul_nt_cols_avx2(&x, m, k, &w, cols, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            assert_agree_outside_column_0(&a, &b, m, k, n);
        }
    }
}

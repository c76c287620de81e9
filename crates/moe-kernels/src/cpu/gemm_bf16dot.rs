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
//! Used for bf16 weights with fewer rows than the packed path takes; `MOE_INFER_NO_BF16_DOT=1`
//! turns it off (the widening kernel then runs).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use super::gemm::Sink;
use super::gemm_avx512::{tiles, RowTile, STEP};

/// Whether the bf16 dot kernel runs here: AVX-512 is in use, the CPU has AVX512-BF16 and the
/// user did not set `MOE_INFER_NO_BF16_DOT` (checked once; the choice is logged once when it
/// is off on a CPU that has the instruction).
pub fn use_bf16_dot() -> bool {
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        if !has || !super::gemm_avx512::use_avx512() {
            return false;
        }
        if std::env::var_os("MOE_INFER_NO_BF16_DOT").is_some_and(|v| v != "0") {
            eprintln!(
                "moe-kernels: MOE_INFER_NO_BF16_DOT is set; bf16 decode projections widen to f32"
            );
            return false;
        }
        true
    })
}

thread_local! {
    /// Per-thread buffer for `x` rounded to bf16 (no allocation per call once warm).
    static X_BF16: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// `sink ← x · W[cols]ᵀ` for `x` `[m, k]` with few rows and bf16 weights.
///
/// # Safety
/// [`use_bf16_dot`] must have returned true; `x` must hold `m * k` and `w` `cols.end * k`
/// elements.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_nt_rows_bf16(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    cols: Range<usize>,
    sink: &impl Sink,
) {
    assert!(x.len() >= m * k && w.len() >= cols.end * k);
    X_BF16.with_borrow_mut(|xb| {
        xb.clear();
        xb.extend(x[..m * k].iter().map(|&v| bf16::from_f32(v)));
        // SAFETY: forwarded from the caller; xb holds m * k elements.
        unsafe { tiles::<Bf16Dot, _>(xb, m, k, w, cols, sink) };
    });
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
    ) -> usize {
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
            // stream, which the hardware prefetcher follows (see the module notes).
            for j in 0..C {
                let wr = w.add(j * k);
                // two chains of sums per row of x
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                let mut p = 0;
                while p + 2 * STEP <= k {
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
        C
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::gemm::{matmul_nt_cols_avx2, StoreSink};
    use super::super::shared::SharedMut;
    use super::super::test_util::{assert_agree_outside_column_0, lcg};
    use super::*;

    /// The bf16 dot tiles against the AVX2 tiles (the CPU twin) on bf16-exact `x` (what a bf16
    /// run feeds them), on shapes off the step, the tile and the row block.
    #[test]
    fn bf16_dot_tiles_match_avx2() {
        if !use_bf16_dot() {
            eprintln!("skipped: no AVX512-BF16 here");
            return;
        }
        for (m, k, n) in [
            (1, 32, 8),
            (1, 1024, 300),
            (1, 33, 9),
            (2, 256, 13),
            (3, 100, 7),
            (7, 1000, 41),
            (1, 5, 3),
            (16, 160, 150),
            (31, 96, 200),
        ] {
            let mut seed = (m * 7919 + k * 31 + n) as u64;
            let x: Vec<f32> = (0..m * k)
                .map(|_| bf16::from_f32(lcg(&mut seed)).to_f32())
                .collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            let (sa, sb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
            let cols = 1..n;
            // SAFETY: the kernel is available (checked above); operand sizes match.
            unsafe {
                matmul_nt_rows_bf16(&x, m, k, &w, cols.clone(), &StoreSink::new(&sa, n, 0, None))
            };
            matmul_nt_cols_avx2(&x, m, k, &w, cols, &StoreSink::new(&sb, n, 0, None));
            drop((sa, sb));
            assert_agree_outside_column_0(&a, &b, m, k, n);
        }
    }
}

//! f32 → bf16 rounding of whole buffers (the kernels' f32 results handed back as bf16
//! tensors), in one vectorized pass instead of `half::bf16::from_f32` element by element (a
//! branchy scalar conversion: ~3 ms for a 16-sequence decode step's 2.4 M logits).
//!
//! Rounding is `half`'s: to nearest, ties to even, a NaN kept as a quiet NaN, subnormals kept.

use half::bf16;

use super::pool::{for_each_chunk_mut, ELEMENTWISE_CHUNK};

/// f32 bits to bf16 bits, rounded to nearest, ties to even; a NaN stays a NaN (quieted), as
/// `half::bf16::from_f32` does.
#[inline(always)]
pub(crate) fn round_bits(bits: u32) -> u16 {
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = ((bits >> 16) | 0x0040) as u16;
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// `v` rounded to bf16, split over the pool when it is long.
pub fn to_bf16_vec(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    for_each_chunk_mut(&mut out, ELEMENTWISE_CHUNK, |start, o| {
        round_slice(&v[start..start + o.len()], o)
    });
    out
}

/// `dst[i] = src[i]` rounded to bf16.
pub fn round_slice(src: &[f32], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected just above.
        unsafe { round_slice_avx2(src, dst) };
        return;
    }
    round_slice_body(src, dst);
}

/// [`round_slice_body`] compiled for AVX2 (eight lanes).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_slice_avx2(src: &[f32], dst: &mut [bf16]) {
    round_slice_body(src, dst);
}

/// The rounding as lane operations the compiler vectorizes.
#[inline(always)]
fn round_slice_body(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(round_bits(s.to_bits()));
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::lcg_bits;
    use super::*;

    /// Bit-equal with `half` on every class of f32 (NaN payloads aside), across the split.
    #[test]
    fn rounding_matches_half() {
        let mut s = 7u64;
        let mut v: Vec<f32> = (0..2 * ELEMENTWISE_CHUNK + 3)
            .map(|_| f32::from_bits((lcg_bits(&mut s) >> 32) as u32))
            .collect();
        // Ties both ways, the largest finite values, infinities, signed zeros.
        v.extend([
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::NAN,
        ]);
        let ours = to_bf16_vec(&v);
        for (i, (&x, o)) in v.iter().zip(&ours).enumerate() {
            let want = bf16::from_f32(x);
            if want.is_nan() {
                assert!(o.is_nan(), "element {i}");
            } else {
                assert_eq!(o.to_bits(), want.to_bits(), "element {i}: {x:e}");
            }
        }
    }
}

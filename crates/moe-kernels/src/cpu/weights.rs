//! Weight element types the CPU kernels read, each widened to f32 in registers: the weights
//! stay in memory in their stored type (bf16 moves half the bytes of f32). Each type says how
//! to widen 8 elements (AVX2) and 32 (AVX-512, in the lane order that needs no shuffle).

use half::bf16;

/// A weight element the kernels can widen to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// The value as f32 (scalar path and tails).
    fn to_f32(self) -> f32;

    /// Loads 8 consecutive elements at `p`, widened to f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable and the CPU must support AVX2 (callers are
    /// `#[target_feature(enable = "avx2,fma")]` functions reached after runtime detection).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Loads 32 consecutive elements at `p`, widened to f32 as two vectors `(a, b)` in the
    /// order [`WeightElem::split_x`] gives `x`: `Σ x·w` over the 32 is `x_a·a + x_b·b`.
    ///
    /// # Safety
    /// `p..p + 32` must be readable and the CPU must support AVX-512 F and BW (callers are
    /// `#[target_feature(enable = "avx512f,avx512bw")]` functions reached after detection).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load32_split(
        p: *const Self,
    ) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512);

    /// Whether [`WeightElem::split_x`] reorders `x` (false: the kernels use `x` as it is).
    const SPLITS_X: bool = false;

    /// Writes `x` reordered for [`WeightElem::load32_split`]: each whole block of 32 as its
    /// two halves' order, a tail shorter than 32 unchanged. The default keeps `x` as it is.
    fn split_x(x: &[f32], out: &mut [f32]) {
        out.copy_from_slice(x);
    }

    /// `w` itself when the elements are bf16 (the AMX tiles read only bf16), else `None`.
    fn as_bf16(w: &[Self]) -> Option<&[bf16]> {
        let _ = w;
        None
    }

    /// `w` itself when the elements are int8 (the VNNI tiles read only int8), else `None`.
    fn as_i8(w: &[Self]) -> Option<&[i8]> {
        let _ = w;
        None
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable f32 and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_split(
        p: *const Self,
    ) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable f32 and AVX-512 F.
        unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) }
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) and AVX2. A bf16 is the
        // top half of an f32: zero-extend each 16-bit lane to 32 bits and shift it up.
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_split(
        p: *const Self,
    ) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable bf16 (64 bytes) and AVX-512 F/BW. Each
        // 32-bit lane holds two bf16: the even element in the low half (shift it up), the
        // odd one in the high half (clear the low half). No shuffle.
        unsafe {
            let raw = _mm512_loadu_si512(p as *const __m512i);
            let even = _mm512_slli_epi32(raw, 16);
            let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xFFFF_0000_u32 as i32));
            (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
        }
    }

    const SPLITS_X: bool = true;

    fn as_bf16(w: &[Self]) -> Option<&[bf16]> {
        Some(w)
    }

    /// Even elements of each block of 32 first, then the odd ones (the lanes of
    /// [`WeightElem::load32_split`]).
    fn split_x(x: &[f32], out: &mut [f32]) {
        let blocks = x.len() / 32 * 32;
        for (src, dst) in x[..blocks]
            .chunks_exact(32)
            .zip(out[..blocks].chunks_exact_mut(32))
        {
            for l in 0..16 {
                dst[l] = src[2 * l];
                dst[16 + l] = src[2 * l + 1];
            }
        }
        out[blocks..].copy_from_slice(&x[blocks..]);
    }
}

impl WeightElem for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }

    fn as_i8(w: &[Self]) -> Option<&[i8]> {
        Some(w)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bytes and AVX2: sign-extend each byte to
        // 32 bits and convert (exact: |v| <= 128).
        unsafe {
            let raw = _mm_loadl_epi64(p as *const __m128i);
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_split(
        p: *const Self,
    ) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable bytes and AVX-512 F: sign-extend 16 bytes
        // at a time to 32 bits and convert (exact).
        unsafe {
            let lo = _mm_loadu_si128(p as *const __m128i);
            let hi = _mm_loadu_si128(p.add(16) as *const __m128i);
            (
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_widening_is_exact() {
        for v in [0.0f32, -1.5, 3.140625, 1e-20, -65504.0] {
            let b = bf16::from_f32(v);
            assert_eq!(b.to_f32(), WeightElem::to_f32(b));
        }
    }
}

//! Weight element types the CPU kernels read, each widened to f32 in registers: the weights
//! stay in memory in their stored type (bf16 moves half the bytes of f32).

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
}

impl WeightElem for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
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

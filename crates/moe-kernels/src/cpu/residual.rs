//! The residual add of a decoder's residual stream, `x + sublayer(x)`, twice a layer.
//!
//! Candle's CPU add widens and narrows bf16 through out-of-line calls per eight elements:
//! about 3 ns an element on the bench machine, ~9 ms of a 16-sequence decode step (96 adds of
//! 16 × 2048). Here the sum is one vectorized pass, with the same rounding: the f32 sum of the
//! two elements, rounded to nearest-even bf16 (quiet NaN kept), bit-equal to candle's and
//! `half`'s (subnormals kept, as `half` does; candle's AVX512-BF16 path flushes them).

use candle_core::{DType, Tensor};
use half::bf16;
use moe_core::Result;

use super::bf16_round::round_bits;
use super::pool::{for_each_chunk_mut, ELEMENTWISE_CHUNK};
use super::tensors::slice_of;

/// `x + y` for tensors of one shape and dtype. Contiguous bf16 or f32 CPU tensors take the
/// vectorized loop of this module; anything else (another device or dtype, a strided view,
/// a broadcast) is candle's add.
pub fn residual_add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.shape() == y.shape() && x.dtype() == y.dtype() {
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        match x.dtype() {
            DType::BF16 => {
                if let (Some(a), Some(b)) = (slice_of::<bf16>(&xs, xl), slice_of::<bf16>(&ys, yl)) {
                    let mut out = vec![bf16::ZERO; a.len()];
                    add_parallel(a, b, &mut out, add_bf16);
                    return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
                }
            }
            DType::F32 => {
                if let (Some(a), Some(b)) = (slice_of::<f32>(&xs, xl), slice_of::<f32>(&ys, yl)) {
                    let mut out = vec![0f32; a.len()];
                    add_parallel(a, b, &mut out, add_f32);
                    return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
                }
            }
            _ => {}
        }
    }
    Ok((x + y)?)
}

/// `out = kernel(a, b)` split over the pool when it is long.
fn add_parallel<T: Send + Sync>(a: &[T], b: &[T], out: &mut [T], kernel: fn(&[T], &[T], &mut [T])) {
    assert!(a.len() == out.len() && b.len() == out.len());
    for_each_chunk_mut(out, ELEMENTWISE_CHUNK, |start, o| {
        let span = start..start + o.len();
        kernel(&a[span.clone()], &b[span], o)
    });
}

/// `out[i] = a[i] + b[i]` in bf16 (f32 sum, rounded to nearest-even).
pub fn add_bf16(a: &[bf16], b: &[bf16], out: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected just above.
        unsafe { add_bf16_avx2(a, b, out) };
        return;
    }
    add_bf16_body(a, b, out);
}

/// [`add_bf16_body`] compiled for AVX2 (eight lanes).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_bf16_avx2(a: &[bf16], b: &[bf16], out: &mut [bf16]) {
    add_bf16_body(a, b, out);
}

/// The bf16 add as integer and f32 lane operations the compiler vectorizes.
#[inline(always)]
fn add_bf16_body(a: &[bf16], b: &[bf16], out: &mut [bf16]) {
    assert!(a.len() == out.len() && b.len() == out.len());
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        let sum = widen(x) + widen(y);
        *o = bf16::from_bits(round_bits(sum.to_bits()));
    }
}

/// bf16 to f32: the bf16 bits are the f32's top half.
#[inline(always)]
fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// `out[i] = a[i] + b[i]` in f32.
pub fn add_f32(a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(a.len() == out.len() && b.len() == out.len());
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::lcg_bits;
    use super::*;
    use candle_core::Device;

    fn bf16_values(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed;
        // Any bit pattern: normals, subnormals, infinities and NaNs all occur.
        (0..n)
            .map(|_| bf16::from_bits((lcg_bits(&mut s) >> 48) as u16))
            .collect()
    }

    /// Bit-equal with candle's add (and with `half`'s rounding) on every bit pattern class,
    /// NaN payloads aside (both sides give a NaN) and subnormals (candle may flush them).
    #[test]
    fn bf16_add_matches_candle_bit_for_bit() {
        let dev = Device::Cpu;
        // Below and above the parallel split.
        for n in [1, 7, 33, 16 * 2048, 2 * ELEMENTWISE_CHUNK + 5] {
            let (a, b) = (bf16_values(n, 1 + n as u64), bf16_values(n, 99 + n as u64));
            let x = Tensor::from_vec(a.clone(), n, &dev).unwrap();
            let y = Tensor::from_vec(b.clone(), n, &dev).unwrap();
            let ours: Vec<bf16> = residual_add(&x, &y).unwrap().to_vec1().unwrap();
            let candle: Vec<bf16> = (&x + &y).unwrap().to_vec1().unwrap();
            for i in 0..n {
                let half_sum = bf16::from_f32(a[i].to_f32() + b[i].to_f32());
                if half_sum.is_nan() {
                    assert!(ours[i].is_nan() && candle[i].is_nan(), "element {i}");
                } else {
                    assert_eq!(ours[i].to_bits(), half_sum.to_bits(), "element {i} vs half");
                    // Candle's AVX512-BF16 conversions treat subnormals as zero; ours, like
                    // `half`, keep them.
                    let subnormal = [a[i], b[i], half_sum]
                        .iter()
                        .any(|v| v.to_f32().is_subnormal());
                    if !subnormal {
                        assert_eq!(ours[i].to_bits(), candle[i].to_bits(), "element {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn f32_add_and_the_fallbacks_equal_candle() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let y = (x.clone() * 0.5).unwrap();
        let want: Vec<f32> = (&x + &y).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = residual_add(&x, &y).unwrap();
        assert_eq!(got.dims(), &[4, 6]);
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // A strided view goes to candle, with the same result.
        let xt = x.t().unwrap();
        let yt = y.t().unwrap();
        let want_t: Vec<f32> = (&xt + &yt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got_t = residual_add(&xt, &yt).unwrap();
        assert_eq!(
            got_t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want_t
        );
        // So does a shape mismatch, with candle's error.
        let short = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(residual_add(&x, &short).is_err());
    }
}

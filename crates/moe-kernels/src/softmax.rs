//! Softmax over the last dimension as torch's f32 CPU kernel computes it (AVX2 build):
//! `exp(x - max)` with SLEEF's `expf_u10`, the sum in 8 lanes reduced as a tree, then a
//! multiply by `1 / sum`. Attention probabilities are rounded to bf16 right after, so a
//! last-bit difference here can flip them; other devices use plain candle ops.

use candle_core::{DType, Device, Tensor, D};
use moe_core::Result;

/// Softmax of `x` (any shape, f32) over its last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        let max = x.max_keepdim(D::Minus1)?;
        let exp = x.broadcast_sub(&max)?.exp()?;
        return Ok(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?);
    }
    let n = x.dim(D::Minus1)?;
    let mut values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut row = vec![0f32; n];
    for chunk in values.chunks_mut(n.max(1)) {
        softmax_row(chunk, &mut row);
        chunk.copy_from_slice(&row);
    }
    Ok(Tensor::from_vec(values, x.shape(), x.device())?)
}

/// Softmax of one row `x` into `out` (same length), in torch's order.
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA, checked just above.
        return unsafe { softmax_row_fma(x, out) };
    }
    softmax_row_portable(x, out)
}

/// The same function compiled with FMA enabled, so `mul_add` is one instruction instead of a
/// libm call (the result is identical: `mul_add` is always fused).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn softmax_row_fma(x: &[f32], out: &mut [f32]) {
    softmax_row_portable(x, out)
}

#[inline(always)]
fn softmax_row_portable(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp_u10(v - max);
    }
    let inv = 1.0 / lane_sum(out);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// torch's `vec::reduce_all` with `+` over f32 (AVX2: 8 lanes).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let n = v.len();
    if n < 8 {
        return v.iter().fold(0f32, |s, &x| s + x);
    }
    let mut acc: [f32; 8] = v[..8].try_into().expect("8 lanes");
    let full = n - n % 8;
    for chunk in v[8..full].chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(&v[full..]) {
        *a += x;
    }
    let w = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (w[0] + w[2]) + (w[1] + w[3])
}

/// SLEEF's `expf_u10` (≤ 1 ulp), the exp of torch's vectorised f32 kernels.
#[inline(always)]
pub fn exp_u10(d: f32) -> f32 {
    const R_LN2: f32 = std::f32::consts::LOG2_E;
    const L2U: f32 = 0.693_145_75;
    const L2L: f32 = 1.428_606_8e-6;
    if d < -104.0 {
        return 0.0;
    }
    if d > 100.0 {
        return f32::INFINITY;
    }
    let q = (d * R_LN2).round_ties_even();
    let s = q.mul_add(-L2U, d);
    let s = q.mul_add(-L2L, s);
    let mut u = 0.000_198_527_62_f32;
    u = u.mul_add(s, 0.001_393_043_6);
    u = u.mul_add(s, 0.008_333_361);
    u = u.mul_add(s, 0.041_666_485);
    u = u.mul_add(s, 0.166_666_67);
    u = u.mul_add(s, 0.5);
    let u = 1.0 + (s * s).mul_add(u, s);
    ldexp2(u, q as i32)
}

/// `u · 2^q` in two steps, as SLEEF's `vldexp2` (exact for the range `exp_u10` reaches).
fn ldexp2(u: f32, q: i32) -> f32 {
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    u * pow2(q >> 1) * pow2(q - (q >> 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_one_ulp() {
        let mut x = -103.0f32;
        while x < 88.0 {
            let ours = exp_u10(x) as f64;
            let exact = (x as f64).exp();
            let ulp = (exact as f32).abs() * f32::EPSILON;
            assert!(
                (ours - exact).abs() <= ulp as f64 * 1.01 + f64::from(f32::MIN_POSITIVE),
                "{x}"
            );
            x += 0.37;
        }
        assert_eq!(exp_u10(0.0), 1.0);
        assert_eq!(exp_u10(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn rows_sum_to_one() {
        let x = Tensor::from_vec(
            (0..60)
                .map(|i| (i as f32 * 0.7).sin() * 5.0)
                .collect::<Vec<_>>(),
            (3, 20),
            &Device::Cpu,
        )
        .unwrap();
        let p = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        for row in p {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}

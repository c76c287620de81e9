//! RMSNorm as transformers computes it: in f32, `x * rsqrt(mean(x²) + eps)` rounded to the
//! input dtype, then `weight * x` in that dtype.
//!
//! On the CPU the mean's sum follows torch's f32 reduction order (AVX2 build: 8-lane vectors,
//! four interleaved vector accumulators, cascaded every 16 steps, lanes added in order), so the
//! normalised values round to bf16 exactly as torch's do. Other devices use candle ops.

use candle_core::{DType, Device, Tensor, D};
use half::bf16;
use moe_core::Result;

/// Normalises `x` (`[..., size]`, f32 or bf16) over its last dimension and scales by
/// `weight` (`[size]`, same dtype).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    if !matches!(x.device(), Device::Cpu) || !matches!(dtype, DType::F32 | DType::BF16) {
        let xf = x.to_dtype(DType::F32)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)?
            .to_dtype(dtype)?;
        return Ok(normed.broadcast_mul(weight)?);
    }
    let values: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let weight: Vec<f32> = weight.to_dtype(DType::F32)?.to_vec1()?;
    let mut out = values;
    rms_norm_rows_in_place(&mut out, &weight, eps, dtype);
    Ok(Tensor::from_vec(out, x.shape(), x.device())?.to_dtype(dtype)?)
}

/// [`rms_norm`] on host values: normalises each `weight.len()`-wide row of `rows` in place,
/// the sum in torch's order, rounded to `dtype` (bf16 or f32) where transformers' RMSNorm
/// rounds.
pub fn rms_norm_rows_in_place(rows: &mut [f32], weight: &[f32], eps: f64, dtype: DType) {
    if dtype == DType::BF16 {
        normalise_rows(rows, weight, eps, |v| bf16::from_f32(v).to_f32());
    } else {
        normalise_rows(rows, weight, eps, |v| v);
    }
}

/// [`rms_norm_rows_in_place`] with its rounding inlined.
fn normalise_rows(rows: &mut [f32], weight: &[f32], eps: f64, round: impl Fn(f32) -> f32) {
    let size = weight.len();
    let mut squares = vec![0f32; size];
    for row in rows.chunks_mut(size.max(1)) {
        for (s, &v) in squares.iter_mut().zip(row.iter()) {
            *s = v * v;
        }
        let variance = torch_sum(&squares) / size as f32;
        let inv = 1.0 / (variance + eps as f32).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = round(w * round(*v * inv));
        }
    }
}

/// torch's CPU sum of a contiguous f32 row (`vectorized_inner_sum` → `row_sum` →
/// `multi_row_sum`).
pub(crate) fn torch_sum(v: &[f32]) -> f32 {
    const LANES: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    type Vec8 = [f32; LANES];
    let add = |a: &mut Vec8, b: &[f32]| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    };
    let n_vec = v.len() / LANES;
    let vector = |i: usize| &v[i * LANES..(i + 1) * LANES];
    // multi_row_sum over groups of ILP vectors, with cascade levels.
    let groups = n_vec / ILP;
    let ceil_log2 = if groups <= 1 {
        0
    } else {
        usize::BITS - (groups - 1).leading_zeros()
    } as usize;
    let level_power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << level_power;
    let mask = step - 1;
    let mut acc = [[[0f32; LANES]; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= groups {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, vector(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (up, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(up, low);
                *low = [0.0; LANES];
            }
            if i & (mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < groups {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, vector(i * ILP + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (first, rest) = acc.split_at_mut(1);
        for (a, upper) in first[0].iter_mut().zip(&rest[j - 1]) {
            add(a, upper);
        }
    }
    // row_sum: leftover vectors into the first accumulator, then the accumulators in order.
    let mut partial = acc[0];
    for r in groups * ILP..n_vec {
        add(&mut partial[0], vector(r));
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    // The scalar tail first, then the lanes in order.
    let mut total = v[n_vec * LANES..].iter().fold(0f32, |s, &x| s + x);
    for lane in partial[0] {
        total += lane;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_is_close_to_exact() {
        for n in [1, 7, 8, 33, 64, 100, 1000, 4096] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let exact: f64 = v.iter().map(|&x| x as f64).sum();
            assert!((torch_sum(&v) as f64 - exact).abs() < 1e-3, "{n}");
        }
    }

    #[test]
    fn normalises_to_unit_rms() {
        let x = Tensor::from_vec(
            (0..128)
                .map(|i| (i as f32 * 0.3).cos() * 3.0)
                .collect::<Vec<_>>(),
            (2, 64),
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
        let y = rms_norm(&x, &w, 1e-6).unwrap().to_vec2::<f32>().unwrap();
        for row in y {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 64.0;
            assert!((ms - 1.0).abs() < 1e-4);
        }
    }
}

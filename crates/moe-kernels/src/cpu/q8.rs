//! int8 weights with one f32 scale per output row: the routed experts of `--expert-dtype q8`.
//!
//! A row `w` is stored as `q = round(w / s)` with `s = max|w| / 127`, so `w ≈ s · q`. The
//! kernels of [`super::gemm`] read `q` as any [`WeightElem`](super::weights::WeightElem)
//! (widened in registers) and [`ScaledSink`] multiplies each finished dot product by its row's
//! scale: `x · w ≈ s · (x · q)`. Wired in: experts are quantized at load by
//! [`crate::expert_q8`] (the resident source and the expert cache alike) and the grouped expert
//! FFN ([`super::moe_ffn`]) scales gate, up and down this way. Not a model-wide format: dense
//! layers, attention and shared experts stay in the compute dtype.

use super::gemm::Sink;
use super::weights::WeightElem;

/// A `[rows, cols]` int8 matrix with per-row scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Matrix {
    /// `rows * cols` quantized values, row-major.
    pub values: Vec<i8>,
    /// One scale per row.
    pub scales: Vec<f32>,
    /// Number of columns (the reduced dimension).
    pub cols: usize,
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix of any weight type.
    pub fn quantize<W: WeightElem>(w: &[W], cols: usize) -> Self {
        assert!(cols > 0 && w.len() % cols == 0);
        let mut values = Vec::with_capacity(w.len());
        let mut scales = Vec::with_capacity(w.len() / cols);
        values.resize(w.len(), 0);
        for (row, q) in w.chunks_exact(cols).zip(values.chunks_exact_mut(cols)) {
            scales.push(quantize_row(row, q));
        }
        Self {
            values,
            scales,
            cols,
        }
    }
}

/// Quantizes one row into `q` and returns its scale.
fn quantize_row<W: WeightElem>(row: &[W], q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected just above.
        return unsafe { quantize_row_avx2(row, q) };
    }
    quantize_row_body(row, q)
}

/// [`quantize_row_body`] compiled for AVX2: the rounding (half away from zero) becomes a
/// vector truncation of `x ± 0.49999997` instead of a libm call per weight, the same values;
/// a model's load quantizes every weight once.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2<W: WeightElem>(row: &[W], q: &mut [i8]) -> f32 {
    quantize_row_body(row, q)
}

/// `s = max|w| / 127` (1 for an all-zero row) and `q = round(w / s)`, clamped to ±127.
#[inline(always)]
fn quantize_row_body<W: WeightElem>(row: &[W], q: &mut [i8]) -> f32 {
    // max |w| as the largest bit pattern of |w|: for non-NaN floats the integer order is the
    // float order, and an integer maximum vectorizes. A NaN (bits above infinity's) takes
    // the float fold, which skips NaNs.
    let max_bits = row
        .iter()
        .fold(0u32, |m, v| m.max(v.to_f32().abs().to_bits()));
    let max = if max_bits > f32::INFINITY.to_bits() {
        row.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()))
    } else {
        f32::from_bits(max_bits)
    };
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    for (o, v) in q.iter_mut().zip(row) {
        *o = (v.to_f32() / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Multiplies each dot product by the scale of its weight row before passing it on.
pub struct ScaledSink<'a, S> {
    /// The sink that receives the scaled values.
    pub inner: &'a S,
    /// One scale per weight row (output column).
    pub scales: &'a [f32],
}

// SAFETY: forwards each (row, col) once to `inner`, which upholds the contract.
unsafe impl<S: Sink> Sink for ScaledSink<'_, S> {
    #[inline(always)]
    unsafe fn put(&self, row: usize, col: usize, value: f32) {
        // SAFETY: same (row, col) as the caller's, see the trait.
        unsafe { self.inner.put(row, col, value * self.scales[col]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::{matmul_nt_into, StoreSink};
    use crate::cpu::shared::SharedMut;

    /// The AVX2 build of the rounding gives the scalar one's values, ties included.
    #[test]
    fn quantized_values_match_the_scalar_rounding() {
        // Rows whose values land on exact halves of the scale (ties) and off them.
        // Row 0: max 127, so the scale is 1 and every other value is a tie (-126.5..=126.5).
        let mut w: Vec<f32> = (0..254).map(|i| i as f32 - 126.5).collect();
        w.push(127.0);
        w.extend((0..255).map(|i| ((i * 37 % 251) as f32 - 125.0) * 1e-3));
        w.extend([0.0; 255]);
        // A NaN is skipped by the maximum (the scale is 2 / 127) and quantizes to 0.
        w.extend((0..255).map(|i| match i {
            0 => f32::NAN,
            1 => -2.0,
            _ => 1.0,
        }));
        let q = Q8Matrix::quantize(&w, 255);
        assert_eq!(q.scales[3], 2.0 / 127.0);
        assert_eq!(&q.values[3 * 255..3 * 255 + 3], &[0, -127, 64]);
        for (r, row) in w.chunks_exact(255).enumerate() {
            let mut want = vec![0i8; 255];
            let scale = quantize_row_body(row, &mut want);
            assert_eq!(q.scales[r], scale);
            assert_eq!(&q.values[r * 255..(r + 1) * 255], &want[..], "row {r}");
            for (v, &x) in want.iter().zip(row) {
                assert_eq!(*v, (x / scale).round().clamp(-127.0, 127.0) as i8);
            }
        }
        // Ties round away from zero.
        assert_eq!(q.scales[0], 1.0);
        assert_eq!(
            (q.values[0], q.values[126], q.values[127], q.values[253]),
            (-127, -1, 1, 127)
        );
    }

    #[test]
    fn q8_product_is_close_to_f32() {
        // Both the register tiles (m = 1, 3) and the packed path (m = 9); k off the width.
        for (m, k, n) in [(1, 37, 19), (3, 64, 8), (9, 100, 33)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 480.0)
                .collect();
            let q = Q8Matrix::quantize(&w, k);
            let mut out = vec![0f32; m * n];
            let shared = SharedMut::new(&mut out);
            let store = StoreSink::new(&shared, n, 0, None);
            let sink = ScaledSink {
                inner: &store,
                scales: &q.scales,
            };
            matmul_nt_into(&x, m, k, &q.values, n, &sink);
            drop(shared);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                    let bound = q.scales[j] * 0.5 * (0..k).map(|p| x[i * k + p].abs()).sum::<f32>();
                    let got = out[i * n + j];
                    assert!(
                        (got - want).abs() <= bound + 1e-5,
                        "({i},{j}) {got} vs {want}"
                    );
                }
            }
        }
    }
}

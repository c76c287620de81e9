//! Int8 dense projections (`--dense-dtype q8`): a `[out, in]` matrix held as int8 values with
//! one f32 scale per output row, the same format as int8 experts ([`crate::expert_q8`]), so
//! a decode step reads one byte per weight of the attention projections and the lm head
//! instead of two (bf16).
//!
//! The product runs on the CPU's fast kernels ([`crate::cpu::fast_matmul_nt_q8`]): the values
//! are widened in registers, each finished dot product is multiplied by its row's scale, the
//! bias is added, and the result is rounded once. Anywhere else (torch-exact numerics, a
//! non-CPU input) the matrix is dequantized per use onto [`crate::matmul_nt`], and stderr says
//! so once.

use std::sync::Once;

use candle_core::{DType, Tensor};
use moe_core::Result;

use crate::cpu::{fast_matmul_nt_q8, numerics, Numerics};
use crate::expert_q8::{dequantize_matrix, quantize_matrix};
use crate::matmul::{matmul_nt, SumOrder};

/// An int8 `[out, in]` projection matrix with per-row scales.
#[derive(Debug, Clone)]
pub struct Q8Dense {
    /// `[out, in]` `U8` tensor of the int8 bit patterns.
    values: Tensor,
    /// `[out]` f32 scales.
    scales: Tensor,
}

impl Q8Dense {
    /// Quantizes a float `[out, in]` CPU matrix per output row (`scale = max|w| / 127`).
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (values, scales) = quantize_matrix(weight)?;
        Ok(Self { values, scales })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.values.dims();
        (d[0], d[1])
    }

    /// `x · Wᵀ (+ bias)` for `x` `[.., in]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if x.device().is_cpu() && numerics() == Numerics::Fast {
            return fast_matmul_nt_q8(x, &self.values, &self.scales, bias);
        }
        static SAID: Once = Once::new();
        SAID.call_once(|| {
            eprintln!(
                "moe-kernels: int8 dense weights are dequantized per use here (the int8 kernel \
                 runs on the CPU with fast numerics only): slower, same values"
            )
        });
        let w = self.dequantized(x.dtype())?.to_device(x.device())?;
        matmul_nt(x, &w, bias, SumOrder::Blocked)
    }

    /// The float matrix `scale × value` in `dtype`.
    pub fn dequantized(&self, dtype: DType) -> Result<Tensor> {
        dequantize_matrix(&self.values, &self.scales, dtype)
    }

    /// Bytes held: one per weight plus four per row.
    pub fn n_bytes(&self) -> usize {
        let (out, inp) = self.dims();
        out * inp + out * DType::F32.size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The int8 product equals the float product of the dequantized matrix (same weights,
    /// f32 sums in a different order) for one row and many, with a bias, in f32 and bf16.
    #[test]
    fn int8_product_matches_the_dequantized_matrix() {
        let dev = Device::Cpu;
        let (out, inp) = (70, 96);
        let w = Tensor::randn(0f32, 0.5, (out, inp), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
        let q = Q8Dense::quantize(&w).unwrap();
        assert_eq!(q.dims(), (out, inp));
        assert_eq!(q.n_bytes(), out * inp + 4 * out);
        let deq = q.dequantized(DType::F32).unwrap();
        // Quantization moved each weight by at most half a step of its row (a step is the
        // row's largest magnitude / 127).
        let err = (&deq - &w).unwrap().abs().unwrap().max_keepdim(1).unwrap();
        let half_step = w.abs().unwrap().max_keepdim(1).unwrap();
        let half_step = half_step.affine(0.5 * (1.0 + 1e-5) / 127.0, 0.0).unwrap();
        let over = (err - half_step).unwrap();
        assert!(over.max_all().unwrap().to_scalar::<f32>().unwrap() <= 0.0);
        for rows in [1, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let want = x
                .matmul(&deq.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let got = q.forward(&x, Some(&bias)).unwrap();
            let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
            // On CPUs with AVX512-VNNI the rows of x are rounded to int16 first (gemm_vnni):
            // each element moves by at most max|x_row| / 65534 (3 / 65534 here), times
            // Σ|w_row| (about 40) in the worst case.
            assert!(diff.to_scalar::<f32>().unwrap() < 2e-3, "{rows} rows");
            let xb = x.to_dtype(DType::BF16).unwrap();
            let got = q.forward(&xb, None).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let want = xb
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&deq.t().unwrap())
                .unwrap();
            let diff = (got.to_dtype(DType::F32).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            // one bf16 rounding of values of magnitude up to ~30
            assert!(diff.to_scalar::<f32>().unwrap() < 0.15, "{rows} rows, bf16");
        }
    }
}

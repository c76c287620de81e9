//! RMSNorm as transformers computes it: in f32, then `weight * x.to(dtype)`.

use candle_core::{DType, Tensor, D};
use moe_core::Result;
use moe_loader::TensorLookup;

/// Root-mean-square normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `{name}.weight` of size `size`.
    pub fn load(lookup: &TensorLookup, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: lookup.get(&format!("{name}.weight"), &[size])?,
            eps,
        })
    }

    /// Normalises `x` (`[..., size]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        // `x * rsqrt(var + eps)`: torch's rsqrt is `1 / sqrt`, then a multiply.
        let normed = xf
            .broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?
            .to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

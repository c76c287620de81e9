//! RMSNorm as transformers computes it: in f32, then `weight * x.to(dtype)`.

use candle_core::Tensor;
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
        moe_kernels::rms_norm(x, &self.weight, self.eps)
    }
}

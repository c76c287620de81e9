//! A dense projection `x · Wᵀ (+ b)` with HF's `[out, in]` weight layout.

use candle_core::Tensor;
use moe_core::Result;
use moe_kernels::{matmul_nt, SumOrder};
use moe_loader::TensorLookup;

/// A linear layer.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    weight: Tensor,
    /// `[out]`
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{name}.weight` (`[out, in]`) and, when `bias`, `{name}.bias`.
    pub fn load(
        lookup: &TensorLookup,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = lookup.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(lookup.get(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Wraps an existing matrix (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight, bias: None }
    }

    /// Applies the projection to `x` (`[n, in]` → `[n, out]`). In bf16 on the CPU the bias is
    /// added before the single rounding, as torch's `addmm` does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_nt(x, &self.weight, self.bias.as_ref(), SumOrder::Blocked)
    }

    /// The weight matrix.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

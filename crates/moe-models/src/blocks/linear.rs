//! A dense projection `x · Wᵀ (+ b)` with HF's `[out, in]` weight layout.

use candle_core::Tensor;
use moe_core::Result;
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

    /// Applies the projection to `x` (`[n, in]` → `[n, out]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The weight matrix.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

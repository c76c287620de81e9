//! The dense gated MLP `down(silu(gate(x)) * up(x))`, used for dense layers and shared experts.

use candle_core::Tensor;
use moe_core::Result;
use moe_kernels::{expert_ffn, ExpertActivation, ExpertWeights, WeightDtype};
use moe_loader::TensorLookup;

use crate::experts::ExpertNames;

/// A gated MLP.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    weights: ExpertWeights,
}

impl GatedMlp {
    /// Loads the three projections under `lookup` with the given names.
    pub fn load(
        lookup: &TensorLookup,
        names: &ExpertNames,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        Ok(Self {
            weights: names.load(lookup, hidden, intermediate)?,
        })
    }

    /// The MLP with its matrices held as `dtype` says (int8 for [`WeightDtype::Q8`]).
    pub fn stored_as(self, dtype: WeightDtype) -> Result<Self> {
        Ok(Self {
            weights: dtype.apply(self.weights)?,
        })
    }

    /// Applies the MLP to `x` (`[n, hidden]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        expert_ffn(x, &self.weights, ExpertActivation::SiluGlu)
    }

    /// Bytes of the weights.
    pub fn n_bytes(&self) -> usize {
        self.weights.n_bytes()
    }
}

//! The expert feed-forward: `down(act(gate(x)) * up(x))` over the rows routed to one expert.
//! Contract: `x` is `[n_rows, hidden]` in the weights' dtype; the result is `[n_rows, hidden]`.
//! In bf16 it rounds where torch does: after each projection, after the activation and after
//! the product.

use candle_core::{DType, Tensor, D};
use moe_core::Result;

use crate::matmul::{matmul_nt, SumOrder};

/// The gated activation between the gate/up and down projections.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum ExpertActivation {
    /// `silu(gate) * up` (Mixtral, Qwen-MoE, OLMoE, DeepSeek).
    SiluGlu,
}

/// One expert's weights, as stored in HF checkpoints (`[out, in]` row-major).
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[intermediate, hidden]`
    pub gate: Tensor,
    /// `[intermediate, hidden]`
    pub up: Tensor,
    /// `[hidden, intermediate]`
    pub down: Tensor,
}

impl ExpertWeights {
    /// Bytes the three matrices take.
    pub fn n_bytes(&self) -> usize {
        [&self.gate, &self.up, &self.down]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Runs one expert over its rows (`[n_rows, hidden]`).
pub fn expert_ffn(
    x: &Tensor,
    weights: &ExpertWeights,
    activation: ExpertActivation,
) -> Result<Tensor> {
    // [n_rows, intermediate]
    let gate = matmul_nt(x, &weights.gate, None, SumOrder::Blocked)?;
    let up = matmul_nt(x, &weights.up, None, SumOrder::Blocked)?;
    let hidden = match activation {
        ExpertActivation::SiluGlu => (silu(&gate)? * up)?,
    };
    // [n_rows, hidden]
    matmul_nt(&hidden, &weights.down, None, SumOrder::Blocked)
}

/// `silu(x)` computed in f32 and rounded once to `x`'s dtype, as torch does for bf16/f16
/// (candle's own half-precision silu rounds after each of its three elementary ops).
fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())
}

/// The same contract from elementary ops (`x · Wᵀ` via broadcast multiply and sum): the
/// reference the fast path is tested against.
pub fn expert_ffn_reference(
    x: &Tensor,
    weights: &ExpertWeights,
    activation: ExpertActivation,
) -> Result<Tensor> {
    let linear = |x: &Tensor, w: &Tensor| -> candle_core::Result<Tensor> {
        // [n, 1, in] * [1, out, in] -> sum over in -> [n, out]
        x.unsqueeze(1)?
            .broadcast_mul(&w.unsqueeze(0)?)?
            .sum(D::Minus1)
    };
    let gate = linear(x, &weights.gate)?;
    let up = linear(x, &weights.up)?;
    let hidden = match activation {
        ExpertActivation::SiluGlu => ((&gate / (gate.neg()?.exp()? + 1.0)?)? * up)?,
    };
    Ok(linear(&hidden, &weights.down)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        for (n_rows, hidden, inter) in [(1, 16, 8), (7, 64, 48), (33, 24, 40)] {
            let w = ExpertWeights {
                gate: Tensor::randn(0f32, 0.3, (inter, hidden), &dev).unwrap(),
                up: Tensor::randn(0f32, 0.3, (inter, hidden), &dev).unwrap(),
                down: Tensor::randn(0f32, 0.3, (hidden, inter), &dev).unwrap(),
            };
            let x = Tensor::randn(0f32, 1.0, (n_rows, hidden), &dev).unwrap();
            let fast = expert_ffn(&x, &w, ExpertActivation::SiluGlu).unwrap();
            let slow = expert_ffn_reference(&x, &w, ExpertActivation::SiluGlu).unwrap();
            assert_eq!(fast.dims(), &[n_rows, hidden]);
            let err = (fast - slow)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }
}

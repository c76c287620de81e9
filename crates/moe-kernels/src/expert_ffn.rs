//! The expert feed-forward: `down(act(gate(x)) * up(x))` over the rows routed to one expert.
//! Contract: `x` is `[n_rows, hidden]` in the weights' dtype; the result is `[n_rows, hidden]`.
//! In bf16 it rounds where torch does: after each projection, after the activation and after
//! the product. Int8 experts ([`crate::expert_q8`]) are dequantized to `x`'s dtype first.

use candle_core::{DType, Tensor, D};
use moe_core::Result;

use crate::cpu::{fast_matmul_nt_q8, numerics, Numerics};
use crate::expert_q8::Q8Scales;
use crate::matmul::{matmul_nt, SumOrder};

/// The gated activation between the gate/up and down projections.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum ExpertActivation {
    /// `silu(gate) * up` (Mixtral, Qwen-MoE, OLMoE, DeepSeek).
    SiluGlu,
    /// GPT-OSS: `(up + 1) * gate * sigmoid(alpha * gate)` with `gate` clamped to at most
    /// `limit` and `up` to `[-limit, limit]`.
    ClampedSwiGlu {
        /// Sigmoid slope (`swiglu_alpha`, 1.702).
        alpha: f32,
        /// Clamp bound (`swiglu_limit`).
        limit: f32,
    },
}

/// One expert's weights, as stored in HF checkpoints (`[out, in]` row-major): float tensors
/// in the compute dtype, or, when [`ExpertWeights::q8_scales`] is set, int8 values (stored as
/// `U8` tensors holding the `i8` bit patterns: candle has no `i8` dtype) with one f32 scale per
/// output row. Code that needs float tensors calls [`ExpertWeights::dequantized`].
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[intermediate, hidden]`
    pub gate: Tensor,
    /// `[intermediate, hidden]`
    pub up: Tensor,
    /// `[hidden, intermediate]`
    pub down: Tensor,
    /// `[intermediate]`, added after the gate projection (GPT-OSS).
    pub gate_bias: Option<Tensor>,
    /// `[intermediate]`, added after the up projection.
    pub up_bias: Option<Tensor>,
    /// `[hidden]`, added after the down projection.
    pub down_bias: Option<Tensor>,
    /// Per-row scales when `gate`, `up` and `down` are int8 (`--expert-dtype q8`); biases are
    /// never quantized.
    pub q8_scales: Option<Q8Scales>,
}

impl ExpertWeights {
    /// The three matrices, without biases.
    pub fn new(gate: Tensor, up: Tensor, down: Tensor) -> Self {
        Self {
            gate,
            up,
            down,
            gate_bias: None,
            up_bias: None,
            down_bias: None,
            q8_scales: None,
        }
    }

    /// Every tensor the expert holds: matrices, biases, int8 scales.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.gate, &self.up, &self.down]
            .into_iter()
            .chain(self.gate_bias.as_ref())
            .chain(self.up_bias.as_ref())
            .chain(self.down_bias.as_ref())
            .chain(
                self.q8_scales
                    .iter()
                    .flat_map(|s| [&s.gate, &s.up, &s.down]),
            )
    }

    /// Bytes the matrices, biases and scales take (what an expert cache budgets).
    pub fn n_bytes(&self) -> usize {
        self.tensors()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The same expert with `f` applied to each of its tensors (a copy to another device).
    pub fn try_map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let opt = |t: &Option<Tensor>| t.as_ref().map(&f).transpose();
        Ok(Self {
            gate: f(&self.gate)?,
            up: f(&self.up)?,
            down: f(&self.down)?,
            gate_bias: opt(&self.gate_bias)?,
            up_bias: opt(&self.up_bias)?,
            down_bias: opt(&self.down_bias)?,
            q8_scales: self
                .q8_scales
                .as_ref()
                .map(|s| {
                    Ok::<_, moe_core::Error>(Q8Scales {
                        gate: f(&s.gate)?,
                        up: f(&s.up)?,
                        down: f(&s.down)?,
                    })
                })
                .transpose()?,
        })
    }
}

/// Runs one expert over its rows (`[n_rows, hidden]`). Int8 weights run on the CPU's int8
/// kernel with fast numerics, and are dequantized per call anywhere else.
pub fn expert_ffn(
    x: &Tensor,
    weights: &ExpertWeights,
    activation: ExpertActivation,
) -> Result<Tensor> {
    if let Some(scales) = &weights.q8_scales {
        if x.device().is_cpu() && numerics() == Numerics::Fast {
            // int8 matrices (a dense MLP of `--dense-dtype q8`) on the int8 kernel
            let project = |x: &Tensor, q: &Tensor, s: &Tensor, b: &Option<Tensor>| {
                fast_matmul_nt_q8(x, q, s, b.as_ref())
            };
            let gate = project(x, &weights.gate, &scales.gate, &weights.gate_bias)?;
            let up = project(x, &weights.up, &scales.up, &weights.up_bias)?;
            let hidden = activate(&gate, &up, activation)?;
            return project(&hidden, &weights.down, &scales.down, &weights.down_bias);
        }
    }
    let weights = &*weights.dequantized(x.dtype())?;
    // [n_rows, intermediate]
    let gate = matmul_nt(
        x,
        &weights.gate,
        weights.gate_bias.as_ref(),
        SumOrder::Blocked,
    )?;
    let up = matmul_nt(x, &weights.up, weights.up_bias.as_ref(), SumOrder::Blocked)?;
    let hidden = activate(&gate, &up, activation)?;
    // [n_rows, hidden]
    matmul_nt(
        &hidden,
        &weights.down,
        weights.down_bias.as_ref(),
        SumOrder::Blocked,
    )
}

/// `act(gate) · up`, elementwise.
fn activate(gate: &Tensor, up: &Tensor, activation: ExpertActivation) -> Result<Tensor> {
    Ok(match activation {
        ExpertActivation::SiluGlu => (silu(gate)? * up)?,
        ExpertActivation::ClampedSwiGlu { alpha, limit } => clamped_swiglu(gate, up, alpha, limit)?,
    })
}

/// GPT-OSS's gate: each elementary op in f32, rounded to the inputs' dtype after each step
/// as torch does (a no-op in f32).
fn clamped_swiglu(
    gate: &Tensor,
    up: &Tensor,
    alpha: f32,
    limit: f32,
) -> candle_core::Result<Tensor> {
    let dtype = gate.dtype();
    let round = |t: Tensor| -> candle_core::Result<Tensor> {
        if dtype == DType::F32 {
            Ok(t)
        } else {
            t.to_dtype(dtype)?.to_dtype(DType::F32)
        }
    };
    let limit = limit as f64;
    let gate = gate.to_dtype(DType::F32)?.minimum(limit)?;
    let up = up.to_dtype(DType::F32)?.clamp(-limit, limit)?;
    let scaled = round((&gate * alpha as f64)?)?;
    let sig = round(candle_nn_sigmoid(&scaled)?)?;
    let glu = round((gate * sig)?)?;
    let up1 = round((up + 1.0)?)?;
    (up1 * glu)?.to_dtype(dtype)
}

/// `1 / (1 + exp(-x))` in f32.
fn candle_nn_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
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
    let weights = &*weights.dequantized(x.dtype())?;
    let linear = |x: &Tensor, w: &Tensor| -> candle_core::Result<Tensor> {
        // [n, 1, in] * [1, out, in] -> sum over in -> [n, out]
        x.unsqueeze(1)?
            .broadcast_mul(&w.unsqueeze(0)?)?
            .sum(D::Minus1)
    };
    let add_bias = |y: Tensor, b: &Option<Tensor>| -> candle_core::Result<Tensor> {
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    };
    let gate = add_bias(linear(x, &weights.gate)?, &weights.gate_bias)?;
    let up = add_bias(linear(x, &weights.up)?, &weights.up_bias)?;
    let hidden = match activation {
        ExpertActivation::SiluGlu => ((&gate / (gate.neg()?.exp()? + 1.0)?)? * up)?,
        ExpertActivation::ClampedSwiGlu { alpha, limit } => {
            let limit = limit as f64;
            let gate = gate.minimum(limit)?;
            let up = up.clamp(-limit, limit)?;
            let sig = ((&gate * -(alpha as f64))?.exp()? + 1.0)?.recip()?;
            ((up + 1.0)? * (gate * sig)?)?
        }
    };
    Ok(add_bias(
        linear(&hidden, &weights.down)?,
        &weights.down_bias,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        for (n_rows, hidden, inter) in [(1, 16, 8), (7, 64, 48), (33, 24, 40)] {
            let w = ExpertWeights::new(
                Tensor::randn(0f32, 0.3, (inter, hidden), &dev).unwrap(),
                Tensor::randn(0f32, 0.3, (inter, hidden), &dev).unwrap(),
                Tensor::randn(0f32, 0.3, (hidden, inter), &dev).unwrap(),
            );
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

#[cfg(test)]
mod clamped_swiglu_tests {
    use super::*;
    use candle_core::Device;

    /// Biases and the clamped SwiGLU, with weights large enough that both clamps bite.
    #[test]
    fn clamped_swiglu_with_biases_matches_reference() {
        let dev = Device::Cpu;
        let (n_rows, hidden, inter) = (9, 32, 24);
        let w = ExpertWeights {
            gate_bias: Some(Tensor::randn(0f32, 0.5, inter, &dev).unwrap()),
            up_bias: Some(Tensor::randn(0f32, 0.5, inter, &dev).unwrap()),
            down_bias: Some(Tensor::randn(0f32, 0.5, hidden, &dev).unwrap()),
            ..ExpertWeights::new(
                Tensor::randn(0f32, 1.5, (inter, hidden), &dev).unwrap(),
                Tensor::randn(0f32, 1.5, (inter, hidden), &dev).unwrap(),
                Tensor::randn(0f32, 0.3, (hidden, inter), &dev).unwrap(),
            )
        };
        let x = Tensor::randn(0f32, 1.0, (n_rows, hidden), &dev).unwrap();
        let act = ExpertActivation::ClampedSwiGlu {
            alpha: 1.702,
            limit: 7.0,
        };
        let fast = expert_ffn(&x, &w, act).unwrap();
        let slow = expert_ffn_reference(&x, &w, act).unwrap();
        let err: f32 = (fast - slow)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-4, "{err}");
        // Both clamps are exercised.
        let gate = x.matmul(&w.gate.t().unwrap()).unwrap();
        let max: f32 = gate.max_all().unwrap().to_scalar().unwrap();
        assert!(max > 7.0);
    }
}

//! RMSNorm as transformers computes it: in f32, then `weight * x.to(dtype)`; LayerNorm with
//! bias for the architectures that use it (Phi-MoE), and [`Norm`], either of them as the
//! recipe's [`NormKind`] says.

use candle_core::{DType, Tensor, D};
use moe_core::Result;
use moe_loader::TensorLookup;

/// Root-mean-square normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// The weight as host f32 values, made on first use by the host path.
    host_weight: std::sync::OnceLock<Vec<f32>>,
}

impl RmsNorm {
    /// Loads `{name}.weight` of size `size`.
    pub fn load(lookup: &TensorLookup, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: lookup.get(&format!("{name}.weight"), &[size])?,
            eps,
            host_weight: Default::default(),
        })
    }

    /// Normalises `x` (`[..., size]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        moe_kernels::rms_norm(x, &self.weight, self.eps)
    }

    /// [`RmsNorm::forward`] on host values: every `size`-wide row of `rows` in place, rounded
    /// to the weight's dtype where the tensor path rounds (the same values, bit for bit).
    pub fn forward_rows_in_place(&self, rows: &mut [f32]) -> Result<()> {
        let weight = match self.host_weight.get() {
            Some(w) => w,
            None => {
                let w: Vec<f32> = self.weight.to_dtype(DType::F32)?.to_vec1()?;
                self.host_weight.get_or_init(|| w)
            }
        };
        moe_kernels::rms_norm_rows_in_place(rows, weight, self.eps, self.weight.dtype());
        Ok(())
    }
}

/// Which normalisation a decoder's input, post-attention and final norms are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormKind {
    /// RMSNorm with a weight (`{name}.weight`).
    #[default]
    Rms,
    /// LayerNorm with weight and bias (`{name}.weight`, `{name}.bias`).
    Layer,
}

/// LayerNorm over the last dimension as torch computes it: in f32,
/// `(x − mean) / sqrt(var + eps) · weight + bias` with the biased variance, rounded once to
/// the input dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias` of size `size`.
    pub fn load(lookup: &TensorLookup, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: lookup.get(&format!("{name}.weight"), &[size])?,
            bias: lookup.get(&format!("{name}.bias"), &[size])?,
            eps,
        })
    }

    /// Normalises `x` (`[..., size]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// A decoder norm of either kind.
#[derive(Debug, Clone)]
pub enum Norm {
    /// RMSNorm.
    Rms(RmsNorm),
    /// LayerNorm with bias.
    Layer(LayerNorm),
}

impl Norm {
    /// Loads the norm `name` of the given kind.
    pub fn load(
        kind: NormKind,
        lookup: &TensorLookup,
        name: &str,
        size: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(match kind {
            NormKind::Rms => Self::Rms(RmsNorm::load(lookup, name, size, eps)?),
            NormKind::Layer => Self::Layer(LayerNorm::load(lookup, name, size, eps)?),
        })
    }

    /// Normalises `x` (`[..., size]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Rms(n) => n.forward(x),
            Self::Layer(n) => n.forward(x),
        }
    }
}

#[cfg(test)]
mod layer_norm_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_the_formula() {
        let x: Vec<f32> = (0..24)
            .map(|i| (i as f32 * 0.7).sin() * 3.0 + 1.5)
            .collect();
        let w: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..8).map(|i| i as f32 * -0.05).collect();
        let norm = LayerNorm {
            weight: Tensor::new(w.as_slice(), &Device::Cpu).unwrap(),
            bias: Tensor::new(b.as_slice(), &Device::Cpu).unwrap(),
            eps: 1e-5,
        };
        let xt = Tensor::from_vec(x.clone(), (3, 8), &Device::Cpu).unwrap();
        let y = norm.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        for (row, out) in x.chunks(8).zip(&y) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 8.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 8.0;
            for i in 0..8 {
                let expected =
                    (row[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
                assert!(
                    (out[i] as f64 - expected).abs() < 1e-5,
                    "{} vs {expected}",
                    out[i]
                );
            }
        }
    }
}

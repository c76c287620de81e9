//! Rotary position embeddings: the frequency table a config declares (`rope_parameters` in
//! transformers 5, `rope_theta`/`rope_scaling` before it) and its application to q and k in
//! the half-split (`rotate_half`) layout.

use candle_core::{DType, Device, Tensor, D};
use moe_core::Result;
use moe_loader::ConfigFile;

/// The rotary scheme of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength θ.
    pub theta: f64,
    /// Dimensions rotated (the head dim).
    pub rotary_dim: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// How the base frequencies are rescaled for longer contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
}

impl RopeConfig {
    /// Reads the rope fields, accepting both the transformers-5 and the older spelling.
    pub fn read(cfg: &ConfigFile, head_dim: usize, _max_positions: usize) -> Result<Self> {
        let params = match cfg.object("rope_parameters")? {
            Some(p) => Some(p),
            None => cfg.object("rope_scaling")?,
        };
        let theta = match params
            .as_ref()
            .map(|p| p.opt_f64("rope_theta"))
            .transpose()?
            .flatten()
        {
            Some(t) => t,
            None => cfg.opt_f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let rope_type = match &params {
            Some(p) => p
                .opt_str("rope_type")?
                .or(p.opt_str("type")?)
                .unwrap_or("default")
                .to_string(),
            None => "default".to_string(),
        };
        let partial = params
            .as_ref()
            .map(|p| p.opt_f64("partial_rotary_factor"))
            .transpose()?
            .flatten();
        let partial = partial
            .or(cfg.opt_f64("partial_rotary_factor")?)
            .unwrap_or(1.0);
        if partial != 1.0 {
            return Err(cfg.error(
                "partial_rotary_factor",
                format!("{partial} is not supported (only 1.0)"),
            ));
        }
        let scaling = match rope_type.as_str() {
            "default" => RopeScaling::Default,
            "linear" => {
                let p = params
                    .as_ref()
                    .expect("a rope type implies a parameter object");
                RopeScaling::Linear {
                    factor: p.f64("factor")?,
                }
            }
            other => {
                return Err(cfg.error(
                    "rope_parameters.rope_type",
                    format!("`{other}` is not supported (supported: default, linear)"),
                ))
            }
        };
        Ok(Self {
            theta,
            rotary_dim: head_dim,
            scaling,
        })
    }
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, rotary_dim / 2]`
    cos: Tensor,
    /// `[max_positions, rotary_dim / 2]`
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Builds the tables in f32 the way transformers does (f32 inverse frequencies, f32
    /// products), then converts them to the compute dtype.
    pub fn new(
        config: &RopeConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dim = config.rotary_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| {
                let base = config.theta as f32;
                1.0 / base.powf(i as f32 / dim as f32)
            })
            .collect();
        let position_scale = match config.scaling {
            RopeScaling::Default => 1.0f32,
            RopeScaling::Linear { factor } => 1.0 / factor as f32,
        };
        let half = dim / 2;
        let mut freqs = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let p = pos as f32 * position_scale;
            freqs.extend(inv_freq.iter().map(|f| p * f));
        }
        let freqs = Tensor::from_vec(freqs, (max_positions, half), device)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` (`[n_heads, n_tokens, head_dim]`) for consecutive positions starting at
    /// `start`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, n_tokens, _) = x.dims3()?;
        let max = self.cos.dims()[0];
        if start + n_tokens > max {
            return Err(moe_core::Error::InvalidRequest(format!(
                "position {} is past the model's context window of {max} tokens",
                start + n_tokens - 1
            )));
        }
        // [n_tokens, head_dim / 2]
        let cos = self.cos.narrow(0, start, n_tokens)?;
        let sin = self.sin.narrow(0, start, n_tokens)?;
        Ok(rotate_half_layout(x, &cos, &sin)?)
    }
}

/// `x * cos + rotate_half(x) * sin` with cos/sin duplicated over the two halves.
fn rotate_half_layout(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = cos.unsqueeze(0)?;
    let sin = sin.unsqueeze(0)?;
    let rotated_first = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let rotated_second = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[rotated_first, rotated_second], D::Minus1)
}

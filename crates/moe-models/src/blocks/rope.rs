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
    /// YaRN (`rope_type: yarn`): per-frequency blend of interpolation and extrapolation, and
    /// cos/sin multiplied by an attention factor.
    Yarn(YarnParams),
    /// LongRoPE as transformers 5.23's Phi-MoE applies it (`rope_type: longrope` with
    /// `short_mscale`/`long_mscale`): see [`LongRopeParams`].
    LongRope(LongRopeParams),
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
            "yarn" => {
                let p = params
                    .as_ref()
                    .expect("a rope type implies a parameter object");
                RopeScaling::Yarn(YarnParams::read(p, cfg, _max_positions)?)
            }
            "longrope" => {
                let p = params
                    .as_ref()
                    .expect("a rope type implies a parameter object");
                RopeScaling::LongRope(LongRopeParams::read(p, cfg, head_dim)?)
            }
            other => {
                return Err(cfg.error(
                    "rope_parameters.rope_type",
                    format!(
                        "`{other}` is not supported (supported: default, linear, yarn, longrope)"
                    ),
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

/// YaRN parameters, as transformers' `_compute_yarn_parameters` reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnParams {
    /// Context extension factor (`factor`; when absent, `max_position_embeddings /
    /// original_max_position_embeddings`).
    pub factor: f64,
    /// Pre-extension context (`original_max_position_embeddings`; defaults to
    /// `max_position_embeddings`).
    pub original_max_position_embeddings: usize,
    /// Rotation count bounding extrapolation (default 32).
    pub beta_fast: f64,
    /// Rotation count bounding interpolation (default 1).
    pub beta_slow: f64,
    /// DeepSeek's `mscale` (numerator of the attention factor when `mscale_all_dim` is set too).
    pub mscale: Option<f64>,
    /// DeepSeek's `mscale_all_dim`.
    pub mscale_all_dim: Option<f64>,
    /// Explicit `attention_factor`; overrides the one derived from `factor`/`mscale`.
    pub attention_factor: Option<f64>,
    /// Round the correction range outward to whole dimensions (`truncate`, default true).
    pub truncate: bool,
}

/// transformers' `get_mscale`: `0.1 · mscale · ln(scale) + 1` for `scale > 1`, else 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl YarnParams {
    /// Reads the YaRN fields of a rope parameter object (`rope_parameters` / `rope_scaling`).
    pub fn read(p: &ConfigFile, cfg: &ConfigFile, max_positions: usize) -> Result<Self> {
        let original = match p.opt_usize("original_max_position_embeddings")? {
            Some(o) => o,
            None => cfg
                .opt_usize("original_max_position_embeddings")?
                .unwrap_or(max_positions),
        };
        if original == 0 {
            return Err(p.error("original_max_position_embeddings", "must be at least 1"));
        }
        let factor = match p.opt_f64("factor")? {
            Some(f) => f,
            None => max_positions as f64 / original as f64,
        };
        if !(factor.is_finite() && factor > 0.0) {
            return Err(p.error("factor", format!("{factor} must be a positive number")));
        }
        // transformers: `get("beta_fast") or 32` — a zero or null falls back to the default.
        let nonzero = |v: Option<f64>| v.filter(|&x| x != 0.0);
        let y = Self {
            factor,
            original_max_position_embeddings: original,
            beta_fast: nonzero(p.opt_f64("beta_fast")?).unwrap_or(32.0),
            beta_slow: nonzero(p.opt_f64("beta_slow")?).unwrap_or(1.0),
            mscale: p.opt_f64("mscale")?,
            mscale_all_dim: p.opt_f64("mscale_all_dim")?,
            attention_factor: p.opt_f64("attention_factor")?,
            truncate: p.bool_or("truncate", true)?,
        };
        Ok(y)
    }

    /// The factor cos and sin are multiplied by (`attention_factor` in transformers).
    pub fn attention_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            // Python truthiness: both present and non-zero.
            (Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                yarn_get_mscale(self.factor, m) / yarn_get_mscale(self.factor, m_all)
            }
            _ => yarn_get_mscale(self.factor, 1.0),
        }
    }

    /// The inverse frequencies for `dim` rotated dimensions and base `theta`, computed in f32
    /// exactly as `_compute_yarn_parameters` does, with the attention factor.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> (Vec<f32>, f64) {
        let find_correction_dim = |n_rot: f64| -> f64 {
            (dim as f64
                * (self.original_max_position_embeddings as f64
                    / (n_rot * 2.0 * std::f64::consts::PI))
                    .ln())
                / (2.0 * theta.ln())
        };
        let mut low = find_correction_dim(self.beta_fast);
        let mut high = find_correction_dim(self.beta_slow);
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min((dim - 1) as f64);
        let high = if low == high { high + 0.001 } else { high };
        let factor = self.factor as f32;
        let inv_freq = (0..dim / 2)
            .map(|i| {
                // torch: `base ** (arange(0, dim, 2).float() / dim)` in f32.
                let pos_freq = (theta as f32).powf((2 * i) as f32 / dim as f32);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (factor * pos_freq);
                // `(arange(dim // 2) - low) / (high - low)` with Python-float bounds: torch
                // subtracts and divides in f32.
                let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect();
        (inv_freq, self.attention_factor())
    }
}

/// LongRoPE parameters as `PhimoeRotaryEmbedding` (transformers 5.23) uses them. Its forward
/// recomputes the inverse frequencies without a sequence length, so they are always divided
/// by `short_factor` (`long_factor` is never used); cos and sin are multiplied by
/// `short_mscale`, or by `long_mscale` in a forward call whose largest position + 1 exceeds
/// `original_max_position_embeddings` (all positions of that call, cached keys keep theirs).
#[derive(Debug, Clone, PartialEq)]
pub struct LongRopeParams {
    /// Per-frequency divisors of the inverse frequencies (`rotary_dim / 2` of them).
    pub short_factor: Vec<f64>,
    /// cos/sin factor while a call stays within the original context.
    pub short_mscale: f64,
    /// cos/sin factor for a call reaching past it.
    pub long_mscale: f64,
    /// The pre-training context (`original_max_position_embeddings`).
    pub original_max_position_embeddings: usize,
}

impl LongRopeParams {
    /// Reads the LongRoPE fields of a rope parameter object; `original_max_position_embeddings`
    /// may also be a top-level field of `cfg`.
    pub fn read(p: &ConfigFile, cfg: &ConfigFile, rotary_dim: usize) -> Result<Self> {
        let short_factor: Vec<f64> = match p.raw("short_factor").and_then(|v| v.as_array()) {
            Some(values) => values
                .iter()
                .map(|v| v.as_f64().filter(|f| f.is_finite() && *f > 0.0))
                .collect::<Option<_>>()
                .ok_or_else(|| p.error("short_factor", "must be a list of positive numbers"))?,
            None => return Err(p.error("short_factor", "missing (required by longrope)")),
        };
        if short_factor.len() != rotary_dim / 2 {
            return Err(p.error(
                "short_factor",
                format!(
                    "has {} entries; the rotary dimension {rotary_dim} needs {}",
                    short_factor.len(),
                    rotary_dim / 2
                ),
            ));
        }
        let mscale = |field: &str| -> Result<f64> {
            match p.opt_f64(field)? {
                Some(m) if m.is_finite() && m > 0.0 => Ok(m),
                Some(m) => Err(p.error(field, format!("{m} must be a positive number"))),
                None => Err(p.error(
                    field,
                    "missing (Phi-MoE's longrope scales cos/sin by short_mscale/long_mscale)",
                )),
            }
        };
        let original = match p.opt_usize("original_max_position_embeddings")? {
            Some(o) => o,
            None => cfg.usize("original_max_position_embeddings")?,
        };
        if original == 0 {
            return Err(p.error("original_max_position_embeddings", "must be at least 1"));
        }
        Ok(Self {
            short_factor,
            short_mscale: mscale("short_mscale")?,
            long_mscale: mscale("long_mscale")?,
            original_max_position_embeddings: original,
        })
    }

    /// The inverse frequencies for `dim` rotated dimensions and base `theta`, in f32 as
    /// `_compute_longrope_parameters` computes them: `1 / (short_factor · base^(2i/dim))`.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Vec<f32> {
        (0..dim / 2)
            .map(|i| {
                let pos_freq = (theta as f32).powf((2 * i) as f32 / dim as f32);
                1.0 / (self.short_factor[i] as f32 * pos_freq)
            })
            .collect()
    }
}

/// cos/sin tables that replace the main ones in a forward call reaching past `after`
/// positions (LongRoPE's `long_mscale`).
#[derive(Debug, Clone)]
struct LongRangeTables {
    after: usize,
    cos: Tensor,
    sin: Tensor,
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, rotary_dim / 2]`
    cos: Tensor,
    /// `[max_positions, rotary_dim / 2]`
    sin: Tensor,
    /// Tables for calls past the original context, when they differ (LongRoPE).
    long_range: Option<LongRangeTables>,
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
            RopeScaling::Yarn(_) => 1.0,
            RopeScaling::LongRope(_) => 1.0,
        };
        // YaRN replaces the frequencies and scales cos/sin by its attention factor.
        let (inv_freq, cos_sin_scale) = match &config.scaling {
            RopeScaling::Yarn(y) => y.inv_freq(config.theta, dim),
            // LongRoPE likewise, with its short-range cos/sin factor.
            RopeScaling::LongRope(l) => (l.inv_freq(config.theta, dim), l.short_mscale),
            _ => (inv_freq, 1.0),
        };
        let half = dim / 2;
        let mut freqs = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let p = pos as f32 * position_scale;
            freqs.extend(inv_freq.iter().map(|f| p * f));
        }
        let freqs = Tensor::from_vec(freqs, (max_positions, half), device)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos, sin) = if cos_sin_scale != 1.0 {
            // torch multiplies the f32 tables by the Python-float factor in f32.
            ((cos * cos_sin_scale)?, (sin * cos_sin_scale)?)
        } else {
            (cos, sin)
        };
        let long_range = match &config.scaling {
            RopeScaling::LongRope(l)
                if l.long_mscale != l.short_mscale
                    && max_positions > l.original_max_position_embeddings =>
            {
                Some(LongRangeTables {
                    after: l.original_max_position_embeddings,
                    cos: (freqs.cos()? * l.long_mscale)?.to_dtype(dtype)?,
                    sin: (freqs.sin()? * l.long_mscale)?.to_dtype(dtype)?,
                })
            }
            _ => None,
        };
        Ok(Self {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            long_range,
        })
    }

    /// The cos/sin tables of a call at positions `start..start + n_tokens`: an error past
    /// the context window; a call whose sequence reaches past the original context uses the
    /// long-range tables for all its positions, as transformers picks the factor from
    /// `max(position_ids) + 1`.
    fn tables_for(&self, start: usize, n_tokens: usize) -> Result<(&Tensor, &Tensor)> {
        let max = self.cos.dims()[0];
        if start + n_tokens > max {
            return Err(moe_core::Error::InvalidRequest(format!(
                "position {} is past the model's context window of {max} tokens",
                start + n_tokens - 1
            )));
        }
        Ok(match &self.long_range {
            Some(long) if start + n_tokens > long.after => (&long.cos, &long.sin),
            _ => (&self.cos, &self.sin),
        })
    }

    /// Rotates `x` (`[n_heads, n_tokens, head_dim]`) for consecutive positions starting at
    /// `start`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, n_tokens, _) = x.dims3()?;
        let (cos, sin) = self.tables_for(start, n_tokens)?;
        // [n_tokens, head_dim / 2]
        let cos = cos.narrow(0, start, n_tokens)?;
        let sin = sin.narrow(0, start, n_tokens)?;
        Ok(rotate_half_layout(x, &cos, &sin)?)
    }

    /// [`RotaryEmbedding::apply`] on host values (CPU tables only): `rows` holds `n_tokens`
    /// rows at positions `start..start + n_tokens`, each a whole number of `head_dim`-wide
    /// heads, rotated in place and rounded to the tables' dtype where the tensor path rounds
    /// (the same values, bit for bit).
    pub fn apply_rows_in_place(
        &self,
        rows: &mut [f32],
        n_tokens: usize,
        head_dim: usize,
        start: usize,
    ) -> Result<()> {
        let tables = self.tables_for(start, n_tokens)?;
        moe_kernels::cpu::rotate_half_rows_in_place(rows, n_tokens, head_dim, start, tables)
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

#[cfg(test)]
mod yarn_tests {
    use super::*;

    /// Within one ulp of transformers' bit patterns: torch's vectorised `base ** x` (Sleef,
    /// 1-ulp accurate) is not correctly rounded, Rust's `powf` is; the other steps are exact.
    fn assert_within_one_ulp(ours: &[f32], expected: &[u32]) {
        assert_eq!(ours.len(), expected.len());
        for (i, (o, &e)) in ours.iter().zip(expected).enumerate() {
            assert!(
                o.to_bits().abs_diff(e) <= 1,
                "inv_freq[{i}]: {:#x} vs {e:#x}",
                o.to_bits()
            );
        }
    }

    fn params(
        factor: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    ) -> YarnParams {
        YarnParams {
            factor,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim,
            attention_factor: None,
            truncate,
        }
    }

    /// Bit patterns printed by transformers 5.23 `_compute_yarn_parameters` (GPT-OSS: theta
    /// 150000, head_dim 32, factor 32, truncate false).
    #[test]
    fn matches_transformers_gpt_oss() {
        let (f, a) = params(32.0, None, None, false).inv_freq(150_000.0, 32);
        let expected = [
            0x3f800000, 0x3ef316a2, 0x3e66d3fa, 0x3ddb2f9f, 0x3d502194, 0x3c9e646f, 0x3bdea840,
            0x3b093803, 0x39ef543c, 0x3820adc6, 0x37989328, 0x3710e12c, 0x3689928c, 0x3602a245,
            0x35781728, 0x34eb93eb,
        ];
        assert_within_one_ulp(&f, &expected);
        assert!((a - 1.3465735902799727).abs() < 1e-15);
    }

    /// DeepSeek-style: rope dim 8, factor 40, mscale 1 / mscale_all_dim 0.707, truncate default.
    #[test]
    fn matches_transformers_mscale() {
        let (f, a) = params(40.0, Some(1.0), Some(0.707), true).inv_freq(10_000.0, 8);
        assert_within_one_ulp(&f, &[0x3f800000, 0x3dcccccd, 0x3ba7ef9d, 0x37d1b717]);
        assert!((a - 1.0857263992561355).abs() < 1e-15);
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // values as transformers prints them
mod longrope_tests {
    use super::*;

    /// The phimoe fixture's rope with `long_mscale` changed to 1.5 so the two ranges differ.
    fn rope() -> RotaryEmbedding {
        let config = RopeConfig {
            theta: 10_000.0,
            rotary_dim: 16,
            scaling: RopeScaling::LongRope(LongRopeParams {
                short_factor: vec![1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 1.8, 2.2],
                short_mscale: 1.243163121016122,
                long_mscale: 1.5,
                original_max_position_embeddings: 4096,
            }),
        };
        RotaryEmbedding::new(&config, 5001, DType::F32, &Device::Cpu).unwrap()
    }

    /// cos (first half) and sin (second half) of the rotation applied to the `row`-th of
    /// `n_tokens` positions starting at `start`.
    fn cos_sin(rope: &RotaryEmbedding, start: usize, n_tokens: usize, row: usize) -> Vec<f32> {
        let x = Tensor::cat(
            &[
                Tensor::ones((1, n_tokens, 8), DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros((1, n_tokens, 8), DType::F32, &Device::Cpu).unwrap(),
            ],
            D::Minus1,
        )
        .unwrap();
        let y = rope.apply(&x, start).unwrap();
        y.get(0).unwrap().get(row).unwrap().to_vec1().unwrap()
    }

    fn assert_close(ours: &[f32], expected: &[f32]) {
        for (o, e) in ours.iter().zip(expected) {
            assert!((o - e).abs() < 2e-6, "{ours:?} vs {expected:?}");
        }
    }

    /// Bit patterns and values printed by transformers 5.23 `PhimoeRotaryEmbedding`.
    #[test]
    fn matches_transformers_phimoe() {
        let params = LongRopeParams {
            short_factor: vec![1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 1.8, 2.2],
            short_mscale: 1.243163121016122,
            long_mscale: 1.5,
            original_max_position_embeddings: 4096,
        };
        let expected: [u32; 8] = [
            0x3f800000, 0x3e9a32dd, 0x3dba2e8c, 0x3cd7e0ce, 0x3bf2b9d6, 0x3b0a297b, 0x3a11a2b4,
            0x3916b8e2,
        ];
        for (i, (o, e)) in params
            .inv_freq(10_000.0, 16)
            .iter()
            .zip(expected)
            .enumerate()
        {
            assert!(o.to_bits().abs_diff(e) <= 1, "inv_freq[{i}]");
        }
        let rope = rope();
        // Position 7 alone: short_mscale.
        let short_7 = [
            0.937223494052887,
            -0.6363683938980103,
            0.9998288750648499,
            1.2220720052719116,
            1.2414922714233398,
            1.243027687072754,
            1.243153691291809,
            1.2431625127792358,
            0.8167415261268616,
            1.0679371356964111,
            0.7387804388999939,
            0.2280232161283493,
            0.06443142890930176,
            0.01834506168961525,
            0.0048345113173127174,
            0.0012508447980508208,
        ];
        assert_close(&cos_sin(&rope, 7, 1, 0), &short_7);
        // Position 4095 (sequence of 4096): still short; 4096: long.
        assert_close(
            &cos_sin(&rope, 4095, 1, 0)[..2],
            &[-0.08201891928911209, -0.2630555033683777],
        );
        assert_close(
            &cos_sin(&rope, 4096, 1, 0)[..2],
            &[1.2059859037399292, -0.7379679679870605],
        );
        assert_close(
            &cos_sin(&rope, 5000, 1, 0)[..2],
            &[0.2320026159286499, -0.7803444862365723],
        );
        // Position 7 in a call that reaches past 4096 positions: long_mscale.
        assert_close(
            &cos_sin(&rope, 7, 4090, 0)[..4],
            &[
                1.1308534145355225,
                -0.7678418159484863,
                1.2063930034637451,
                1.4745514392852783,
            ],
        );
    }
}

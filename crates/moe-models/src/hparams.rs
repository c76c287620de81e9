//! Hyper-parameters every decoder architecture shares, read from config.json and checked for
//! consistency. Architecture files read their own extra fields.

use candle_core::{DType, Device};
use moe_core::Result;
use moe_loader::ConfigFile;

use crate::blocks::norm::NormKind;
use crate::blocks::rope::{RopeConfig, RopeScaling};

/// What the loader was asked for, beyond the checkpoint itself.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// Device to place the model on.
    pub device: Device,
    /// Builds the routed experts' source (the tiered expert cache); `None`: every expert is
    /// loaded resident.
    pub expert_source: Option<std::sync::Arc<dyn crate::experts::ExpertSourceFactory>>,
    /// How routed experts are stored: the compute dtype, or int8 with per-row scales
    /// (`--expert-dtype q8`: CPU and fast numerics only, refused otherwise at load).
    pub expert_dtype: moe_kernels::WeightDtype,
    /// How the dense projections are stored (attention, dense and shared-expert MLPs, lm
    /// head; not routers or embeddings): the compute dtype, or int8 with per-row scales
    /// (`--dense-dtype q8`: CPU and fast numerics only, refused otherwise at load).
    pub dense_dtype: moe_kernels::WeightDtype,
}

/// Largest context window accepted (the rotary tables cover every position up front).
pub const MAX_POSITIONS: usize = 1 << 24;

/// Largest attention width (`num_attention_heads × head_dim`) accepted; far above any real
/// model, it keeps shape arithmetic from overflowing on corrupt configs.
const MAX_DIM: usize = 1 << 31;

/// The shared decoder hyper-parameters.
#[derive(Debug, Clone)]
pub struct DecoderHParams {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Context window.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Kind of the input, post-attention and final norms (RMSNorm unless the architecture
    /// file says otherwise); `rms_norm_eps` is their epsilon either way.
    pub norm: NormKind,
    /// `lm_head` has a bias (Phi-MoE's `lm_head_bias`; false unless the architecture file
    /// sets it).
    pub lm_head_bias: bool,
}

impl DecoderHParams {
    /// Reads and validates the common fields; `default_tie` is the architecture's default for
    /// `tie_word_embeddings`.
    pub fn read(cfg: &ConfigFile, default_tie: bool) -> Result<Self> {
        Self::read_dims(cfg, default_tie, None)
    }

    /// Like [`read`](Self::read), for attention whose head size is not the config's `head_dim`
    /// (DeepSeek's MLA, whose `head_dim` field is the rope part): `head_dim` is set to the given
    /// one and the rotary tables cover `rotary_dim` dimensions.
    pub fn read_with_head_dims(
        cfg: &ConfigFile,
        default_tie: bool,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<Self> {
        Self::read_dims(cfg, default_tie, Some((head_dim, rotary_dim)))
    }

    /// `dims`: explicit (head, rotary) dimensions instead of the config's `head_dim`.
    fn read_dims(
        cfg: &ConfigFile,
        default_tie: bool,
        dims: Option<(usize, usize)>,
    ) -> Result<Self> {
        let hidden_size = cfg.usize("hidden_size")?;
        let n_heads = cfg.usize("num_attention_heads")?;
        if n_heads == 0 {
            return Err(cfg.error("num_attention_heads", "must be at least 1"));
        }
        let n_kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(cfg.error(
                "num_key_value_heads",
                format!("{n_kv_heads} does not divide num_attention_heads {n_heads}"),
            ));
        }
        let head_dim = match dims.map(|d| d.0).or(cfg.opt_usize("head_dim")?) {
            Some(d) => d,
            None => {
                if hidden_size % n_heads != 0 {
                    return Err(cfg.error(
                        "hidden_size",
                        format!("{hidden_size} is not divisible by num_attention_heads {n_heads} (and no head_dim is given)"),
                    ));
                }
                hidden_size / n_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(cfg.error(
                "head_dim",
                format!("{head_dim} must be even and non-zero for rotary embeddings"),
            ));
        }
        if n_heads.checked_mul(head_dim).is_none_or(|w| w > MAX_DIM) {
            return Err(cfg.error(
                "num_attention_heads",
                format!("{n_heads} heads of dimension {head_dim} is implausibly large"),
            ));
        }
        let act = cfg.opt_str("hidden_act")?.unwrap_or("silu");
        if act != "silu" {
            return Err(cfg.error(
                "hidden_act",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
        let max_position_embeddings = cfg.usize("max_position_embeddings")?;
        if max_position_embeddings > MAX_POSITIONS {
            return Err(cfg.error(
                "max_position_embeddings",
                format!("{max_position_embeddings} is larger than the supported {MAX_POSITIONS} (the rotary table is precomputed)"),
            ));
        }
        let hp = Self {
            vocab_size: cfg.usize("vocab_size")?,
            hidden_size,
            n_layers: cfg.usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", default_tie)?,
            rope: RopeConfig::read(cfg, dims.map_or(head_dim, |d| d.1), max_position_embeddings)?,
            norm: NormKind::Rms,
            lm_head_bias: false,
        };
        if !(hp.rms_norm_eps.is_finite() && hp.rms_norm_eps > 0.0) {
            return Err(cfg.error(
                "rms_norm_eps",
                format!("{} must be a positive number", hp.rms_norm_eps),
            ));
        }
        if !(hp.rope.theta.is_finite() && hp.rope.theta > 0.0) {
            return Err(cfg.error(
                "rope_theta",
                format!("{} must be a positive number", hp.rope.theta),
            ));
        }
        if let RopeScaling::Linear { factor } = hp.rope.scaling {
            if !(factor.is_finite() && factor > 0.0) {
                return Err(cfg.error(
                    "rope_parameters.factor",
                    format!("{factor} must be a positive number"),
                ));
            }
        }
        if hp.vocab_size == 0 || hp.hidden_size == 0 || hp.n_layers == 0 {
            return Err(cfg.error(
                "vocab_size/hidden_size/num_hidden_layers",
                "must all be at least 1",
            ));
        }
        Ok(hp)
    }
}

/// Reads the MoE size fields shared by the Qwen/OLMoE families and checks `top_k ≤ n_experts`.
pub fn read_expert_counts(cfg: &ConfigFile, expert_fields: &[&str]) -> Result<(usize, usize)> {
    let n_experts = cfg.usize_any(expert_fields)?;
    let top_k = cfg.usize("num_experts_per_tok")?;
    if top_k == 0 || top_k > n_experts {
        return Err(cfg.error(
            "num_experts_per_tok",
            format!("{top_k} must be between 1 and the number of experts ({n_experts})"),
        ));
    }
    Ok((n_experts, top_k))
}

/// Rejects a sliding window that a config turns on (no architecture of this family uses one
/// in its released checkpoints; silently ignoring it would change results on long prompts).
pub fn reject_sliding_window(cfg: &ConfigFile, enabled_by: Option<&str>) -> Result<()> {
    let enabled = match enabled_by {
        Some(flag) => cfg.bool_or(flag, false)?,
        None => true,
    };
    if enabled {
        if let Some(window) = cfg.opt_usize("sliding_window")? {
            if window > 0 {
                return Err(cfg.error("sliding_window", format!("sliding-window attention ({window}) is not supported for this architecture")));
            }
        }
    }
    Ok(())
}

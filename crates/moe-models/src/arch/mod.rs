//! The architecture table: one row per supported Hugging Face class, each pointing at a small
//! file that reads its config fields and fills a [`DecoderRecipe`]. Adding an architecture
//! costs one file, one row here and one fixture.

mod deepseek;
mod deepseek_v2;
mod deepseek_v3;
mod gpt_oss;
mod granitemoe;
mod llama;
mod mixtral;
mod olmoe;
mod phimoe;
mod qwen2_moe;
mod qwen3;
mod qwen3_moe;

use moe_core::{Error, Result};
use moe_loader::ConfigFile;

use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe};

/// One supported architecture.
pub struct Architecture {
    /// The `architectures[0]` class name in config.json.
    pub hf_class: &'static str,
    /// Reads the config and describes the model.
    pub recipe: fn(&ConfigFile) -> Result<DecoderRecipe>,
    /// The transformers fixtures that verify it (folders under `tests/fixtures`).
    pub verified_by: &'static [&'static str],
}

/// Every architecture moe-infer can load.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        hf_class: "MixtralForCausalLM",
        recipe: mixtral::recipe,
        verified_by: &["mixtral", "mixtral-bf16"],
    },
    Architecture {
        hf_class: "Qwen2MoeForCausalLM",
        recipe: qwen2_moe::recipe,
        verified_by: &["qwen2_moe", "qwen2_moe-normtopk"],
    },
    Architecture {
        hf_class: "Qwen3MoeForCausalLM",
        recipe: qwen3_moe::recipe,
        verified_by: &["qwen3_moe", "qwen3_moe-bf16", "qwen3_moe-nonorm"],
    },
    Architecture {
        hf_class: "OlmoeForCausalLM",
        recipe: olmoe::recipe,
        verified_by: &["olmoe", "olmoe-normtopk"],
    },
    Architecture {
        hf_class: "LlamaForCausalLM",
        recipe: llama::recipe,
        verified_by: &["llama", "llama-tied"],
    },
    Architecture {
        hf_class: "Qwen3ForCausalLM",
        recipe: qwen3::recipe,
        verified_by: &["qwen3"],
    },
    Architecture {
        hf_class: "GptOssForCausalLM",
        recipe: gpt_oss::recipe,
        verified_by: &["gpt_oss"],
    },
    Architecture {
        hf_class: "GraniteMoeForCausalLM",
        recipe: granitemoe::recipe,
        verified_by: &["granitemoe"],
    },
    Architecture {
        hf_class: "PhimoeForCausalLM",
        recipe: phimoe::recipe,
        verified_by: &["phimoe"],
    },
    Architecture {
        hf_class: "DeepseekV2ForCausalLM",
        recipe: deepseek_v2::recipe,
        verified_by: &["deepseek_v2", "deepseek_v2-lite"],
    },
    Architecture {
        hf_class: "DeepseekV3ForCausalLM",
        recipe: deepseek_v3::recipe,
        verified_by: &["deepseek_v3", "deepseek_v3-nonorm"],
    },
];

/// Comma-separated class names, for messages.
pub fn supported_architectures() -> String {
    ARCHITECTURES
        .iter()
        .map(|a| a.hf_class)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The table row for the class named in `config.json`.
pub fn find_architecture(cfg: &ConfigFile) -> Result<&'static Architecture> {
    let name = match cfg
        .raw("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
    {
        Some(name) => name,
        None => {
            return Err(cfg.error(
                "architectures",
                "missing; expected a list naming the model class",
            ))
        }
    };
    ARCHITECTURES
        .iter()
        .find(|a| a.hf_class == name)
        .ok_or_else(|| Error::UnknownArchitecture {
            name: name.to_string(),
            supported: supported_architectures(),
        })
}

/// The feed-forward of every layer under the Qwen-MoE rule: sparse (`moe`) unless the layer is
/// in `mlp_only_layers` or `(layer + 1) % decoder_sparse_step != 0`, else a dense MLP of
/// `intermediate_size`.
pub(crate) fn qwen_layer_ffn(
    cfg: &ConfigFile,
    n_layers: usize,
    moe: MoeRecipe,
) -> Result<Vec<FfnRecipe>> {
    let step = cfg.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(cfg.error("decoder_sparse_step", "must be at least 1"));
    }
    let dense_layers = cfg.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
    if let Some(&bad) = dense_layers.iter().find(|&&l| l >= n_layers) {
        return Err(cfg.error(
            "mlp_only_layers",
            format!("layer {bad} does not exist ({n_layers} layers)"),
        ));
    }
    let dense = FfnRecipe::Dense {
        intermediate: cfg.usize("intermediate_size")?,
    };
    Ok((0..n_layers)
        .map(|l| {
            if !dense_layers.contains(&l) && (l + 1) % step == 0 {
                FfnRecipe::Sparse(moe.clone())
            } else {
                dense.clone()
            }
        })
        .collect())
}

/// The usual attention config: biases as given, 1/√head_dim scale.
pub(crate) fn standard_attention(
    hp: &crate::hparams::DecoderHParams,
    qkv_bias: bool,
    qk_norm: crate::blocks::attention::QkNorm,
    clip_qkv: Option<f64>,
) -> crate::blocks::attention::AttentionConfig {
    crate::blocks::attention::AttentionConfig {
        hidden_size: hp.hidden_size,
        n_heads: hp.n_heads,
        n_kv_heads: hp.n_kv_heads,
        head_dim: hp.head_dim,
        qkv_bias,
        o_bias: false,
        qk_norm,
        norm_eps: hp.rms_norm_eps,
        clip_qkv,
        softmax_scale: 1.0 / (hp.head_dim as f64).sqrt(),
        sinks: false,
        sliding_window: None,
        latent: None,
        dense_dtype: moe_kernels::WeightDtype::Compute,
    }
}

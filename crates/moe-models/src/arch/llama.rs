//! `LlamaForCausalLM`: the dense baseline. Plain GQA attention (q/k/v/o biases together under
//! `attention_bias`), a gated MLP in every layer, no MoE block.

use moe_core::Result;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe};
use crate::hparams::DecoderHParams;

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    // LlamaConfig's defaults where they differ from the shared reader's (which requires it).
    let cfg = &with_defaults(cfg, &[("max_position_embeddings", 2048.into())]);
    let hparams = DecoderHParams::read(cfg, false)?;
    if cfg.bool_or("mlp_bias", false)? {
        return Err(cfg.error("mlp_bias", "MLP biases are not supported"));
    }
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::None, None);
    attention.o_bias = bias;
    let ffn = vec![dense_ffn(cfg)?; hparams.n_layers];
    Ok(DecoderRecipe::new(
        "LlamaForCausalLM",
        hparams,
        attention,
        ffn,
    ))
}

/// The dense feed-forward of every layer of a dense model (`mlp.{gate,up,down}_proj`).
pub(super) fn dense_ffn(cfg: &ConfigFile) -> Result<FfnRecipe> {
    Ok(FfnRecipe::Dense {
        intermediate: cfg.usize("intermediate_size")?,
    })
}

/// `cfg` with the config class's default filled in for each field the file leaves out
/// entirely (an explicit `null` stays null).
pub(super) fn with_defaults(
    cfg: &ConfigFile,
    defaults: &[(&str, serde_json::Value)],
) -> ConfigFile {
    let mut json = cfg.json().clone();
    if let Some(map) = json.as_object_mut() {
        for (field, value) in defaults {
            map.entry(*field).or_insert_with(|| value.clone());
        }
    }
    ConfigFile::from_value(cfg.path(), json)
}

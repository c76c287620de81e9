//! `Qwen3ForCausalLM`: dense Qwen3, per-head q/k RMSNorm, `head_dim` independent of the width,
//! a gated MLP in every layer, no MoE block.

use moe_core::Result;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::DecoderRecipe;
use crate::hparams::DecoderHParams;

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    if cfg.json().get("head_dim").is_some_and(|v| v.is_null()) {
        return Err(cfg.error("head_dim", "must be an integer (transformers rejects null)"));
    }
    // Qwen3Config's defaults, which differ from the usual derived ones.
    let cfg = &super::llama::with_defaults(
        cfg,
        &[
            ("head_dim", 128.into()),
            ("num_key_value_heads", 32.into()),
            ("max_position_embeddings", 32768.into()),
        ],
    );
    let hparams = DecoderHParams::read(cfg, false)?;
    reject_sliding_layers(cfg, hparams.n_layers)?;
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::PerHead, None);
    attention.o_bias = bias;
    let ffn = vec![super::llama::dense_ffn(cfg)?; hparams.n_layers];
    Ok(DecoderRecipe::new(
        "Qwen3ForCausalLM",
        hparams,
        attention,
        ffn,
    ))
}

/// Fails if any layer would use sliding-window attention: `layer_types` when given, else (as
/// Qwen3Config derives it) the layers from `max_window_layers` on when `use_sliding_window`
/// is set and `sliding_window` is not null.
fn reject_sliding_layers(cfg: &ConfigFile, n_layers: usize) -> Result<()> {
    if let Some(types) = cfg.raw("layer_types") {
        let types = types
            .as_array()
            .ok_or_else(|| cfg.error("layer_types", format!("expected a list, found {types}")))?;
        if let Some((i, t)) = types
            .iter()
            .enumerate()
            .find(|(_, t)| t.as_str() != Some("full_attention"))
        {
            return Err(cfg.error(
                "layer_types",
                format!("layer {i} is {t}; only full_attention layers are supported"),
            ));
        }
        return Ok(());
    }
    let window = cfg.opt_usize("sliding_window")?;
    if cfg.bool_or("use_sliding_window", false)? && window.is_some() {
        let first = cfg.opt_usize("max_window_layers")?.unwrap_or(28);
        if first < n_layers {
            return Err(cfg.error(
                "use_sliding_window",
                format!(
                    "sliding-window attention ({} tokens from layer {first} on, max_window_layers) is not supported",
                    window.unwrap_or(0)
                ),
            ));
        }
    }
    Ok(())
}

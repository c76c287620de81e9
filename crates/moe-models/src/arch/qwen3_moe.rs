//! `Qwen3MoeForCausalLM`: per-head q/k RMSNorm, no shared expert, `norm_topk_prob`, sparse
//! layers chosen by `decoder_sparse_step` and `mlp_only_layers`.

use moe_core::{Result, RoutingSpec};
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, MoeRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, reject_sliding_window, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    reject_sliding_window(cfg, Some("use_sliding_window"))?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_experts", "num_local_experts"])?;
    let moe = MoeRecipe::new(
        "mlp",
        cfg.usize("moe_intermediate_size")?,
        ExpertLayout::PerExpert(ExpertNames::GATE_UP_DOWN_PROJ),
        RoutingSpec::softmax_top_k(n_experts, top_k, cfg.bool_or("norm_topk_prob", false)?),
    );
    let ffn = super::qwen_layer_ffn(cfg, hparams.n_layers, moe)?;
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::PerHead, None);
    attention.o_bias = bias;
    Ok(DecoderRecipe::new(
        "Qwen3MoeForCausalLM",
        hparams,
        attention,
        ffn,
    ))
}

//! `Qwen2MoeForCausalLM`: q/k/v biases, a shared expert scaled by `sigmoid(shared_expert_gate)`,
//! sparse layers chosen by `decoder_sparse_step` and `mlp_only_layers`.

use moe_core::{Result, RoutingSpec};
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, MoeRecipe, SharedExpertRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, reject_sliding_window, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    reject_sliding_window(cfg, Some("use_sliding_window"))?;
    if let Some(types) = cfg.raw("layer_types").and_then(|t| t.as_array()) {
        if types.iter().any(|t| t.as_str() != Some("full_attention")) {
            return Err(cfg.error("layer_types", "only full_attention layers are supported"));
        }
    }
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_experts"])?;
    let shared_size = cfg
        .opt_usize("shared_expert_intermediate_size")?
        .unwrap_or(0);
    let moe = MoeRecipe {
        shared: (shared_size > 0).then_some(SharedExpertRecipe {
            name: "shared_expert",
            intermediate: shared_size,
            n_fused: 1,
            gate: Some("shared_expert_gate"),
        }),
        ..MoeRecipe::new(
            "mlp",
            cfg.usize("moe_intermediate_size")?,
            ExpertLayout::PerExpert(ExpertNames::GATE_UP_DOWN_PROJ),
            RoutingSpec::softmax_top_k(n_experts, top_k, cfg.bool_or("norm_topk_prob", false)?),
        )
    };
    let ffn = super::qwen_layer_ffn(cfg, hparams.n_layers, moe)?;
    let attention =
        super::standard_attention(&hparams, cfg.bool_or("qkv_bias", true)?, QkNorm::None, None);
    Ok(DecoderRecipe::new(
        "Qwen2MoeForCausalLM",
        hparams,
        attention,
        ffn,
    ))
}

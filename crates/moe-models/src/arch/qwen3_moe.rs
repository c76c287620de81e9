//! `Qwen3MoeForCausalLM`: per-head q/k RMSNorm, no shared expert, `norm_topk_prob`, sparse
//! layers chosen by `decoder_sparse_step` and `mlp_only_layers`.

use moe_core::{Result, RoutingSpec, ScoringFunction};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, reject_sliding_window, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    reject_sliding_window(cfg, Some("use_sliding_window"))?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_experts", "num_local_experts"])?;
    let moe = MoeRecipe {
        block: "mlp",
        intermediate: cfg.usize("moe_intermediate_size")?,
        experts: ExpertLayout::PerExpert(ExpertNames::GATE_UP_DOWN_PROJ),
        router: RouterRecipe::GATE,
        activation: ExpertActivation::SiluGlu,
        routing: RoutingSpec {
            n_experts,
            top_k,
            scoring: ScoringFunction::Softmax,
            renormalize: cfg.bool_or("norm_topk_prob", false)?,
            scaling_factor: 1.0,
        },
        round_weights: true,
        shared: None,
    };
    let dense = FfnRecipe::Dense {
        intermediate: cfg.usize("intermediate_size")?,
    };
    let ffn = super::qwen_sparse_layers(cfg, hparams.n_layers)?
        .into_iter()
        .map(|sparse| {
            if sparse {
                FfnRecipe::Sparse(moe.clone())
            } else {
                dense.clone()
            }
        })
        .collect();
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::PerHead, None);
    attention.o_bias = bias;
    Ok(DecoderRecipe {
        architecture: "Qwen3MoeForCausalLM",
        attention,
        ffn,
        hparams,
        facts: Vec::new(),
        layer_windows: Vec::new(),
        multipliers: Multipliers::NONE,
    })
}

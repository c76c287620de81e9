//! `MixtralForCausalLM`: every layer sparse (`block_sparse_moe`, experts `w1`/`w3`/`w2`),
//! softmax top-k with renormalisation, plain GQA attention.

use moe_core::{Result, RoutingSpec, ScoringFunction};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, reject_sliding_window, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    reject_sliding_window(cfg, None)?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_local_experts"])?;
    let moe = MoeRecipe {
        block: "block_sparse_moe",
        intermediate: cfg.usize("intermediate_size")?,
        experts: ExpertLayout::PerExpert(ExpertNames::MIXTRAL_W1_W3_W2),
        router: RouterRecipe::GATE,
        activation: ExpertActivation::SiluGlu,
        routing: RoutingSpec {
            n_experts,
            top_k,
            scoring: ScoringFunction::Softmax,
            renormalize: true,
            scaling_factor: 1.0,
        },
        round_weights: false,
        shared: None,
    };
    Ok(DecoderRecipe {
        architecture: "MixtralForCausalLM",
        attention: super::standard_attention(&hparams, false, QkNorm::None, None),
        ffn: vec![FfnRecipe::Sparse(moe); hparams.n_layers],
        hparams,
        facts: Vec::new(),
        layer_windows: Vec::new(),
        multipliers: Multipliers::NONE,
    })
}

//! `MixtralForCausalLM`: every layer sparse (`block_sparse_moe`, experts `w1`/`w3`/`w2`),
//! softmax top-k with renormalisation, plain GQA attention.

use moe_core::{Result, RoutingSpec};
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, reject_sliding_window, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    reject_sliding_window(cfg, None)?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_local_experts"])?;
    let moe = MoeRecipe {
        // transformers multiplies Mixtral's expert outputs by the f32 weights.
        round_weights: false,
        ..MoeRecipe::new(
            "block_sparse_moe",
            cfg.usize("intermediate_size")?,
            ExpertLayout::PerExpert(ExpertNames::MIXTRAL_W1_W3_W2),
            RoutingSpec::softmax_top_k(n_experts, top_k, true),
        )
    };
    let attention = super::standard_attention(&hparams, false, QkNorm::None, None);
    let ffn = vec![FfnRecipe::Sparse(moe); hparams.n_layers];
    Ok(DecoderRecipe::new(
        "MixtralForCausalLM",
        hparams,
        attention,
        ffn,
    ))
}

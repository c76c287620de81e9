//! `OlmoeForCausalLM`: q/k RMSNorm over the whole projection, optional `clip_qkv`, every layer
//! sparse with `intermediate_size` experts, `norm_topk_prob`.

use moe_core::{Result, RoutingSpec};
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_experts"])?;
    let moe = MoeRecipe::new(
        "mlp",
        cfg.usize("intermediate_size")?,
        ExpertLayout::PerExpert(ExpertNames::GATE_UP_DOWN_PROJ),
        RoutingSpec::softmax_top_k(n_experts, top_k, cfg.bool_or("norm_topk_prob", false)?),
    );
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(
        &hparams,
        bias,
        QkNorm::WholeProjection,
        cfg.opt_f64("clip_qkv")?,
    );
    attention.o_bias = bias;
    let ffn = vec![FfnRecipe::Sparse(moe); hparams.n_layers];
    Ok(DecoderRecipe::new(
        "OlmoeForCausalLM",
        hparams,
        attention,
        ffn,
    ))
}

//! `OlmoeForCausalLM`: q/k RMSNorm over the whole projection, optional `clip_qkv`, every layer
//! sparse with `intermediate_size` experts, `norm_topk_prob`.

use moe_core::{Result, RoutingSpec, ScoringFunction};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_experts"])?;
    let moe = MoeRecipe {
        block: "mlp",
        intermediate: cfg.usize("intermediate_size")?,
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
    let clip = cfg.opt_f64("clip_qkv")?;
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::WholeProjection, clip);
    attention.o_bias = bias;
    Ok(DecoderRecipe {
        architecture: "OlmoeForCausalLM",
        attention,
        ffn: vec![FfnRecipe::Sparse(moe); hparams.n_layers],
        hparams,
        facts: Vec::new(),
        layer_windows: Vec::new(),
        multipliers: Multipliers::NONE,
    })
}

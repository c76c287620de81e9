//! `GraniteMoeForCausalLM`: Mixtral-like with four scalar multipliers (embedding, residual,
//! attention scale, logits divisor), stacked experts (`input_linear` gate;up,
//! `output_linear`), router `router.layer`, top-k over the logits then softmax.

use moe_core::{Result, RoutingSpec};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe};
use crate::experts::{ExpertLayout, StackedExperts};
use crate::hparams::{read_expert_counts, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_local_experts"])?;
    let positive = |field: &str| -> Result<f64> {
        let v = cfg.opt_f64(field)?.unwrap_or(1.0);
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(cfg.error(field, format!("{v} must be a positive number")))
        }
    };
    let multipliers = Multipliers {
        embedding: positive("embedding_multiplier")?,
        residual: positive("residual_multiplier")?,
        logits_divisor: positive("logits_scaling")?,
    };
    let attention_multiplier = positive("attention_multiplier")?;
    let moe = MoeRecipe {
        block: "block_sparse_moe",
        intermediate: cfg.usize("intermediate_size")?,
        experts: ExpertLayout::Stacked(StackedExperts::GRANITE),
        router: RouterRecipe {
            name: "router.layer",
            ..RouterRecipe::GATE
        },
        activation: ExpertActivation::SiluGlu,
        routing: RoutingSpec::top_k_then_softmax(n_experts, top_k),
        // `softmax(top_k_logits).type_as(hidden_states)`.
        round_weights: true,
        shared: None,
    };
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::None, None);
    attention.o_bias = bias;
    attention.softmax_scale = attention_multiplier;
    let facts = vec![
        ("embedding multiplier", multipliers.embedding.to_string()),
        ("residual multiplier", multipliers.residual.to_string()),
        ("attention multiplier", attention_multiplier.to_string()),
        (
            "logits scaling",
            format!("÷ {}", multipliers.logits_divisor),
        ),
    ];
    Ok(DecoderRecipe {
        architecture: "GraniteMoeForCausalLM",
        attention,
        ffn: vec![FfnRecipe::Sparse(moe); hparams.n_layers],
        facts,
        layer_windows: Vec::new(),
        multipliers,
        hparams,
    })
}

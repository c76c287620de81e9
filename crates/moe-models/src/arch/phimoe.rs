//! `PhimoeForCausalLM` (Phi-3.5-MoE): Mixtral's layout (`block_sparse_moe`, experts
//! `w1`/`w3`/`w2`, router `gate`) with sparsemixer top-2 routing, LayerNorm with bias for the
//! input/post-attention/final norms, biases on q/k/v/o (`attention_bias`) and on lm_head
//! (`lm_head_bias`), and LongRoPE scaled by `short_mscale`/`long_mscale`.

use moe_core::{Result, RoutingSpec, ScoringFunction};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::blocks::norm::NormKind;
use crate::blocks::rope::RopeScaling;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    // PhimoeConfig's defaults where they differ from the shared reader's.
    let cfg = &super::llama::with_defaults(
        cfg,
        &[
            ("rms_norm_eps", 1e-5.into()),
            ("rope_theta", 1e6.into()),
            ("max_position_embeddings", 131_072.into()),
        ],
    );
    let mut hparams = DecoderHParams::read(cfg, false)?;
    hparams.norm = NormKind::Layer;
    hparams.lm_head_bias = cfg.bool_or("lm_head_bias", false)?;
    if hparams.lm_head_bias && hparams.tie_word_embeddings {
        return Err(cfg.error(
            "lm_head_bias",
            "an lm_head bias with tied embeddings is not supported",
        ));
    }
    // Phi-3.5-MoE ships `sliding_window` = the context window, which masks nothing.
    if let Some(window) = cfg.opt_usize("sliding_window")? {
        if window < hparams.max_position_embeddings {
            return Err(cfg.error(
                "sliding_window",
                format!(
                    "a window of {window} (< max_position_embeddings {}) is not supported",
                    hparams.max_position_embeddings
                ),
            ));
        }
    }
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_local_experts"])?;
    if top_k != 2 {
        return Err(cfg.error(
            "num_experts_per_tok",
            format!("{top_k} is not supported: sparsemixer always routes to 2 experts"),
        ));
    }
    let jitter_eps = cfg.opt_f64("router_jitter_noise")?.unwrap_or(0.01);
    if !(jitter_eps.is_finite() && jitter_eps >= 0.0) {
        return Err(cfg.error(
            "router_jitter_noise",
            format!("{jitter_eps} must be a non-negative number"),
        ));
    }
    let moe = MoeRecipe {
        block: "block_sparse_moe",
        intermediate: cfg.usize("intermediate_size")?,
        experts: ExpertLayout::PerExpert(ExpertNames::MIXTRAL_W1_W3_W2),
        router: RouterRecipe::GATE,
        activation: ExpertActivation::SiluGlu,
        routing: RoutingSpec {
            n_experts,
            top_k,
            scoring: ScoringFunction::SparseMixer { jitter_eps },
            renormalize: false,
            scaling_factor: 1.0,
        },
        // The multipliers come out of a softmax in the router logits' dtype.
        round_weights: true,
        shared: None,
    };
    let bias = cfg.bool_or("attention_bias", false)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::None, None);
    attention.o_bias = bias;
    let mut facts = vec![
        (
            "routing",
            format!("sparsemixer top-2, jitter_eps {jitter_eps}"),
        ),
        ("norm", "LayerNorm with bias".to_string()),
    ];
    if let RopeScaling::LongRope(l) = &hparams.rope.scaling {
        facts.push((
            "rope",
            format!(
                "longrope: short_factor, short_mscale {:.4}; long_mscale {:.4} past {} positions",
                l.short_mscale, l.long_mscale, l.original_max_position_embeddings
            ),
        ));
    }
    Ok(DecoderRecipe {
        architecture: "PhimoeForCausalLM",
        attention,
        ffn: vec![FfnRecipe::Sparse(moe); hparams.n_layers],
        hparams,
        facts,
        layer_windows: Vec::new(),
        multipliers: Multipliers::NONE,
    })
}

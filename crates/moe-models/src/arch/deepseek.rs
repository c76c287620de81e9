//! What DeepSeek-V2 and V3 share: multi-head latent attention, `first_k_dense_replace` dense
//! layers then MoE layers every `moe_layer_freq`, shared experts (`n_shared_experts` ×
//! `moe_intermediate_size` as one ungated MLP), and `routed_scaling_factor`. The family files
//! say how the router scores and where the rope pairs are.

use moe_core::{GroupLimit, GroupScore, Result, RoutingSpec, ScoringFunction};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::blocks::mla::{LatentConfig, RopeLayout};
use crate::blocks::rope::{yarn_get_mscale, RopeScaling};
use crate::decoder::{
    DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe, SharedExpertRecipe,
};
use crate::experts::{ExpertLayout, ExpertNames};
use crate::hparams::{read_expert_counts, DecoderHParams};

/// A family's defaults (transformers' config class values) and its routing.
pub(crate) struct Family {
    /// The HF class name.
    pub architecture: &'static str,
    /// How the rope part of q and k is laid out.
    pub rope_layout: RopeLayout,
    /// Default `first_k_dense_replace`.
    pub first_k_dense_replace: usize,
    /// Default `n_shared_experts`.
    pub n_shared_experts: usize,
    /// Default `routed_scaling_factor`.
    pub routed_scaling_factor: f64,
    /// Scoring function (group limit included) and renormalisation.
    pub scoring: ScoringFunction,
    /// Renormalise the chosen weights.
    pub renormalize: bool,
    /// The router has an `e_score_correction_bias`.
    pub correction_bias: bool,
}

/// The group limit `n_group`/`topk_group` describe, `None` when it keeps every group.
pub(crate) fn group_limit(
    cfg: &ConfigFile,
    defaults: (usize, usize),
    n_experts: usize,
    group_score: GroupScore,
) -> Result<Option<GroupLimit>> {
    let n_group = cfg.opt_usize("n_group")?.unwrap_or(defaults.0);
    let topk_group = cfg.opt_usize("topk_group")?.unwrap_or(defaults.1);
    if n_group == 0 || !n_experts.is_multiple_of(n_group) {
        return Err(cfg.error(
            "n_group",
            format!("{n_group} does not divide n_routed_experts {n_experts}"),
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(cfg.error(
            "topk_group",
            format!("{topk_group} must be between 1 and n_group {n_group}"),
        ));
    }
    if group_score == GroupScore::SumTop2 && topk_group < n_group && n_experts / n_group < 2 {
        return Err(cfg.error(
            "n_group",
            format!("{n_group} groups of {n_experts} experts leave fewer than the 2 per group a group score needs"),
        ));
    }
    Ok((topk_group < n_group).then_some(GroupLimit {
        n_group,
        topk_group,
        group_score,
    }))
}

/// `n_routed_experts` and `num_experts_per_tok`.
pub(crate) fn expert_counts(cfg: &ConfigFile) -> Result<(usize, usize)> {
    read_expert_counts(
        cfg,
        &["n_routed_experts", "num_local_experts", "num_experts"],
    )
}

/// Rejects a config string field whose value is not one of `accepted` (absent is accepted).
pub(crate) fn expect_str(cfg: &ConfigFile, field: &str, accepted: &[&str]) -> Result<()> {
    match cfg.opt_str(field)? {
        Some(v) if !accepted.contains(&v) => Err(cfg.error(
            field,
            format!(
                "`{v}` is not supported (supported: {})",
                accepted.join(", ")
            ),
        )),
        _ => Ok(()),
    }
}

/// The whole recipe of a DeepSeek-family model.
pub(crate) fn recipe(cfg: &ConfigFile, family: Family) -> Result<DecoderRecipe> {
    let nope = cfg.usize("qk_nope_head_dim")?;
    let rot = cfg.usize("qk_rope_head_dim")?;
    if rot == 0 || rot % 2 != 0 {
        return Err(cfg.error(
            "qk_rope_head_dim",
            format!("{rot} must be even and non-zero"),
        ));
    }
    let latent = LatentConfig {
        q_lora_rank: cfg.opt_usize("q_lora_rank")?,
        kv_lora_rank: cfg.usize("kv_lora_rank")?,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rot,
        v_head_dim: cfg.usize("v_head_dim")?,
        rope_layout: family.rope_layout,
    };
    if latent.kv_lora_rank == 0 || latent.v_head_dim == 0 || latent.q_lora_rank == Some(0) {
        return Err(cfg.error("kv_lora_rank/q_lora_rank/v_head_dim", "must be at least 1"));
    }
    // The config's `head_dim` is the rope part; the attention head is nope + rope.
    let hparams = DecoderHParams::read_with_head_dims(cfg, false, nope + rot, rot)?;
    if hparams.n_kv_heads != hparams.n_heads {
        return Err(cfg.error(
            "num_key_value_heads",
            format!(
                "{} differs from num_attention_heads {}: latent attention expands keys and values for every head",
                hparams.n_kv_heads, hparams.n_heads
            ),
        ));
    }
    if cfg.bool_or("mlp_bias", false)? {
        return Err(cfg.error("mlp_bias", "biases in the MLPs are not supported"));
    }
    // transformers' `yarn_apply_mscale`: q·k scaled by (nope + rope)^-0.5 · mscale², with
    // mscale = 0.1 · mscale_all_dim · ln(factor) + 1, when the rope type sets mscale_all_dim.
    let mut softmax_scale = ((nope + rot) as f64).powf(-0.5);
    if let RopeScaling::Yarn(y) = &hparams.rope.scaling {
        if let Some(m) = y.mscale_all_dim.filter(|&m| m != 0.0) {
            let mscale = yarn_get_mscale(y.factor, m);
            softmax_scale = softmax_scale * mscale * mscale;
        }
    }
    let mut attention = super::standard_attention(
        &hparams,
        cfg.bool_or("attention_bias", false)?,
        QkNorm::None,
        None,
    );
    attention.o_bias = attention.qkv_bias;
    attention.softmax_scale = softmax_scale;
    attention.latent = Some(latent.clone());

    let (n_experts, top_k) = expert_counts(cfg)?;
    let moe_intermediate = cfg.usize("moe_intermediate_size")?;
    let n_shared = cfg
        .opt_usize("n_shared_experts")?
        .unwrap_or(family.n_shared_experts);
    let scaling_factor = cfg
        .opt_f64("routed_scaling_factor")?
        .unwrap_or(family.routed_scaling_factor);
    if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
        return Err(cfg.error(
            "routed_scaling_factor",
            format!("{scaling_factor} must be a positive number"),
        ));
    }
    let routing = RoutingSpec {
        n_experts,
        top_k,
        scoring: family.scoring,
        renormalize: family.renormalize,
        scaling_factor: scaling_factor as f32,
    };
    let moe = MoeRecipe {
        block: "mlp",
        intermediate: moe_intermediate,
        experts: ExpertLayout::PerExpert(ExpertNames::GATE_UP_DOWN_PROJ),
        router: RouterRecipe {
            correction_bias: family.correction_bias,
            f32_logits: true,
            ..RouterRecipe::GATE
        },
        activation: ExpertActivation::SiluGlu,
        routing: routing.clone(),
        // transformers multiplies expert outputs by the f32 weights.
        round_weights: false,
        shared: (n_shared > 0).then_some(SharedExpertRecipe {
            name: "shared_experts",
            intermediate: n_shared * moe_intermediate,
            n_fused: n_shared,
            gate: None,
        }),
    };
    let first_dense = cfg
        .opt_usize("first_k_dense_replace")?
        .unwrap_or(family.first_k_dense_replace);
    let freq = cfg.opt_usize("moe_layer_freq")?.unwrap_or(1);
    if freq == 0 {
        return Err(cfg.error("moe_layer_freq", "must be at least 1"));
    }
    let dense = FfnRecipe::Dense {
        intermediate: cfg.usize("intermediate_size")?,
    };
    // DeepSeek's rule (transformers ignores moe_layer_freq, always 1 in released configs).
    let ffn = (0..hparams.n_layers)
        .map(|layer| {
            if layer >= first_dense && layer % freq == 0 {
                FfnRecipe::Sparse(moe.clone())
            } else {
                dense.clone()
            }
        })
        .collect();
    let facts = facts(
        &latent,
        &routing,
        family.correction_bias,
        first_dense,
        freq,
        n_shared,
        softmax_scale,
    );
    Ok(DecoderRecipe {
        architecture: family.architecture,
        attention,
        ffn,
        hparams,
        facts,
        layer_windows: Vec::new(),
        multipliers: Multipliers::NONE,
    })
}

/// What `inspect` shows about MLA and the router.
fn facts(
    latent: &LatentConfig,
    routing: &RoutingSpec,
    correction_bias: bool,
    first_dense: usize,
    freq: usize,
    n_shared: usize,
    softmax_scale: f64,
) -> Vec<(&'static str, String)> {
    let scoring = match routing.scoring {
        ScoringFunction::Sigmoid | ScoringFunction::SigmoidGroupLimited(_) => "sigmoid",
        _ => "softmax",
    };
    let (n_group, topk_group, group_score) = match routing.scoring.group_limit() {
        Some(g) => (
            g.n_group.to_string(),
            g.topk_group.to_string(),
            match g.group_score {
                GroupScore::Max => "max",
                GroupScore::SumTop2 => "sum of top-2",
            },
        ),
        None => ("1".into(), "1".into(), "none"),
    };
    vec![
        ("mla", "multi-head latent attention".into()),
        (
            "q_lora_rank",
            latent
                .q_lora_rank
                .map_or("none (q_proj)".into(), |r| r.to_string()),
        ),
        ("kv_lora_rank", latent.kv_lora_rank.to_string()),
        (
            "qk_nope/qk_rope/v_head_dim",
            format!(
                "{}/{}/{}",
                latent.qk_nope_head_dim, latent.qk_rope_head_dim, latent.v_head_dim
            ),
        ),
        ("rope_layout", format!("{:?}", latent.rope_layout)),
        ("softmax_scale", format!("{softmax_scale:.6}")),
        (
            "scoring",
            format!(
                "{scoring}{}",
                if correction_bias {
                    " + e_score_correction_bias (choice only)"
                } else {
                    ""
                }
            ),
        ),
        ("n_group/topk_group", format!("{n_group}/{topk_group}")),
        ("group_score", group_score.into()),
        ("routed_scaling_factor", routing.scaling_factor.to_string()),
        ("first_k_dense_replace", first_dense.to_string()),
        ("moe_layer_freq", freq.to_string()),
        ("n_shared_experts", n_shared.to_string()),
    ]
}

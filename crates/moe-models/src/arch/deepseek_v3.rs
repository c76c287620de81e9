//! `DeepseekV3ForCausalLM` (also Kimi-K2): MLA with `rope_interleave`, sigmoid router scores
//! chosen with `e_score_correction_bias` inside the `topk_group` best of `n_group` groups
//! (group score = sum of its top-2), weights from the uncorrected scores, `norm_topk_prob`,
//! × `routed_scaling_factor`.

use moe_core::{GroupScore, Result, ScoringFunction};
use moe_loader::ConfigFile;

use super::deepseek::{self, expect_str, Family};
use crate::blocks::mla::RopeLayout;
use crate::decoder::DecoderRecipe;

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    expect_str(cfg, "scoring_func", &["sigmoid"])?;
    expect_str(cfg, "topk_method", &["noaux_tc"])?;
    let (n_experts, _) = deepseek::expert_counts(cfg)?;
    let scoring = match deepseek::group_limit(cfg, (8, 4), n_experts, GroupScore::SumTop2)? {
        Some(limit) => ScoringFunction::SigmoidGroupLimited(limit),
        None => ScoringFunction::Sigmoid,
    };
    deepseek::recipe(
        cfg,
        Family {
            architecture: "DeepseekV3ForCausalLM",
            rope_layout: if cfg.bool_or("rope_interleave", true)? {
                RopeLayout::PairsToHalves
            } else {
                RopeLayout::Halves
            },
            first_k_dense_replace: 3,
            n_shared_experts: 1,
            routed_scaling_factor: 2.5,
            scoring,
            renormalize: cfg.bool_or("norm_topk_prob", true)?,
            correction_bias: true,
        },
    )
}

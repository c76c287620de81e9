//! `DeepseekV2ForCausalLM`: MLA with rope on complex pairs, softmax router scores, greedy or
//! group-limited greedy top-k (group score = max), weights × `routed_scaling_factor` and never
//! renormalised (transformers' V2 router ignores `norm_topk_prob`).

use moe_core::{GroupScore, Result, ScoringFunction};
use moe_loader::ConfigFile;

use super::deepseek::{self, expect_str, Family};
use crate::blocks::mla::RopeLayout;
use crate::decoder::DecoderRecipe;

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    expect_str(cfg, "scoring_func", &["softmax"])?;
    let (n_experts, _) = deepseek::expert_counts(cfg)?;
    let scoring = match cfg.opt_str("topk_method")?.unwrap_or("greedy") {
        "greedy" => ScoringFunction::Softmax,
        "group_limited_greedy" => {
            match deepseek::group_limit(cfg, (1, 1), n_experts, GroupScore::Max)? {
                Some(limit) => ScoringFunction::SoftmaxGroupLimited(limit),
                None => ScoringFunction::Softmax,
            }
        }
        other => {
            return Err(cfg.error(
                "topk_method",
                format!("`{other}` is not supported (supported: greedy, group_limited_greedy)"),
            ))
        }
    };
    deepseek::recipe(
        cfg,
        Family {
            architecture: "DeepseekV2ForCausalLM",
            rope_layout: RopeLayout::Pairs,
            first_k_dense_replace: 0,
            n_shared_experts: 2,
            routed_scaling_factor: 1.0,
            scoring,
            renormalize: false,
            correction_bias: false,
        },
    )
}

//! The routing contract between the router, the expert store and the expert compute:
//! which experts each token goes to, and with what weight. Decides nothing itself.

use candle_core::Tensor;

/// How router logits become selection scores.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum ScoringFunction {
    /// softmax over all experts, then top-k (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// top-k over the raw logits, then softmax over the k chosen (GPT-OSS, Granite).
    TopKThenSoftmax,
    /// Phi-MoE's sparsemixer, inference path (always two experts): the first is the largest
    /// logit, weighted by its softmax over the logits within a relative distance
    /// `2·jitter_eps` of it; the second is the largest remaining logit, weighted likewise
    /// over the remaining logits near it.
    SparseMixer {
        /// `router_jitter_noise`: half the relative logit distance that masks an expert out.
        jitter_eps: f64,
    },
    /// sigmoid of each logit (DeepSeek-V3 `scoring_func: sigmoid`), then top-k. A correction
    /// bias passed with the logits (`e_score_correction_bias`) shifts the choice only: the
    /// weights are the sigmoid scores without it; renormalisation divides by their sum + 1e-20.
    Sigmoid,
    /// [`Softmax`](Self::Softmax) scores, chosen only inside the best expert groups
    /// (DeepSeek-V2 `topk_method: group_limited_greedy`).
    SoftmaxGroupLimited(GroupLimit),
    /// [`Sigmoid`](Self::Sigmoid) scores (bias for the choice included), chosen only inside the
    /// best expert groups (DeepSeek-V3 `noaux_tc`).
    SigmoidGroupLimited(GroupLimit),
}

/// DeepSeek's group limit: the experts are split into `n_group` equal consecutive groups, the
/// `topk_group` groups with the best group score are kept (ties: lower group first), and the
/// top-k is taken among their experts only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GroupLimit {
    /// Number of expert groups (`n_group`); divides the number of experts.
    pub n_group: usize,
    /// Groups kept per token (`topk_group`).
    pub topk_group: usize,
    /// How a group's score is computed from its experts' selection scores.
    pub group_score: GroupScore,
}

/// A group's score from its experts' selection scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum GroupScore {
    /// The best expert's score (DeepSeek-V2).
    Max,
    /// The sum of the two best experts' scores (DeepSeek-V3).
    SumTop2,
}

impl ScoringFunction {
    /// The group limit, for the group-limited variants.
    pub fn group_limit(&self) -> Option<GroupLimit> {
        match *self {
            Self::SoftmaxGroupLimited(limit) | Self::SigmoidGroupLimited(limit) => Some(limit),
            _ => None,
        }
    }
}

/// What an MoE layer's router does: the part of the config that routing needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoutingSpec {
    /// Number of routed experts in the layer.
    pub n_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// How logits become scores.
    pub scoring: ScoringFunction,
    /// Divide the chosen weights by their sum (`norm_topk_prob`).
    pub renormalize: bool,
    /// Multiply the final weights by this (`routed_scaling_factor`, 1.0 when absent).
    pub scaling_factor: f32,
}

impl RoutingSpec {
    /// A spec with every field given.
    pub fn new(
        n_experts: usize,
        top_k: usize,
        scoring: ScoringFunction,
        renormalize: bool,
        scaling_factor: f32,
    ) -> Self {
        Self {
            n_experts,
            top_k,
            scoring,
            renormalize,
            scaling_factor,
        }
    }

    /// Top-k over the raw logits, softmax over the chosen, no scale (GPT-OSS, Granite).
    pub fn top_k_then_softmax(n_experts: usize, top_k: usize) -> Self {
        Self {
            n_experts,
            top_k,
            scoring: ScoringFunction::TopKThenSoftmax,
            renormalize: false,
            scaling_factor: 1.0,
        }
    }

    /// Softmax over all experts, top-k, optionally renormalised, no scale (Mixtral, Qwen, OLMoE).
    pub fn softmax_top_k(n_experts: usize, top_k: usize, renormalize: bool) -> Self {
        Self {
            n_experts,
            top_k,
            scoring: ScoringFunction::Softmax,
            renormalize,
            scaling_factor: 1.0,
        }
    }
}

/// One expert of one layer: the key the expert store is addressed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// Decoder layer index.
    pub layer: usize,
    /// Expert index within the layer.
    pub expert: usize,
}

/// The router's decision for a batch of token rows. Stays on the device the router ran on:
/// consumers that need host values (grouping on the CPU, statistics) read it there.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[n_tokens, top_k]` u32: chosen expert ids, in order of decreasing score.
    pub expert_ids: Tensor,
    /// `[n_tokens, top_k]` f32: the factor each chosen expert's output is multiplied by.
    pub weights: Tensor,
}

impl Routing {
    /// Number of token rows routed.
    pub fn n_tokens(&self) -> usize {
        self.expert_ids.dims().first().copied().unwrap_or(0)
    }

    /// Experts chosen per token.
    pub fn top_k(&self) -> usize {
        self.expert_ids.dims().get(1).copied().unwrap_or(0)
    }
}

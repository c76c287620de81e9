//! The routing contract between the router, the expert store and the expert compute:
//! which experts each token goes to, and with what weight. Decides nothing itself.

use candle_core::Tensor;

/// How router logits become selection scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ScoringFunction {
    /// softmax over all experts, then top-k (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// top-k over the raw logits, then softmax over the k chosen (GPT-OSS, Granite).
    TopKThenSoftmax,
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

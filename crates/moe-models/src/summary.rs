//! Facts about a loaded model for `moe-infer inspect`: shape, experts, parameter counts
//! (total and active per token) and bytes per checkpoint dtype.

use std::collections::BTreeMap;

use candle_core::DType;
use moe_kernels::WeightDtype;
use moe_loader::Checkpoint;

use crate::decoder::FfnRecipe;
use crate::hparams::DecoderHParams;

/// What `inspect` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSummary {
    /// HF class name.
    pub architecture: String,
    /// Decoder layers.
    pub n_layers: usize,
    /// Layers with a sparse MoE block.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer (of the first MoE layer).
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Shared experts per MoE layer.
    pub n_shared_experts: usize,
    /// Renormalise top-k weights.
    pub norm_topk_prob: bool,
    /// Model width.
    pub hidden_size: usize,
    /// Query heads / kv heads / head dim.
    pub heads: (usize, usize, usize),
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context window.
    pub context_length: usize,
    /// Parameters in the checkpoint.
    pub params_total: u64,
    /// Parameters touched per token (non-expert + top_k routed experts per MoE layer).
    pub params_active: u64,
    /// Bytes of routed-expert weights in the checkpoint.
    pub routed_expert_bytes: u64,
    /// Checkpoint bytes per stored dtype.
    pub checkpoint_bytes_by_dtype: BTreeMap<String, u64>,
    /// Compute dtype chosen at load.
    pub compute_dtype: String,
    /// How routed experts are held: `q8` (int8, per-row f32 scales) or the compute dtype.
    pub expert_dtype: String,
    /// How the dense projections are held (attention, dense and shared-expert MLPs, lm head):
    /// `q8` or the compute dtype.
    pub dense_dtype: String,
    /// Routed-expert parameters touched per token (`top_k` experts per MoE layer), part of
    /// `params_active`.
    pub params_active_routed: u64,
    /// Family-specific facts (name, value).
    pub facts: BTreeMap<String, String>,
}

impl ModelSummary {
    /// Computes the summary from the recipe and the checkpoint headers.
    pub(crate) fn new(
        architecture: &str,
        hp: &DecoderHParams,
        ffn: &[FfnRecipe],
        facts: &[(&'static str, String)],
        checkpoint: &Checkpoint,
        dtype: DType,
        expert_dtype: WeightDtype,
        dense_dtype: WeightDtype,
    ) -> Self {
        let mut params_total = 0u64;
        let mut bytes_by_dtype: BTreeMap<String, u64> = BTreeMap::new();
        for file in checkpoint.files() {
            for entry in file.tensors().values() {
                params_total += entry.shape.iter().product::<usize>() as u64;
                *bytes_by_dtype.entry(entry.dtype.clone()).or_default() +=
                    (entry.data_offsets.1 - entry.data_offsets.0) as u64;
            }
        }
        let total_bytes: u64 = bytes_by_dtype.values().sum();
        let bytes_per_param = if params_total == 0 {
            0.0
        } else {
            total_bytes as f64 / params_total as f64
        };
        let mut inactive = 0u64;
        let mut routed = 0u64;
        let mut active_routed = 0u64;
        let mut moe_layers = Vec::new();
        let mut first = None;
        for (layer, f) in ffn.iter().enumerate() {
            if let FfnRecipe::Sparse(moe) = f {
                let per_expert = 3 * (hp.hidden_size * moe.intermediate) as u64;
                inactive += (moe.routing.n_experts - moe.routing.top_k) as u64 * per_expert;
                active_routed += moe.routing.top_k as u64 * per_expert;
                routed += moe.routing.n_experts as u64 * per_expert;
                moe_layers.push(layer);
                first.get_or_insert(moe);
            }
        }
        Self {
            architecture: architecture.to_string(),
            n_layers: hp.n_layers,
            moe_layers,
            n_experts: first.map_or(0, |m| m.routing.n_experts),
            top_k: first.map_or(0, |m| m.routing.top_k),
            n_shared_experts: first
                .and_then(|m| m.shared.as_ref())
                .map_or(0, |s| s.n_fused),
            norm_topk_prob: first.is_some_and(|m| m.routing.renormalize),
            hidden_size: hp.hidden_size,
            heads: (hp.n_heads, hp.n_kv_heads, hp.head_dim),
            vocab_size: hp.vocab_size,
            context_length: hp.max_position_embeddings,
            params_total,
            params_active: params_total - inactive,
            routed_expert_bytes: (routed as f64 * bytes_per_param) as u64,
            checkpoint_bytes_by_dtype: bytes_by_dtype,
            compute_dtype: format!("{dtype:?}").to_lowercase(),
            expert_dtype: expert_dtype.describe(dtype),
            dense_dtype: dense_dtype.describe(dtype),
            params_active_routed: active_routed,
            facts: facts
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }
}

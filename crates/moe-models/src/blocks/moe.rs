//! The sparse MoE block as a pipeline: router → group token rows by expert → expert FFN
//! (weights from the [`ExpertSource`]) → weighted combine, plus an optional shared expert.
//!
//! Contracts: the router sees only hidden states and its own weights; grouping skips experts
//! that received no rows; experts are computed in increasing id order and each token's
//! outputs are summed in that order, as transformers does.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moe_core::{ExpertKey, Result, Routing, RoutingSpec};
use moe_kernels::{
    combine, expert_ffn, fused, ExpertActivation, ExpertGroups, MoeExperts, StackedExperts,
};

use crate::blocks::linear::Linear;
use crate::blocks::mlp::GatedMlp;
use crate::experts::ExpertSource;

/// An always-on expert added to the routed output, optionally scaled by `sigmoid(gate(x))`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The expert itself.
    pub mlp: GatedMlp,
    /// `[1, hidden]` gate (Qwen2-MoE's `shared_expert_gate`), when present.
    pub gate: Option<Linear>,
}

/// Receives every routing decision of a forward pass (tests, statistics, prefetch).
pub trait RoutingObserver {
    /// Called once per MoE layer with the router logits (`[n_tokens, n_experts]`) and the
    /// routing of the packed batch.
    fn on_routing(&mut self, layer: usize, logits: &Tensor, routing: &Routing);
}

/// A sparse MoE feed-forward block.
pub struct SparseMoeBlock {
    /// Decoder layer index (the expert store's key).
    pub layer: usize,
    /// `[n_experts, hidden]` router.
    pub router: Linear,
    /// The router weight is f32 and multiplies `x` in f32 (DeepSeek).
    pub f32_logits: bool,
    /// `[n_experts]` f32 bias added to the selection scores for the choice only (DeepSeek-V3's
    /// `e_score_correction_bias`).
    pub correction_bias: Option<Tensor>,
    /// Routing parameters.
    pub routing: RoutingSpec,
    /// Round the routing weights to the activation dtype before applying them.
    pub round_weights: bool,
    /// Where the routed experts' weights come from.
    pub experts: Arc<dyn ExpertSource>,
    /// Activation inside each expert.
    pub activation: ExpertActivation,
    /// Shared expert, if the architecture has one.
    pub shared: Option<SharedExpert>,
}

impl SparseMoeBlock {
    /// Applies the block to `x` (`[n_tokens, hidden]`).
    pub fn forward(
        &self,
        x: &Tensor,
        observer: Option<&mut dyn RoutingObserver>,
    ) -> Result<Tensor> {
        x.dims2()?; // [n_tokens, hidden]
                    // [n_tokens, n_experts]
        let logits = if self.f32_logits {
            self.router.forward(&x.to_dtype(DType::F32)?)?
        } else {
            self.router.forward(x)?
        };
        // the CPU kernel on the CPU, kernels/moe_topk.cu on a GPU
        let mut routing = fused::route(&logits, self.correction_bias.as_ref(), &self.routing)?;
        if self.round_weights {
            routing.weights = routing.weights.to_dtype(x.dtype())?.to_dtype(DType::F32)?;
        }
        if let Some(observer) = observer {
            observer.on_routing(self.layer, &logits, &routing);
        }
        let groups = ExpertGroups::from_routing(&routing, self.routing.n_experts)?;
        let active: Vec<usize> = groups.active_experts().collect();
        self.experts.prefetch(self.layer, &active);
        let mut y = if x.device().is_cuda() {
            self.routed_on_gpu(x, &routing, &active)?
        } else {
            self.routed_on_cpu(x, &groups, &active)?
        };
        if let Some(shared) = &self.shared {
            let mut s = shared.mlp.forward(x)?;
            if let Some(gate) = &shared.gate {
                // sigmoid in f32, rounded once (candle's bf16 sigmoid rounds per step).
                let g = gate.forward(x)?;
                let g = candle_nn::ops::sigmoid(&g.to_dtype(DType::F32)?)?.to_dtype(g.dtype())?;
                s = g.broadcast_mul(&s)?;
            }
            y = (y + s)?;
        }
        Ok(y)
    }

    /// Our CUDA kernels: the active experts stacked into slots, then the decode kernels or the
    /// grouped GEMM with the combine fused (`moe_kernels::MoeExperts`).
    fn routed_on_gpu(&self, x: &Tensor, routing: &Routing, active: &[usize]) -> Result<Tensor> {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            eprintln!(
                "moe-models: on CUDA the active experts are stacked into a temporary pool every \
                 step (the expert cache has no device pool yet)"
            )
        });
        let weights = active
            .iter()
            .map(|&expert| {
                let key = ExpertKey {
                    layer: self.layer,
                    expert,
                };
                Ok((expert, self.experts.expert(key)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<_> = weights.iter().map(|(e, w)| (*e, w.as_ref())).collect();
        let stacked = StackedExperts::stack(&refs, self.routing.n_experts)?;
        let op = MoeExperts {
            experts: &stacked,
            n_experts: self.routing.n_experts,
            activation: self.activation,
        };
        op.forward(x, &routing.expert_ids, &routing.weights)
    }

    /// The CPU kernels: each active expert's FFN over its rows, then the weighted combine.
    fn routed_on_cpu(&self, x: &Tensor, groups: &ExpertGroups, active: &[usize]) -> Result<Tensor> {
        let (n_tokens, hidden) = x.dims2()?;
        let mut outputs = Vec::with_capacity(active.len());
        for &expert in active {
            let (rows, _) = groups.rows(expert);
            let rows = Tensor::from_slice(rows, rows.len(), x.device())?;
            // [n_rows, hidden]
            let expert_in = x.index_select(&rows, 0)?;
            let weights = self.experts.expert(ExpertKey {
                layer: self.layer,
                expert,
            })?;
            outputs.push(expert_ffn(&expert_in, &weights, self.activation)?);
        }
        combine(n_tokens, hidden, groups, &outputs, x.dtype(), x.device())
    }
}

//! The sparse MoE block as a pipeline: router → group token rows by expert → expert FFN
//! (weights from the [`ExpertSource`]) → weighted combine, plus an optional shared expert.
//!
//! Contracts: the router sees only hidden states and its own weights; grouping skips experts
//! that received no rows; experts are computed in increasing id order and each token's
//! outputs are summed in that order, as transformers does.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moe_core::{ExpertKey, Result, Routing, RoutingSpec};
use moe_kernels::cpu::{fast_grouped_experts_in_waves, numerics, Numerics};
use moe_kernels::{
    combine, expert_ffn, fused, ExpertActivation, ExpertGroups, MoeExperts, StackedExperts,
};

use crate::blocks::linear::Linear;
use crate::blocks::mlp::GatedMlp;
use crate::experts::{ExpertGuess, ExpertSource};

/// An always-on expert added to the routed output, optionally scaled by `sigmoid(gate(x))`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The expert itself.
    pub mlp: GatedMlp,
    /// `[1, hidden]` gate (Qwen2-MoE's `shared_expert_gate`), when present.
    pub gate: Option<Linear>,
}

/// Receives every routing decision of a forward pass (tests, statistics, prefetch).
pub trait RoutingObserver: Send {
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
    /// Router logits (`[n_tokens, n_experts]`) and routing of `x` (`[n_tokens, hidden]`).
    fn route(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
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
        Ok((logits, routing))
    }

    /// The experts (ascending ids) this block's router picks for `x`, each with its share of
    /// the rows' routing weight: applied to an earlier hidden state, a guess of what the block
    /// will need (routing-aware prefetch).
    pub fn guess_experts(&self, x: &Tensor) -> Result<Vec<ExpertGuess>> {
        let (_, routing) = self.route(x)?;
        let groups = ExpertGroups::from_routing(&routing, self.routing.n_experts)?;
        // Each row's weights summed, so that a share does not depend on the scaling factor or
        // on renormalisation.
        let mut row_total = vec![0f32; x.dim(0)?];
        for (&row, &w) in groups.token_rows.iter().zip(&groups.weights) {
            row_total[row as usize] += w;
        }
        Ok(groups
            .active_experts()
            .map(|expert| {
                let slots = groups.offsets[expert]..groups.offsets[expert + 1];
                let strength = groups.token_rows[slots.clone()]
                    .iter()
                    .zip(&groups.weights[slots])
                    .map(|(&row, &w)| {
                        let total = row_total[row as usize];
                        if total > 0.0 {
                            w / total
                        } else {
                            0.0
                        }
                    })
                    .sum();
                ExpertGuess { expert, strength }
            })
            .collect())
    }

    /// Applies the block to `x` (`[n_tokens, hidden]`).
    pub fn forward(
        &self,
        x: &Tensor,
        observer: Option<&mut dyn RoutingObserver>,
    ) -> Result<Tensor> {
        let (n_tokens, _hidden) = x.dims2()?;
        let (logits, routing) = self.route(x)?;
        if let Some(observer) = observer {
            observer.on_routing(self.layer, &logits, &routing);
        }
        let groups = ExpertGroups::from_routing(&routing, self.routing.n_experts)?;
        let active: Vec<usize> = groups.active_experts().collect();
        self.experts.routed(self.layer, n_tokens, &active);
        let mut in_place = self
            .experts
            .compute_in_place(self.layer, &groups, &active)?;
        in_place.sort_by_key(|(e, _)| *e);
        let mut y = if in_place.is_empty() {
            self.routed_here(x, Some(&routing), &groups, &active)?
        } else {
            let placed: Vec<usize> = in_place.iter().map(|(e, _)| *e).collect();
            let fetched: Vec<usize> = active
                .iter()
                .copied()
                .filter(|e| !placed.contains(e))
                .collect();
            let there = self.routed_in_place(x, &groups.restricted_to_set(&placed), &in_place)?;
            if fetched.is_empty() {
                there
            } else {
                let here = groups.restricted_to_set(&fetched);
                (self.routed_here(x, None, &here, &fetched)? + there)?
            }
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

    /// The routed experts `active` of `groups` on `x`'s device: our CUDA kernels, the grouped
    /// CPU kernel, or the per-expert reference. `routing` is the layer's whole routing, given
    /// when `groups` is all of it (the CUDA kernels read it).
    fn routed_here(
        &self,
        x: &Tensor,
        routing: Option<&Routing>,
        groups: &ExpertGroups,
        active: &[usize],
    ) -> Result<Tensor> {
        if x.device().is_cuda() {
            return match routing {
                Some(routing) => self.routed_on_gpu(x, routing, groups, active),
                None => {
                    static PART: std::sync::Once = std::sync::Once::new();
                    PART.call_once(|| {
                        eprintln!(
                            "moe-models: some experts are computed in place on the host: on CUDA \
                             the others then run one at a time with candle ops"
                        )
                    });
                    self.routed_reference(x, groups, active)
                }
            };
        }
        match self.routed_fast(x, groups, active)? {
            Some(y) => Ok(y),
            None => self.routed_reference(x, groups, active),
        }
    }

    /// Experts the expert source computes where their weights live (Fiddler): `x`'s rows go
    /// to the weights' device (host RAM under a GPU cache), the weighted sum comes back.
    /// `groups` holds only these experts' slots; `in_place` is in increasing expert order.
    fn routed_in_place(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        in_place: &[(usize, Arc<moe_kernels::ExpertWeights>)],
    ) -> Result<Tensor> {
        let there = in_place[0].1.gate.device().clone();
        let x_there = x.to_device(&there)?;
        if there.is_cpu() && numerics() == Numerics::Fast {
            let weights: Vec<&moe_kernels::ExpertWeights> =
                in_place.iter().map(|(_, w)| w.as_ref()).collect();
            if let Some(y) =
                moe_kernels::cpu::fast_grouped_experts(&x_there, groups, &weights, self.activation)?
            {
                return Ok(y.to_device(x.device())?);
            }
        }
        let y = self.per_expert(
            &x_there,
            groups,
            in_place.iter().map(|(e, w)| (*e, Ok(w.clone()))),
        )?;
        Ok(y.to_device(x.device())?)
    }

    /// The routed experts with the grouped CPU kernel ([`fast_grouped_experts_in_waves`]): gate and up
    /// fused with the activation, the down projection accumulated into the output rows.
    /// `None` when it does not apply (torch-exact numerics, not the CPU, other dtypes).
    fn routed_fast(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        active: &[usize],
    ) -> Result<Option<Tensor>> {
        if numerics() != Numerics::Fast || !x.device().is_cpu() || active.is_empty() {
            return Ok(None);
        }
        // A budgeted expert cache lets a caller hold only so many experts at once: the layer
        // then runs in waves of consecutive active experts, summed in f32.
        let wave = self.experts.max_held_experts().unwrap_or(active.len());
        let y = fast_grouped_experts_in_waves(x, groups, active, wave, self.activation, |ids| {
            self.experts.experts(self.layer, ids)
        })?;
        if y.is_none() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "moe-models: routed experts not stored as contiguous bf16/f32/int8: no grouped CPU kernel, using the per-expert candle path"
                )
            });
        }
        Ok(y)
    }

    /// Our CUDA kernels: the active experts stacked into slots, then the decode kernels or the
    /// grouped GEMM with the combine fused (`moe_kernels::MoeExperts`).
    fn routed_on_gpu(
        &self,
        x: &Tensor,
        routing: &Routing,
        groups: &ExpertGroups,
        active: &[usize],
    ) -> Result<Tensor> {
        if self
            .experts
            .max_held_experts()
            .is_some_and(|most| most < active.len())
        {
            static BUDGETED: std::sync::Once = std::sync::Once::new();
            BUDGETED.call_once(|| {
                eprintln!(
                    "moe-models: the expert budget allows fewer experts at once than a layer \
                     routes to: on CUDA the experts run one at a time with candle ops"
                )
            });
            return self.routed_reference(x, groups, active);
        }
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            eprintln!(
                "moe-models: on CUDA the active experts are stacked into a temporary pool every \
                 step (moe_kernels::cuda_pool is not wired in yet)"
            )
        });
        let weights = self.experts.experts(self.layer, active)?;
        let refs: Vec<_> = active
            .iter()
            .zip(&weights)
            .map(|(&e, w)| (e, w.as_ref()))
            .collect();
        let stacked = StackedExperts::stack(&refs, self.routing.n_experts)?;
        let op = MoeExperts {
            experts: &stacked,
            n_experts: self.routing.n_experts,
            activation: self.activation,
        };
        op.forward(x, &routing.expert_ids, &routing.weights)
    }

    /// The routed experts one at a time with [`expert_ffn`], then [`combine`]: the path that
    /// rounds like torch (bf16 parity) and the one for other devices.
    fn routed_reference(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        active: &[usize],
    ) -> Result<Tensor> {
        let weights = active.iter().map(|&expert| {
            let key = ExpertKey {
                layer: self.layer,
                expert,
            };
            (expert, self.experts.expert(key))
        });
        self.per_expert(x, groups, weights)
    }

    /// [`expert_ffn`] for each `(expert, weights)` — the active experts of `groups` in
    /// increasing id order, each fetched only when its turn comes (a budgeted source holds one
    /// expert at a time here) — then [`combine`] on `x`'s device.
    fn per_expert(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        experts: impl Iterator<Item = (usize, Result<Arc<moe_kernels::ExpertWeights>>)>,
    ) -> Result<Tensor> {
        let (n_tokens, hidden) = x.dims2()?;
        let mut outputs = Vec::new();
        for (expert, weights) in experts {
            let weights = weights?;
            let (rows, _) = groups.rows(expert);
            let rows = Tensor::from_slice(rows, rows.len(), x.device())?;
            // [n_rows, hidden]
            let expert_in = x.index_select(&rows, 0)?;
            if weights.is_q8() {
                static Q8: std::sync::Once = std::sync::Once::new();
                Q8.call_once(|| {
                    eprintln!(
                        "moe-models: int8 experts outside the grouped CPU kernel (torch-exact numerics set after load, or another device): each is dequantized to {:?} per use and run with candle ops",
                        x.dtype()
                    )
                });
            }
            outputs.push(expert_ffn(&expert_in, &weights, self.activation)?);
        }
        combine(n_tokens, hidden, groups, &outputs, x.dtype(), x.device())
    }
}

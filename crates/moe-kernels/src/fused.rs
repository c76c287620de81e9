//! The MoE stages as device-agnostic ops: one call runs the CPU kernel on a CPU tensor and our
//! CUDA kernel (`kernels/`, launched from `cuda.rs`) on a GPU tensor, so model code never
//! branches on the `cuda` feature. [`route`] returns two tensors, so it dispatches on the
//! device itself (candle's CustomOps have one output); [`MoeExperts`] is a candle `CustomOp3`
//! whose `cpu_fwd` is the CPU pipeline (grouping → expert FFN → combine) and whose `cuda_fwd`
//! is the decode kernels or the grouped GEMM. Without the feature, GPU tensors cannot exist,
//! so the CPU arms are all that runs.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use moe_core::{GroupScore, Result, Routing, RoutingSpec, ScoringFunction};

use crate::{combine, expert_ffn, route_with_bias, ExpertActivation, ExpertGroups, ExpertWeights};

/// Tokens up to which the decode kernels run (`MOE_DECODE_MAX_TOKENS` in moe_decode.cu).
pub const DECODE_MAX_TOKENS: usize = 8;

/// Weight rows one decode block covers (4 warps × 4 rows).
pub fn decode_rows_per_block() -> usize {
    16
}

/// One row of the grouped GEMM's tile table (`MOE_GEMM_TILES` in kernels/common.cuh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmTile {
    /// Rows per tile: also the alignment tile of `moe_align`.
    pub bm: usize,
    /// Output columns per tile.
    pub bn: usize,
    /// Reduction depth per shared-memory stage.
    pub bk: usize,
    /// Warps along M.
    pub warps_m: usize,
    /// Warps along N.
    pub warps_n: usize,
}

/// The tile table compiled into the kernels (mirror of `MOE_GEMM_TILES`).
pub const GEMM_TILES: [GemmTile; 3] = [
    GemmTile {
        bm: 16,
        bn: 64,
        bk: 32,
        warps_m: 1,
        warps_n: 4,
    },
    GemmTile {
        bm: 32,
        bn: 64,
        bk: 32,
        warps_m: 2,
        warps_n: 2,
    },
    GemmTile {
        bm: 64,
        bn: 64,
        bk: 32,
        warps_m: 2,
        warps_n: 2,
    },
];

/// The tile for a routing of `n_pairs` pairs over `n_experts` experts: the smallest whose
/// rows cover the mean rows per expert (less padding for small batches).
pub fn gemm_tile_for(n_pairs: usize, n_experts: usize) -> GemmTile {
    let mean_rows = n_pairs.div_ceil(n_experts.min(n_pairs).max(1));
    *GEMM_TILES
        .iter()
        .find(|t| t.bm >= mean_rows)
        .unwrap_or(&GEMM_TILES[GEMM_TILES.len() - 1])
}

/// The top-k kernel's parameters for a [`RoutingSpec`] (see kernels/moe_topk.cu).
#[derive(Debug, Clone, PartialEq)]
pub struct TopKParams {
    /// Experts per token.
    pub top_k: usize,
    /// 0 softmax, 1 top-k then softmax, 2 sigmoid.
    pub scoring: i32,
    /// Divide by the sum of the chosen weights.
    pub renormalize: bool,
    /// Added to that sum (DeepSeek-V3's 1e-20).
    pub renorm_eps: f32,
    /// Final scale (`routed_scaling_factor`).
    pub scale: f32,
    /// Expert groups (1: no group limit).
    pub n_group: i32,
    /// Groups kept.
    pub topk_group: i32,
    /// 0 group max, 1 sum of the group's top 2.
    pub group_score: i32,
}

impl TopKParams {
    /// The parameters for `spec`, or `None` for a scoring with no kernel (sparsemixer).
    pub fn from_spec(spec: &RoutingSpec) -> Option<Self> {
        let (scoring, renorm_eps) = match spec.scoring {
            ScoringFunction::Softmax | ScoringFunction::SoftmaxGroupLimited(_) => (0, 0.0),
            ScoringFunction::TopKThenSoftmax => (1, 0.0),
            ScoringFunction::Sigmoid | ScoringFunction::SigmoidGroupLimited(_) => (2, 1e-20),
            ScoringFunction::SparseMixer { .. } => return None,
        };
        let (n_group, topk_group, group_score) =
            spec.scoring.group_limit().map_or((1, 1, 0), |l| {
                (
                    l.n_group as i32,
                    l.topk_group as i32,
                    (l.group_score == GroupScore::SumTop2) as i32,
                )
            });
        Some(Self {
            top_k: spec.top_k,
            scoring,
            renormalize: spec.renormalize,
            renorm_eps,
            scale: spec.scaling_factor,
            n_group,
            topk_group,
            group_score,
        })
    }

    /// Dynamic shared memory of one block (`moe_topk_smem_bytes` in moe_topk.cu).
    pub fn smem_bytes(&self, n_experts: usize) -> usize {
        let (g, k) = (self.n_group as usize, self.top_k);
        (2 * n_experts + g + k) * 4 + k * 4 + n_experts + g
    }
}

/// Routes `logits` (`[n_tokens, n_experts]`) like [`route_with_bias`]: the CPU kernel on the
/// CPU, `kernels/moe_topk.cu` on a GPU (sparsemixer: candle's ops there, said once).
pub fn route(logits: &Tensor, bias: Option<&Tensor>, spec: &RoutingSpec) -> Result<Routing> {
    match logits.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => match TopKParams::from_spec(spec) {
            Some(p) => {
                let (expert_ids, weights) = crate::cuda::route(logits, bias, &p)?;
                Ok(Routing {
                    expert_ids,
                    weights,
                })
            }
            None => route_with_bias(logits, bias, spec),
        },
        _ => route_with_bias(logits, bias, spec),
    }
}

/// The routed experts of one layer, stacked: slot `s` of each tensor is one expert.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    /// `[slots, intermediate, hidden]`
    pub gate: Tensor,
    /// `[slots, intermediate, hidden]`
    pub up: Tensor,
    /// `[slots, hidden, intermediate]`
    pub down: Tensor,
    /// `[slots, intermediate]`, `[slots, intermediate]`, `[slots, hidden]` (GPT-OSS), all or none.
    pub biases: Option<(Tensor, Tensor, Tensor)>,
    /// Slot of each expert id (`[n_experts]`; `None`: expert `e` is slot `e`). Experts no
    /// token chose may map anywhere.
    pub expert_slot: Option<Vec<u32>>,
}

impl StackedExperts {
    /// Stacks the given experts' weights (`(expert id, weights)`, any order) into slots
    /// `0..experts.len()` for a layer of `n_experts` experts.
    pub fn stack(experts: &[(usize, &ExpertWeights)], n_experts: usize) -> Result<Self> {
        if let Some((e, _)) = experts.iter().find(|(_, w)| w.is_q8()) {
            return Err(moe_core::Error::InvalidRequest(format!(
                "expert {e} is int8 (--expert-dtype q8): the stacked device kernels take float experts only"
            )));
        }
        let pick = |f: &dyn Fn(&ExpertWeights) -> &Tensor| -> Result<Tensor> {
            let ts: Vec<&Tensor> = experts.iter().map(|(_, w)| f(w)).collect();
            Ok(Tensor::stack(&ts, 0)?)
        };
        let biases = match experts.first() {
            Some((_, w))
                if w.gate_bias.is_some() && w.up_bias.is_some() && w.down_bias.is_some() =>
            {
                Some((
                    pick(&|w| {
                        w.gate_bias
                            .as_ref()
                            .expect("all experts of a layer have biases")
                    })?,
                    pick(&|w| {
                        w.up_bias
                            .as_ref()
                            .expect("all experts of a layer have biases")
                    })?,
                    pick(&|w| {
                        w.down_bias
                            .as_ref()
                            .expect("all experts of a layer have biases")
                    })?,
                ))
            }
            _ => None,
        };
        let mut expert_slot = vec![0u32; n_experts];
        for (slot, (e, _)) in experts.iter().enumerate() {
            expert_slot[*e] = slot as u32;
        }
        Ok(Self {
            gate: pick(&|w| &w.gate)?,
            up: pick(&|w| &w.up)?,
            down: pick(&|w| &w.down)?,
            biases,
            expert_slot: Some(expert_slot),
        })
    }

    fn slot(&self, expert: usize) -> usize {
        self.expert_slot
            .as_ref()
            .map_or(expert, |s| s[expert] as usize)
    }
}

/// The routed experts and the weighted combine as one op on `(x [n, hidden], ids [n, k] u32,
/// weights [n, k] f32)` → `[n, hidden]` in `x`'s dtype.
pub struct MoeExperts<'a> {
    /// The experts' weights, on the same device as `x`.
    pub experts: &'a StackedExperts,
    /// Experts of the layer (ids are below it).
    pub n_experts: usize,
    /// Activation between gate/up and down.
    pub activation: ExpertActivation,
}

impl MoeExperts<'_> {
    /// Applies the op.
    pub fn forward(&self, x: &Tensor, ids: &Tensor, weights: &Tensor) -> Result<Tensor> {
        // the CUDA side rebuilds tensors from storages: give it contiguous ones at offset 0
        let dense = |t: &Tensor| -> candle_core::Result<Tensor> {
            if t.is_contiguous() && t.layout().start_offset() == 0 {
                Ok(t.clone())
            } else {
                t.force_contiguous()
            }
        };
        let (x, ids, weights) = (dense(x)?, dense(ids)?, dense(weights)?);
        Ok(x.apply_op3_no_bwd(&ids, &weights, self)?)
    }
}

fn cpu_tensor(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let Some((o1, o2)) = l.contiguous_offsets() else {
        candle_core::bail!("moe-experts: inputs must be contiguous")
    };
    let dev = &Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[o1..o2], l.shape(), dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[o1..o2], l.shape(), dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[o1..o2], l.shape(), dev),
        CpuStorage::U32(v) => Tensor::from_slice(&v[o1..o2], l.shape(), dev),
        _ => candle_core::bail!("moe-experts: x must be f32, f16 or bf16 and ids u32"),
    }
}

fn cpu_storage(t: &Tensor) -> candle_core::Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::F16 => CpuStorage::F16(t.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec1()?),
        d => candle_core::bail!("moe-experts: unsupported dtype {d:?}"),
    })
}

fn candle_err(e: moe_core::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp3 for MoeExperts<'_> {
    fn name(&self) -> &'static str {
        "moe-experts"
    }

    /// The CPU pipeline: group rows by expert, run each expert's FFN, combine.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        is: &CpuStorage,
        il: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(xs, xl)?;
        let ids: Vec<u32> = cpu_tensor(is, il)?.flatten_all()?.to_vec1()?;
        let weights: Vec<f32> = cpu_tensor(ws, wl)?.flatten_all()?.to_vec1()?;
        let (n_tokens, hidden) = x.dims2()?;
        let top_k = il.dims()[1];
        let groups =
            ExpertGroups::from_slices(&ids, &weights, top_k, self.n_experts).map_err(candle_err)?;
        let e = self.experts;
        let mut outputs = Vec::new();
        for expert in groups.active_experts() {
            let slot = e.slot(expert);
            let mut w = ExpertWeights::new(e.gate.get(slot)?, e.up.get(slot)?, e.down.get(slot)?);
            if let Some((bg, bu, bd)) = &e.biases {
                (w.gate_bias, w.up_bias, w.down_bias) = (
                    Some(bg.get(slot)?),
                    Some(bu.get(slot)?),
                    Some(bd.get(slot)?),
                );
            }
            let (rows, _) = groups.rows(expert);
            let rows = Tensor::from_slice(rows, rows.len(), &Device::Cpu)?;
            outputs.push(
                expert_ffn(&x.index_select(&rows, 0)?, &w, self.activation).map_err(candle_err)?,
            );
        }
        let y = combine(n_tokens, hidden, &groups, &outputs, x.dtype(), &Device::Cpu)
            .map_err(candle_err)?;
        Ok((cpu_storage(&y)?, Shape::from((n_tokens, hidden))))
    }

    #[cfg(feature = "cuda")]
    /// Our kernels: decode path for few tokens, grouped GEMM with the combine fused otherwise.
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::op::BackpropOp;
        use candle_core::Storage;
        let dev = xs.device().clone();
        let tensor = |s: &candle_core::CudaStorage, l: &Layout| -> candle_core::Result<Tensor> {
            let t = Tensor::from_storage(
                Storage::Cuda(s.try_clone(l)?),
                l.shape().clone(),
                BackpropOp::none(),
                false,
            );
            Ok(t)
        };
        let (x, ids, weights) = (tensor(xs, xl)?, tensor(is, il)?, tensor(ws, wl)?);
        let e = self.experts;
        let slot_t = match &e.expert_slot {
            Some(s) => {
                let v: Vec<i32> = s.iter().map(|&x| x as i32).collect();
                Some(Tensor::from_vec(v, s.len(), &Device::Cuda(dev.clone()))?)
            }
            None => None,
        };
        let (gate, up, down) = (
            e.gate.contiguous()?,
            e.up.contiguous()?,
            e.down.contiguous()?,
        );
        let biases = match &e.biases {
            Some((a, b, c)) => Some((a.contiguous()?, b.contiguous()?, c.contiguous()?)),
            None => None,
        };
        let (act, act_params) = match self.activation {
            ExpertActivation::SiluGlu => (0, (0.0, 0.0)),
            ExpertActivation::ClampedSwiGlu { alpha, limit } => (1, (alpha, limit)),
        };
        let et = crate::cuda::ExpertTensors {
            gate: &gate,
            up: &up,
            down: &down,
            biases: biases.as_ref().map(|(a, b, c)| (a, b, c)),
            expert_slot: slot_t.as_ref(),
            act,
            act_params,
        };
        let y = crate::cuda::moe_experts(&x, &ids, &weights, &et, self.n_experts)?;
        let shape = y.shape().clone();
        let (s, _) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(cs) => Ok((
                cs.try_clone(&candle_core::Layout::contiguous(&shape))?,
                shape,
            )),
            _ => candle_core::bail!("moe-experts: the CUDA result is not on the GPU"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GEMM_TILES` must mirror `MOE_GEMM_TILES` in kernels/common.cuh (the kernel names and
    /// the launch grids are derived from it).
    #[test]
    fn tile_table_mirrors_the_kernels_header() {
        let header = include_str!("../../../kernels/common.cuh");
        let start = header.find("#define MOE_GEMM_TILES(X)").unwrap();
        let rows: Vec<Vec<usize>> = header[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("X("))
            .map(|l| {
                let inner = &l[l.find("X(").unwrap() + 2..l.find(')').unwrap()];
                inner
                    .split(',')
                    .map(|v| v.trim().parse().unwrap())
                    .collect()
            })
            .collect();
        let mirror: Vec<Vec<usize>> = GEMM_TILES
            .iter()
            .map(|t| vec![t.bm, t.bn, t.bk, t.warps_m, t.warps_n])
            .collect();
        assert_eq!(rows, mirror);
    }

    #[test]
    fn tile_choice_follows_rows_per_expert() {
        assert_eq!(gemm_tile_for(1, 8).bm, 16);
        assert_eq!(gemm_tile_for(64, 2).bm, 32);
        assert_eq!(gemm_tile_for(4096 * 8, 64).bm, 64);
    }
}

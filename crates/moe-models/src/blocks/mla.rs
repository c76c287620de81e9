//! Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a packed batch of sequences.
//!
//! Queries come from `q_proj`, or through a low-rank `q_a_proj` → RMSNorm → `q_b_proj`. Keys and
//! values come from one compressed projection `kv_a_proj_with_mqa`: its first `kv_lora_rank`
//! outputs are normalised and expanded per head by `kv_b_proj` into the non-rotary key part and
//! the value; its last `qk_rope_head_dim` outputs are a single rotary key shared by all heads.
//! Each head's query and key are `[nope | rope]` (rope on the rope part only).
//!
//! The cache holds the expanded per-head keys (`[n_heads, n, qk_nope + qk_rope]`) and values
//! (`[n_heads, n, v_head_dim]`) in the ordinary [`KvCache`](crate::kv_cache::KvCache);
//! transformers caches the latents and re-expands them every step, which gives the same rows.

use candle_core::{DType, Tensor, D};
use moe_core::{Error, Result};
use moe_kernels::{matmul_nn, matmul_nt, softmax_last_dim, SumOrder};
use moe_loader::TensorLookup;

use crate::blocks::attention::{causal_mask, AttentionConfig, SequenceSlot};
use crate::blocks::linear::Linear;
use crate::blocks::norm::RmsNorm;
use crate::blocks::rope::RotaryEmbedding;

/// transformers builds the latent norms (`q_a_layernorm`, `kv_a_layernorm`) without passing
/// `rms_norm_eps`, so they keep the class default.
const LATENT_NORM_EPS: f64 = 1e-6;

/// How the rope part of a query or key is laid out and rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `rotate_half` over the two halves (DeepSeek-V3 with `rope_interleave: false`).
    Halves,
    /// Pairs `(x0, x1), (x2, x3), …` rotated, written back as `[rotated evens | rotated odds]`
    /// (DeepSeek-V3's `apply_rotary_pos_emb_interleave`, `rope_interleave: true`).
    PairsToHalves,
    /// Pairs rotated as complex numbers and written back in place (DeepSeek-V2's
    /// `apply_rotary_emb`, which rotates in f32 with f32 tables whatever the compute dtype and
    /// rounds once).
    Pairs,
}

impl LatentConfig {
    /// Does the rotation run in f32 with f32 tables whatever the compute dtype?
    pub fn rotates_in_f32(&self) -> bool {
        self.rope_layout == RopeLayout::Pairs
    }
}

/// The MLA-specific shape of an attention block; the rest (`hidden_size`, `n_heads`,
/// `softmax_scale`, `qkv_bias` for the two down-projections, `o_bias`) is the
/// [`AttentionConfig`] it sits in, whose `head_dim` is `qk_nope_head_dim + qk_rope_head_dim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatentConfig {
    /// Rank of the query compression (`q_lora_rank`); `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without rope (`qk_nope_head_dim`).
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimensions with rope, the key part shared by all heads
    /// (`qk_rope_head_dim`).
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension (`v_head_dim`).
    pub v_head_dim: usize,
    /// Rope layout of the rope part.
    pub rope_layout: RopeLayout,
}

/// Where queries come from.
#[derive(Debug, Clone)]
enum QueryProjection {
    /// `q_proj`.
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// A multi-head latent attention block.
#[derive(Debug, Clone)]
pub struct LatentAttention {
    config: AttentionConfig,
    latent: LatentConfig,
    q: QueryProjection,
    kv_a: Linear,
    kv_norm: RmsNorm,
    kv_b: Linear,
    o_proj: Linear,
    /// f32 rotary tables when the rotation runs in f32 and the compute dtype is not f32.
    f32_rope: Option<RotaryEmbedding>,
}

impl LatentAttention {
    /// Loads the projections under `lookup` (`self_attn`). `config.latent` must be set;
    /// `f32_rope`: f32 tables of the model's rope, for a layout that
    /// [rotates in f32](LatentConfig::rotates_in_f32) in a non-f32 model.
    pub fn load(
        lookup: &TensorLookup,
        config: AttentionConfig,
        f32_rope: Option<&RotaryEmbedding>,
    ) -> Result<Self> {
        let latent = config.latent.clone().ok_or_else(|| {
            Error::InvalidRequest("latent attention built without a latent config".into())
        })?;
        let (h, n_heads, l) = (config.hidden_size, config.n_heads, &latent);
        let qk = l.qk_nope_head_dim + l.qk_rope_head_dim;
        if config.head_dim != qk || config.n_kv_heads != n_heads {
            return Err(Error::InvalidRequest(format!(
                "latent attention: head_dim {} / kv heads {} must be {qk} / {n_heads}",
                config.head_dim, config.n_kv_heads
            )));
        }
        let (bias, dense) = (config.qkv_bias, config.dense_dtype);
        let q = match l.q_lora_rank {
            None => QueryProjection::Direct(
                Linear::load(lookup, "q_proj", h, n_heads * qk, false)?.stored_as(dense)?,
            ),
            Some(rank) => QueryProjection::LowRank {
                a: Linear::load(lookup, "q_a_proj", h, rank, bias)?.stored_as(dense)?,
                norm: RmsNorm::load(lookup, "q_a_layernorm", rank, LATENT_NORM_EPS)?,
                b: Linear::load(lookup, "q_b_proj", rank, n_heads * qk, false)?.stored_as(dense)?,
            },
        };
        Ok(Self {
            q,
            kv_a: Linear::load(
                lookup,
                "kv_a_proj_with_mqa",
                h,
                l.kv_lora_rank + l.qk_rope_head_dim,
                bias,
            )?
            .stored_as(dense)?,
            kv_norm: RmsNorm::load(lookup, "kv_a_layernorm", l.kv_lora_rank, LATENT_NORM_EPS)?,
            kv_b: Linear::load(
                lookup,
                "kv_b_proj",
                l.kv_lora_rank,
                n_heads * (l.qk_nope_head_dim + l.v_head_dim),
                false,
            )?
            .stored_as(dense)?,
            o_proj: Linear::load(lookup, "o_proj", n_heads * l.v_head_dim, h, config.o_bias)?
                .stored_as(dense)?,
            f32_rope: f32_rope.filter(|_| latent.rotates_in_f32()).cloned(),
            latent,
            config,
        })
    }

    /// Attends every sequence of the packed batch `x` (`[n_tokens, hidden]`) over its own
    /// cache, appending the new keys and values for `layer`. Returns `[n_tokens, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &RotaryEmbedding,
        slots: &mut [SequenceSlot<'_>],
    ) -> Result<Tensor> {
        let l = &self.latent;
        let n_heads = self.config.n_heads;
        let (nope, rot) = (l.qk_nope_head_dim, l.qk_rope_head_dim);
        // [n_tokens, n_heads * (nope + rot)]
        let q = match &self.q {
            QueryProjection::Direct(p) => p.forward(x)?,
            QueryProjection::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        };
        // [n_tokens, kv_lora_rank + rot]
        let compressed = self.kv_a.forward(x)?;
        let kv_latent = self
            .kv_norm
            .forward(&compressed.narrow(1, 0, l.kv_lora_rank)?)?;
        let k_rot = compressed.narrow(1, l.kv_lora_rank, rot)?;
        // [n_tokens, n_heads * (nope + v)]
        let kv = self.kv_b.forward(&kv_latent)?;
        let mut outputs = Vec::with_capacity(slots.len());
        for slot in slots.iter_mut() {
            let heads = |t: &Tensor, n: usize, d: usize| -> candle_core::Result<Tensor> {
                // [n_rows, n * d] -> [n, n_rows, d]
                t.narrow(0, slot.row_start, slot.n_rows)?
                    .reshape((slot.n_rows, n, d))?
                    .transpose(0, 1)
            };
            let q_s = heads(&q, n_heads, nope + rot)?;
            let q_rot = self.rotate(&q_s.narrow(D::Minus1, nope, rot)?, rope, slot.n_past)?;
            let q_s = Tensor::cat(&[&q_s.narrow(D::Minus1, 0, nope)?, &q_rot], D::Minus1)?;
            // The shared rotary key: [1, n_rows, rot].
            let k_rot_s = self.rotate(&heads(&k_rot, 1, rot)?, rope, slot.n_past)?;
            let kv_s = heads(&kv, n_heads, nope + l.v_head_dim)?;
            let k_s = Tensor::cat(
                &[
                    &kv_s.narrow(D::Minus1, 0, nope)?,
                    &k_rot_s.broadcast_as((n_heads, slot.n_rows, rot))?,
                ],
                D::Minus1,
            )?;
            let v_s = kv_s.narrow(D::Minus1, nope, l.v_head_dim)?.contiguous()?;
            let (k_all, v_all) = slot.cache.append(layer, k_s, v_s)?;
            outputs.push(self.attend(&q_s, &k_all, &v_all, slot.n_past)?);
        }
        // [n_tokens, n_heads * v_head_dim]
        let attended = Tensor::cat(&outputs, 0)?;
        self.o_proj.forward(&attended)
    }

    /// Rotates `x` (`[n, n_rows, rot]`) in the configured layout.
    fn rotate(&self, x: &Tensor, rope: &RotaryEmbedding, start: usize) -> Result<Tensor> {
        let (n, rows, d) = x.dims3()?;
        // [x0, x1, x2, x3, …] -> [x0, x2, … | x1, x3, …]
        let split_pairs = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.reshape((n, rows, d / 2, 2))?
                .transpose(2, 3)?
                .reshape((n, rows, d))
        };
        Ok(match self.latent.rope_layout {
            RopeLayout::Halves => rope.apply(&x.contiguous()?, start)?,
            RopeLayout::PairsToHalves => rope.apply(&split_pairs(&x.contiguous()?)?, start)?,
            RopeLayout::Pairs => {
                let (rope, input) = match &self.f32_rope {
                    Some(f32_rope) => (f32_rope, x.to_dtype(DType::F32)?),
                    None => (rope, x.contiguous()?),
                };
                rope.apply(&split_pairs(&input)?, start)?
                    .reshape((n, rows, 2, d / 2))?
                    .transpose(2, 3)?
                    .reshape((n, rows, d))?
                    .to_dtype(x.dtype())?
            }
        })
    }

    /// Causal attention of `q` (`[n_heads, n_new, qk]`) over `k` (`[n_heads, n_keys, qk]`) and
    /// `v` (`[n_heads, n_keys, v_head_dim]`), rounded as torch's eager attention does (see
    /// `Attention`). Returns `[n_new, n_heads * v_head_dim]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, n_past: usize) -> Result<Tensor> {
        let (n_heads, n_new, d) = q.dims3()?;
        let (_, n_keys, dv) = v.dims3()?;
        let q = q.contiguous()?;
        let qk_order = SumOrder::batched(n_new, n_keys, d, SumOrder::Blocked);
        let scores = (matmul_nt(&q, k, None, qk_order)?.to_dtype(DType::F32)?
            * self.config.softmax_scale)?
            .to_dtype(q.dtype())?
            .to_dtype(DType::F32)?;
        let scores = if n_new > 1 {
            scores.broadcast_add(&causal_mask(n_new, n_keys, n_past, 0, None, q.device())?)?
        } else {
            scores
        };
        let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let pv_order = SumOrder::batched(n_new, dv, n_keys, SumOrder::Interleaved4);
        let out = matmul_nn(&probs, v, pv_order)?.transpose(0, 1)?;
        Ok(out.reshape((n_new, n_heads * dv))?)
    }
}

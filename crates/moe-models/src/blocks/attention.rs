//! Causal self-attention with GQA over a packed batch of sequences, each with its own KV cache.
//! Variants the configs declare (q/k norms, clipping, biases, softmax scale) are fields of
//! [`AttentionConfig`], not code paths in architecture files.

use candle_core::{DType, Tensor};
use moe_core::Result;
use moe_kernels::cpu::pool::map_each_mut;
use moe_kernels::cpu::{
    fast_attention_applies, fast_attention_over_cache, fast_causal_attention, from_f32_vec,
    numerics, to_f32_vec, CausalMask, Numerics,
};
use moe_kernels::{matmul_nn, matmul_nt, softmax_last_dim, SumOrder, WeightDtype};
use moe_loader::TensorLookup;

use crate::blocks::linear::Linear;
use crate::blocks::norm::RmsNorm;
use crate::blocks::rope::RotaryEmbedding;
use crate::kv_cache::KvCache;

/// New tokens per sequence up to which a CPU pass attends on host values
/// ([`Attention::attend_decode_on_host`]).
const HOST_DECODE_MAX_ROWS: usize = 16;

/// Where q/k normalisation is applied, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// No q/k norm (Mixtral, Qwen2-MoE).
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    PerHead,
    /// RMSNorm over the whole projection output, before splitting heads (OLMoE).
    WholeProjection,
}

/// Shape and variant of an attention block.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// q/k normalisation.
    pub qk_norm: QkNorm,
    /// Epsilon of the q/k norms.
    pub norm_eps: f64,
    /// Clamp q, k, v to ±this after projection (and norm) — OLMoE's `clip_qkv`.
    pub clip_qkv: Option<f64>,
    /// Multiplier of `q·k` (1/√head_dim unless the architecture says otherwise).
    pub softmax_scale: f64,
    /// Per-head learned sink logits (`sinks`, `[n_heads]`): each softmax runs over
    /// `[scores, sink]` and the sink's column is dropped (GPT-OSS).
    pub sinks: bool,
    /// Sliding window: a query at position q sees keys k with `q - window < k ≤ q`.
    pub sliding_window: Option<usize>,
    /// Multi-head latent attention (DeepSeek): the layer is a
    /// [`LatentAttention`](crate::blocks::mla::LatentAttention) of this shape, `head_dim` is
    /// the query/key head size and `qkv_bias` the bias of the two down-projections.
    pub latent: Option<crate::blocks::mla::LatentConfig>,
    /// How the projection matrices are held (`--dense-dtype`; the decoder sets it from its
    /// load options).
    pub dense_dtype: WeightDtype,
}

/// One sequence's slice of a packed batch during a forward pass.
pub struct SequenceSlot<'a> {
    /// First row of the sequence in the packed `[n_tokens, hidden]` activations.
    pub row_start: usize,
    /// Rows (new tokens) of the sequence.
    pub n_rows: usize,
    /// Positions cached before this forward pass.
    pub n_past: usize,
    /// The sequence's cache.
    pub cache: &'a mut KvCache,
}

/// A self-attention block.
#[derive(Debug, Clone)]
pub struct Attention {
    config: AttentionConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// `[n_kv_heads, group, 1]` f32 sink logits, when the config has sinks.
    sinks: Option<Tensor>,
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` (and `q_norm`, `k_norm`) under `lookup`.
    pub fn load(lookup: &TensorLookup, config: AttentionConfig) -> Result<Self> {
        let c = &config;
        let q_out = c.n_heads * c.head_dim;
        let kv_out = c.n_kv_heads * c.head_dim;
        let (q_norm_size, k_norm_size) = match c.qk_norm {
            QkNorm::None => (0, 0),
            QkNorm::PerHead => (c.head_dim, c.head_dim),
            QkNorm::WholeProjection => (q_out, kv_out),
        };
        let norm = |name: &str, size: usize| -> Result<Option<RmsNorm>> {
            if c.qk_norm == QkNorm::None {
                Ok(None)
            } else {
                RmsNorm::load(lookup, name, size, c.norm_eps).map(Some)
            }
        };
        Ok(Self {
            q_proj: Linear::load(lookup, "q_proj", c.hidden_size, q_out, c.qkv_bias)?
                .stored_as(c.dense_dtype)?,
            k_proj: Linear::load(lookup, "k_proj", c.hidden_size, kv_out, c.qkv_bias)?
                .stored_as(c.dense_dtype)?,
            v_proj: Linear::load(lookup, "v_proj", c.hidden_size, kv_out, c.qkv_bias)?
                .stored_as(c.dense_dtype)?,
            o_proj: Linear::load(lookup, "o_proj", q_out, c.hidden_size, c.o_bias)?
                .stored_as(c.dense_dtype)?,
            q_norm: norm("q_norm", q_norm_size)?,
            k_norm: norm("k_norm", k_norm_size)?,
            sinks: if c.sinks {
                // Rounded to the compute dtype like the other parameters, used in f32.
                Some(
                    lookup
                        .get("sinks", &[c.n_heads])?
                        .to_dtype(DType::F32)?
                        .reshape((c.n_kv_heads, c.n_heads / c.n_kv_heads, 1))?,
                )
            } else {
                None
            },
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
        let c = &self.config;
        // [n_tokens, n_heads * head_dim], [n_tokens, n_kv_heads * head_dim] ×2
        let mut q = self.q_proj.forward(x)?;
        let mut k = self.k_proj.forward(x)?;
        let mut v = self.v_proj.forward(x)?;
        if c.qk_norm == QkNorm::WholeProjection {
            q = self.q_norm.as_ref().expect("loaded").forward(&q)?;
            k = self.k_norm.as_ref().expect("loaded").forward(&k)?;
        }
        if let Some(clip) = c.clip_qkv {
            q = q.clamp(-clip, clip)?;
            k = k.clamp(-clip, clip)?;
            v = v.clamp(-clip, clip)?;
        }
        if self.decodes_on_host(&q, slots) {
            let attended = self.attend_decode_on_host(&q, &k, &v, layer, rope, slots)?;
            return self.o_proj.forward(&attended);
        }
        // Each sequence's heads, rope, cache append and attention: independent of the other
        // sequences', so on the CPU the sequences of a batch run in parallel (16 decoding
        // sequences otherwise leave the second core waiting through 256 small attentions per
        // step); on a GPU they stay in order on the one stream.
        let one_sequence = |slot: &mut SequenceSlot<'_>| -> Result<Tensor> {
            let rows = |t: &Tensor, n_heads: usize| -> candle_core::Result<Tensor> {
                // [n_rows, n_heads * head_dim] -> [n_heads, n_rows, head_dim]
                t.narrow(0, slot.row_start, slot.n_rows)?
                    .reshape((slot.n_rows, n_heads, c.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let mut q_s = rows(&q, c.n_heads)?;
            let mut k_s = rows(&k, c.n_kv_heads)?;
            let v_s = rows(&v, c.n_kv_heads)?;
            if c.qk_norm == QkNorm::PerHead {
                q_s = self.q_norm.as_ref().expect("loaded").forward(&q_s)?;
                k_s = self.k_norm.as_ref().expect("loaded").forward(&k_s)?;
            }
            let q_s = rope.apply(&q_s, slot.n_past)?;
            let k_s = rope.apply(&k_s, slot.n_past)?;
            let (k_all, v_all) = slot.cache.append(layer, k_s, v_s)?;
            self.attend(&q_s, &k_all, &v_all, slot.n_past)
        };
        let outputs: Vec<Tensor> = if x.device().is_cpu() {
            map_each_mut(slots, one_sequence)
                .into_iter()
                .collect::<Result<_>>()?
        } else {
            slots.iter_mut().map(one_sequence).collect::<Result<_>>()?
        };
        // [n_tokens, n_heads * head_dim]
        let attended = Tensor::cat(&outputs, 0)?;
        self.o_proj.forward(&attended)
    }

    /// Whether this pass takes [`Attention::attend_decode_on_host`]: the CPU with the fast
    /// numerics, bf16 or f32, no sink logits, and every sequence at most
    /// [`HOST_DECODE_MAX_ROWS`] new tokens (decode steps; a prompt keeps the tensor path, whose
    /// elementwise ops run in parallel).
    fn decodes_on_host(&self, q: &Tensor, slots: &[SequenceSlot<'_>]) -> bool {
        q.device().is_cpu()
            && matches!(q.dtype(), DType::BF16 | DType::F32)
            && self.sinks.is_none()
            && numerics() == Numerics::Fast
            && slots.iter().all(|s| s.n_rows <= HOST_DECODE_MAX_ROWS)
    }

    /// The per-sequence part of [`Attention::forward`] on host values, without a tensor op
    /// per step of each sequence (at 16 decoding sequences those ops cost more than the
    /// projections): the per-head q/k norms, rope, the cache append (in place) and the
    /// attention over the cache, the same values as the tensor path up to the attention's
    /// summation order. `q`, `k`, `v`: `[n_tokens, heads * head_dim]`; returns the attended
    /// `[n_tokens, n_heads * head_dim]` in `q`'s dtype.
    fn attend_decode_on_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        rope: &RotaryEmbedding,
        slots: &mut [SequenceSlot<'_>],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (d, n_kv) = (c.head_dim, c.n_kv_heads);
        let group = c.n_heads / n_kv;
        let (dtype, device) = (q.dtype(), q.device());
        let (q_width, kv_width) = (c.n_heads * d, n_kv * d);
        let mut q_all = to_f32_vec(q)?;
        let n_values = q_all.len();
        let mut k_all = to_f32_vec(k)?;
        let v_all = to_f32_vec(v)?;
        if c.qk_norm == QkNorm::PerHead {
            self.q_norm
                .as_ref()
                .expect("loaded")
                .forward_rows_in_place(&mut q_all)?;
            self.k_norm
                .as_ref()
                .expect("loaded")
                .forward_rows_in_place(&mut k_all)?;
        }
        // Each sequence with its own rows of q, k and v.
        let mut work = Vec::with_capacity(slots.len());
        let (mut q_rest, mut k_rest, mut v_rest) = (&mut q_all[..], &mut k_all[..], &v_all[..]);
        for slot in slots.iter_mut() {
            let (q_s, q_tail) = std::mem::take(&mut q_rest).split_at_mut(slot.n_rows * q_width);
            let (k_s, k_tail) = std::mem::take(&mut k_rest).split_at_mut(slot.n_rows * kv_width);
            let (v_s, v_tail) = v_rest.split_at(slot.n_rows * kv_width);
            (q_rest, k_rest, v_rest) = (q_tail, k_tail, v_tail);
            work.push((slot, q_s, k_s, v_s));
        }
        let one_sequence = |(slot, q_s, k_s, v_s): &mut (
            &mut SequenceSlot<'_>,
            &mut [f32],
            &mut [f32],
            &[f32],
        )|
         -> Result<Vec<f32>> {
            let n = slot.n_rows;
            rope.apply_rows_in_place(q_s, n, d, slot.n_past)?;
            rope.apply_rows_in_place(k_s, n, d, slot.n_past)?;
            // [n, heads * d] -> [heads, n, d]
            let by_head = |rows: &[f32], heads: usize| -> Vec<f32> {
                let mut out = vec![0f32; rows.len()];
                for i in 0..n {
                    for h in 0..heads {
                        out[(h * n + i) * d..][..d]
                            .copy_from_slice(&rows[(i * heads + h) * d..][..d]);
                    }
                }
                out
            };
            let kv_tensor =
                |rows: &[f32]| from_f32_vec(by_head(rows, n_kv), &[n_kv, n, d], dtype, device);
            let held = slot
                .cache
                .append_in_place(layer, &kv_tensor(k_s)?, &kv_tensor(v_s)?)?;
            // Query heads that share a kv head are stacked as rows: [n_kv, group * n, d].
            let q_heads = by_head(q_s, c.n_heads);
            let mask = CausalMask {
                n_past: slot.n_past,
                first_key: 0,
                window: c.sliding_window,
            };
            let scale = c.softmax_scale as f32;
            let out = fast_attention_over_cache(
                &q_heads,
                group * n,
                &held.k,
                &held.v,
                held.n_keys,
                n,
                scale,
                mask,
            )?;
            // [n_heads, n, d] -> [n, n_heads * d]
            let mut rows = vec![0f32; n * q_width];
            for h in 0..c.n_heads {
                for i in 0..n {
                    rows[(i * c.n_heads + h) * d..][..d]
                        .copy_from_slice(&out[(h * n + i) * d..][..d]);
                }
            }
            Ok(rows)
        };
        let mut attended = Vec::with_capacity(n_values);
        for rows in map_each_mut(&mut work, one_sequence) {
            attended.extend_from_slice(&rows?);
        }
        let n_tokens = attended.len() / q_width;
        from_f32_vec(attended, &[n_tokens, q_width], dtype, device)
    }

    /// Causal attention of `q` (`[n_heads, n_new, d]`) over `k`, `v` (`[n_kv, n_past + n_new, d]`).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, n_past: usize) -> Result<Tensor> {
        let c = &self.config;
        let (_, n_new, d) = q.dims3()?;
        // Keys no query of this call can see under the sliding window are left out.
        let first_key = match c.sliding_window {
            Some(window) => (n_past + 1).saturating_sub(window),
            None => 0,
        };
        let n_keys = k.dim(1)? - first_key;
        let (k, v) = if first_key > 0 {
            (
                &k.narrow(1, first_key, n_keys)?.contiguous()?,
                &v.narrow(1, first_key, n_keys)?.contiguous()?,
            )
        } else {
            (k, v)
        };
        let group = c.n_heads / c.n_kv_heads;
        // Query heads that share a kv head are stacked as rows: [n_kv, group * n_new, d].
        let q = q.reshape((c.n_kv_heads, group * n_new, d))?;
        let heads_to_rows = |out: Tensor| -> Result<Tensor> {
            // [n_kv, group * n_new, d] -> [n_heads, n_new, d] -> [n_new, n_heads * d]
            let out = out.reshape((c.n_heads, n_new, d))?.transpose(0, 1)?;
            Ok(out.reshape((n_new, c.n_heads * d))?)
        };
        if self.sinks.is_none() && numerics() == Numerics::Fast && fast_attention_applies(&q, k, v)
        {
            let mask = CausalMask {
                n_past,
                first_key,
                window: c.sliding_window,
            };
            let scale = c.softmax_scale as f32;
            return heads_to_rows(fast_causal_attention(&q, k, v, n_new, scale, mask)?);
        }
        // As torch's eager attention: `q·kᵀ` rounded to the compute dtype, scaled in f32 by the
        // f32 scale and rounded again; the softmax runs in f32 and is rounded before `·v`.
        // Each head's products are `n_new × n_keys × d`, the size torch picks its sum order by.
        let qk_order = SumOrder::batched(n_new, n_keys, d, SumOrder::Blocked);
        let scores = (matmul_nt(&q, k, None, qk_order)?.to_dtype(DType::F32)? * c.softmax_scale)?
            .to_dtype(q.dtype())?
            .to_dtype(DType::F32)?;
        let needs_mask = n_new > 1 || c.sliding_window.is_some_and(|w| n_keys > w);
        let scores = if needs_mask {
            let mask = causal_mask(
                n_new,
                n_keys,
                n_past,
                first_key,
                c.sliding_window,
                q.device(),
            )?;
            scores
                .reshape((c.n_kv_heads, group, n_new, n_keys))?
                .broadcast_add(&mask)?
                .reshape((c.n_kv_heads, group * n_new, n_keys))?
        } else {
            scores
        };
        let probs = match &self.sinks {
            None => softmax_last_dim(&scores)?,
            Some(sinks) => {
                // [n_kv, group * n_new, n_keys + 1]: each head's sink as an extra column.
                let rows = (c.n_kv_heads, group * n_new, 1);
                let sink_col = sinks
                    .broadcast_as((c.n_kv_heads, group, n_new))?
                    .reshape(rows)?;
                let combined = Tensor::cat(&[&scores, &sink_col], 2)?;
                softmax_last_dim(&combined)?.narrow(2, 0, n_keys)?
            }
        }
        .to_dtype(v.dtype())?;
        let pv_order = SumOrder::batched(n_new, d, n_keys, SumOrder::Interleaved4);
        heads_to_rows(matmul_nn(&probs, v, pv_order)?)
    }
}

/// `[n_new, n_keys]` f32: 0 where query i (at position n_past + i) may see key j (at position
/// first_key + j), -inf elsewhere: causal, and within `window` when there is one.
pub(crate) fn causal_mask(
    n_new: usize,
    n_keys: usize,
    n_past: usize,
    first_key: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n_new)
        .flat_map(|i| {
            (0..n_keys).map(move |j| {
                let (q_pos, k_pos) = (n_past + i, first_key + j);
                if k_pos <= q_pos && window.is_none_or(|w| k_pos + w > q_pos) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n_new, n_keys), device)?)
}

//! The decoder-only transformer every supported architecture is an instance of, its batched
//! forward pass, and the recipe architecture files fill in to build one.
//!
//! Batching contract: one call takes several sequences of different lengths, each with its own
//! [`KvCache`]. Token-wise work (projections, norms, routing, experts) runs on the packed rows of
//! all sequences; attention runs per sequence over its own cache. A sequence's logits do not
//! depend on its batch-mates beyond matmul rounding (≤ 1e-5, tested in `tests/batching.rs`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_core::{Error, Result, RoutingSpec};
use moe_kernels::cpu::residual::residual_add;
use moe_kernels::cpu::{numerics, Numerics};
use moe_kernels::{ExpertActivation, WeightDtype};
use moe_loader::TensorLookup;

use crate::blocks::attention::{Attention, AttentionConfig, SequenceSlot};
use crate::blocks::linear::Linear;
use crate::blocks::mla::LatentAttention;
use crate::blocks::mlp::GatedMlp;
use crate::blocks::moe::{SharedExpert, SparseMoeBlock};
use crate::blocks::norm::Norm;
use crate::blocks::rope::RotaryEmbedding;
use crate::experts::{ExpertLayerLayout, ExpertLayout, ExpertNames, ExpertSource, ResidentExperts};
use crate::hparams::{DecoderHParams, LoadOptions};
use crate::kv_cache::KvCache;
use crate::stage_times::{timed, Stage};
use crate::summary::ModelSummary;

pub use crate::blocks::moe::RoutingObserver;

/// Which positions of a sequence need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the last new token (generation).
    Last,
    /// Every new token (perplexity, parity tests).
    All,
}

/// One sequence's part of a batched forward call.
pub struct SequenceInput<'a> {
    /// New tokens to run (the prompt at prefill, one token per decode step).
    pub tokens: &'a [u32],
    /// The sequence's cache; grows by `tokens.len()`.
    pub cache: &'a mut KvCache,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Optional per-call instrumentation.
#[derive(Default)]
pub struct ForwardContext<'a> {
    /// Receives the routing of every MoE layer.
    pub observer: Option<&'a mut dyn RoutingObserver>,
}

/// The feed-forward half of a decoder layer.
pub enum FeedForward {
    /// A dense gated MLP.
    Dense(GatedMlp),
    /// A sparse MoE block.
    Sparse(SparseMoeBlock),
}

/// One pre-norm decoder layer.
pub struct DecoderLayer {
    attn_norm: Norm,
    attention: LayerAttention,
    ffn_norm: Norm,
    ffn: FeedForward,
}

/// The attention half of a decoder layer, as [`AttentionConfig::latent`] says.
pub enum LayerAttention {
    /// Multi-head (GQA) attention.
    Standard(Attention),
    /// Multi-head latent attention (DeepSeek).
    Latent(LatentAttention),
}

impl LayerAttention {
    fn load(
        lookup: &TensorLookup,
        config: AttentionConfig,
        f32_rope: Option<&RotaryEmbedding>,
    ) -> Result<Self> {
        Ok(match config.latent {
            Some(_) => Self::Latent(LatentAttention::load(lookup, config, f32_rope)?),
            None => Self::Standard(Attention::load(lookup, config)?),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &RotaryEmbedding,
        slots: &mut [SequenceSlot<'_>],
    ) -> Result<Tensor> {
        match self {
            Self::Standard(a) => a.forward(x, layer, rope, slots),
            Self::Latent(a) => a.forward(x, layer, rope, slots),
        }
    }
}

/// A loaded model.
pub struct DecoderModel {
    hparams: DecoderHParams,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Norm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    experts: Arc<dyn ExpertSource>,
    summary: ModelSummary,
    multipliers: Multipliers,
}

/// How one layer's feed-forward is built.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer, built once at load
pub enum FfnRecipe {
    /// Dense MLP under `mlp`.
    Dense {
        /// Intermediate size.
        intermediate: usize,
    },
    /// Sparse MoE block.
    Sparse(MoeRecipe),
}

/// How a sparse MoE block is found in the checkpoint and routed.
#[derive(Debug, Clone)]
pub struct MoeRecipe {
    /// Block prefix inside the layer (`mlp`, `block_sparse_moe`).
    pub block: &'static str,
    /// Per-expert intermediate size.
    pub intermediate: usize,
    /// How the experts are stored under the block (per-expert names or stacked tensors).
    pub experts: ExpertLayout,
    /// The router's name and bias.
    pub router: RouterRecipe,
    /// Activation inside each routed expert.
    pub activation: ExpertActivation,
    /// Routing parameters.
    pub routing: RoutingSpec,
    /// Round the routing weights to the activation dtype before they scale the expert outputs
    /// (transformers casts `router_top_value.to(router_logits.dtype)` for Qwen2/Qwen3-MoE and
    /// OLMoE; Mixtral multiplies by the f32 weights). No effect in f32.
    pub round_weights: bool,
    /// Shared expert: intermediate size and whether it has a sigmoid gate.
    pub shared: Option<SharedExpertRecipe>,
}

/// Where the router of an MoE block is and whether it has a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterRecipe {
    /// Name of the `[n_experts, hidden]` projection inside the block.
    pub name: &'static str,
    /// The router adds a `[n_experts]` bias (GPT-OSS).
    pub bias: bool,
    /// The router has a `[n_experts]` f32 `{name}.e_score_correction_bias` that shifts the
    /// choice only (DeepSeek-V3).
    pub correction_bias: bool,
    /// The router multiplies in f32 whatever the compute dtype (transformers' DeepSeek routers:
    /// `F.linear(x.float(), weight.float())`); no bias.
    pub f32_logits: bool,
}

impl RouterRecipe {
    /// `gate`, no bias (Mixtral, Qwen-MoE, OLMoE, DeepSeek).
    pub const GATE: RouterRecipe = RouterRecipe {
        name: "gate",
        bias: false,
        correction_bias: false,
        f32_logits: false,
    };
}

/// A shared expert inside an MoE block.
#[derive(Debug, Clone)]
pub struct SharedExpertRecipe {
    /// Its prefix inside the block (`shared_expert`, DeepSeek's `shared_experts`).
    pub name: &'static str,
    /// Intermediate size (of all shared experts together when several are fused as one MLP).
    pub intermediate: usize,
    /// How many experts the checkpoint fused into this MLP (DeepSeek's `n_shared_experts`).
    pub n_fused: usize,
    /// Name of the `[1, hidden]` sigmoid gate, if any.
    pub gate: Option<&'static str>,
}

/// What an architecture file hands to [`DecoderModel::build`]: the standard Llama-style layout
/// (`model.embed_tokens`, `model.layers.N.{input_layernorm, self_attn, post_attention_layernorm}`,
/// `model.norm`, `lm_head`) with its attention variant and per-layer feed-forward.
#[derive(Debug, Clone)]
pub struct DecoderRecipe {
    /// The HF class name.
    pub architecture: &'static str,
    /// Shared hyper-parameters.
    pub hparams: DecoderHParams,
    /// Attention variant (same for all layers).
    pub attention: AttentionConfig,
    /// One entry per layer.
    pub ffn: Vec<FfnRecipe>,
    /// Family-specific facts `inspect` shows (MLA ranks, sinks, expert groups, ...).
    pub facts: Vec<(&'static str, String)>,
    /// Per-layer sliding window of the attention (`layer_types`); empty: every layer uses
    /// `attention` as given.
    pub layer_windows: Vec<Option<usize>>,
    /// Multipliers of Granite-style models; [`Multipliers::NONE`] elsewhere.
    pub multipliers: Multipliers,
}

impl DecoderRecipe {
    /// A recipe with no family facts, no sliding windows and neutral multipliers; override
    /// those fields with struct-update syntax.
    pub fn new(
        architecture: &'static str,
        hparams: DecoderHParams,
        attention: AttentionConfig,
        ffn: Vec<FfnRecipe>,
    ) -> Self {
        Self {
            architecture,
            hparams,
            attention,
            ffn,
            facts: Vec::new(),
            layer_windows: Vec::new(),
            multipliers: Multipliers::NONE,
        }
    }
}

impl MoeRecipe {
    /// The common sparse block: experts in `layout` under `block`, SiLU-gated, routed by the
    /// `gate` router with `routing`, weights rounded to the compute dtype, no shared expert.
    /// Override the rest with struct-update syntax.
    pub fn new(
        block: &'static str,
        intermediate: usize,
        experts: ExpertLayout,
        routing: RoutingSpec,
    ) -> Self {
        Self {
            block,
            intermediate,
            experts,
            router: RouterRecipe::GATE,
            activation: ExpertActivation::SiluGlu,
            routing,
            round_weights: true,
            shared: None,
        }
    }
}

/// Scalar multipliers around the decoder stack (Granite); all neutral by default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Multipliers {
    /// Embeddings are multiplied by this (`embedding_multiplier`).
    pub embedding: f64,
    /// Each sublayer output is multiplied by this before the residual add
    /// (`residual_multiplier`).
    pub residual: f64,
    /// Logits are divided by this (`logits_scaling`).
    pub logits_divisor: f64,
}

impl Multipliers {
    /// No scaling anywhere.
    pub const NONE: Multipliers = Multipliers {
        embedding: 1.0,
        residual: 1.0,
        logits_divisor: 1.0,
    };
}

/// The router of an MoE block, in f32 when the recipe says so.
fn load_router(block: &TensorLookup, moe: &MoeRecipe, hidden: usize) -> Result<Linear> {
    let r = &moe.router;
    let router = Linear::load(block, r.name, hidden, moe.routing.n_experts, r.bias)?;
    match (r.f32_logits, r.bias) {
        (false, _) => Ok(router),
        (true, false) => Ok(Linear::from_weight(router.weight()?.to_dtype(DType::F32)?)),
        (true, true) => Err(Error::InvalidRequest(
            "an f32 router with a bias is not supported".into(),
        )),
    }
}

/// Refuses int8 weights where nothing computes them: they run only on the CPU's fast kernels,
/// which torch-exact numerics bypass.
fn check_weight_dtypes(options: &LoadOptions) -> Result<()> {
    for (flag, dtype) in [
        ("--expert-dtype", options.expert_dtype),
        ("--dense-dtype", options.dense_dtype),
    ] {
        if dtype != WeightDtype::Q8 {
            continue;
        }
        if !options.device.is_cpu() {
            return Err(Error::InvalidRequest(format!(
                "{flag} q8 is not supported on CUDA: int8 weights run on the CPU's kernels only (use --device cpu or drop {flag})"
            )));
        }
        if numerics() == Numerics::TorchExact {
            return Err(Error::InvalidRequest(format!(
                "{flag} q8 is not supported with --numerics torch-exact: int8 weights are not torch's numerics (use --numerics fast or drop {flag})"
            )));
        }
    }
    Ok(())
}

impl DecoderModel {
    /// Builds the model from a recipe, reading every tensor through `lookup`.
    pub fn build(
        recipe: DecoderRecipe,
        lookup: &TensorLookup,
        options: &LoadOptions,
    ) -> Result<Self> {
        let hp = recipe.hparams.clone();
        let h = hp.hidden_size;
        check_weight_dtypes(options)?;
        let model = lookup.pp("model");
        let embed = model.get("embed_tokens.weight", &[hp.vocab_size, h])?;
        let mut layouts = Vec::new();
        for (layer, ffn) in recipe.ffn.iter().enumerate() {
            if let FfnRecipe::Sparse(moe) = ffn {
                layouts.push(ExpertLayerLayout {
                    layer,
                    block: model.pp(format!("layers.{layer}.{}", moe.block)),
                    n_experts: moe.routing.n_experts,
                    hidden: h,
                    intermediate: moe.intermediate,
                    layout: moe.experts,
                    top_k: moe.routing.top_k,
                    expert_dtype: options.expert_dtype,
                });
            }
        }
        let experts: Arc<dyn ExpertSource> = match &options.expert_source {
            Some(factory) => factory.build(hp.n_layers, &layouts)?,
            None => Arc::new(ResidentExperts::load(hp.n_layers, &layouts)?),
        };
        // f32 rotary tables for latent attention that rotates in f32 (DeepSeek-V2).
        let f32_rope = match &recipe.attention.latent {
            Some(latent) if latent.rotates_in_f32() && options.dtype != DType::F32 => {
                Some(RotaryEmbedding::new(
                    &hp.rope,
                    hp.max_position_embeddings,
                    DType::F32,
                    &options.device,
                )?)
            }
            _ => None,
        };
        let mut layers = Vec::with_capacity(hp.n_layers);
        for (layer, ffn) in recipe.ffn.iter().enumerate() {
            let lw = model.pp(format!("layers.{layer}"));
            let ffn = match ffn {
                FfnRecipe::Dense { intermediate } => FeedForward::Dense(
                    GatedMlp::load(
                        &lw.pp("mlp"),
                        &ExpertNames::GATE_UP_DOWN_PROJ,
                        h,
                        *intermediate,
                    )?
                    .stored_as(options.dense_dtype)?,
                ),
                FfnRecipe::Sparse(moe) => {
                    let block = lw.pp(moe.block);
                    let shared = match &moe.shared {
                        None => None,
                        Some(s) => Some(SharedExpert {
                            mlp: GatedMlp::load(
                                &block.pp(s.name),
                                &ExpertNames::GATE_UP_DOWN_PROJ,
                                h,
                                s.intermediate,
                            )?
                            .stored_as(options.dense_dtype)?,
                            gate: s
                                .gate
                                .map(|g| Linear::load(&block, g, h, 1, false))
                                .transpose()?,
                        }),
                    };
                    FeedForward::Sparse(SparseMoeBlock {
                        layer,
                        router: load_router(&block, moe, h)?,
                        f32_logits: moe.router.f32_logits,
                        correction_bias: moe
                            .router
                            .correction_bias
                            .then(|| {
                                block.get_f32(
                                    &format!("{}.e_score_correction_bias", moe.router.name),
                                    &[moe.routing.n_experts],
                                )
                            })
                            .transpose()?,
                        routing: moe.routing.clone(),
                        round_weights: moe.round_weights,
                        experts: experts.clone(),
                        activation: moe.activation,
                        shared,
                    })
                }
            };
            layers.push(DecoderLayer {
                attn_norm: Norm::load(hp.norm, &lw, "input_layernorm", h, hp.rms_norm_eps)?,
                attention: LayerAttention::load(
                    &lw.pp("self_attn"),
                    {
                        let mut attention = recipe.attention.clone();
                        if let Some(&window) = recipe.layer_windows.get(layer) {
                            attention.sliding_window = window;
                        }
                        attention.dense_dtype = options.dense_dtype;
                        attention
                    },
                    f32_rope.as_ref(),
                )?,
                ffn_norm: Norm::load(hp.norm, &lw, "post_attention_layernorm", h, hp.rms_norm_eps)?,
                ffn,
            });
        }
        let final_norm = Norm::load(hp.norm, &model, "norm", h, hp.rms_norm_eps)?;
        let lm_head = if hp.tie_word_embeddings && !lookup.contains("lm_head.weight") {
            Linear::from_weight(embed.clone())
        } else {
            Linear::load(lookup, "lm_head", h, hp.vocab_size, hp.lm_head_bias)?
        }
        .stored_as(options.dense_dtype)?;
        let rope = RotaryEmbedding::new(
            &hp.rope,
            hp.max_position_embeddings,
            options.dtype,
            &options.device,
        )?;
        let summary = ModelSummary::new(
            recipe.architecture,
            &hp,
            &recipe.ffn,
            &recipe.facts,
            lookup.checkpoint(),
            options.dtype,
            options.expert_dtype,
            options.dense_dtype,
        );
        Ok(Self {
            hparams: hp,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            experts,
            summary,
            multipliers: recipe.multipliers,
        })
    }

    /// The shared hyper-parameters.
    pub fn hparams(&self) -> &DecoderHParams {
        &self.hparams
    }

    /// Facts for `moe-infer inspect`.
    pub fn summary(&self) -> &ModelSummary {
        &self.summary
    }

    /// The expert source the MoE blocks read from.
    pub fn experts(&self) -> &Arc<dyn ExpertSource> {
        &self.experts
    }

    /// The device activations live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.hparams.n_layers)
    }

    /// Routing-aware prefetch: layer `layer + 1`'s router (after its own FFN norm) applied to
    /// `x`, the residual stream after layer `layer`'s attention, guesses its experts; the
    /// expert source starts loading them while `layer`'s feed-forward computes.
    fn prefetch_next_layer(&self, layer: usize, x: &Tensor) -> Result<()> {
        if let Some(next) = self.layers.get(layer + 1) {
            if let FeedForward::Sparse(moe) = &next.ffn {
                let guess = moe.guess_experts(&next.ffn_norm.forward(x)?)?;
                self.experts.prefetch(layer + 1, &guess);
            }
        }
        Ok(())
    }

    /// Runs one batched step. Returns, per sequence, f32 logits `[n_wanted, vocab]`.
    ///
    /// On the CPU the step runs on a worker of the kernels' forward-pass pool
    /// ([`moe_kernels::cpu::pool::run_on_pool`]).
    pub fn forward(
        &self,
        batch: &mut [SequenceInput<'_>],
        ctx: ForwardContext<'_>,
    ) -> Result<Vec<Tensor>> {
        if self.device().is_cpu() {
            moe_kernels::cpu::pool::run_on_pool(|| self.forward_here(batch, ctx))
        } else {
            self.forward_here(batch, ctx)
        }
    }

    /// [`Decoder::forward`] on the calling thread.
    fn forward_here(
        &self,
        batch: &mut [SequenceInput<'_>],
        mut ctx: ForwardContext<'_>,
    ) -> Result<Vec<Tensor>> {
        let max = self.hparams.max_position_embeddings;
        let mut all_tokens = Vec::new();
        for (i, seq) in batch.iter().enumerate() {
            if seq.tokens.is_empty() {
                return Err(Error::InvalidRequest(format!(
                    "sequence {i} of the batch has no new tokens"
                )));
            }
            if seq.cache.len() + seq.tokens.len() > max {
                return Err(Error::InvalidRequest(format!(
                    "sequence of {} tokens does not fit the context window of {max} tokens",
                    seq.cache.len() + seq.tokens.len()
                )));
            }
            if let Some(&bad) = seq
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.hparams.vocab_size)
            {
                return Err(Error::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.hparams.vocab_size
                )));
            }
            all_tokens.extend_from_slice(seq.tokens);
        }
        let device = self.device();
        let ids = Tensor::from_slice(&all_tokens, all_tokens.len(), device)?;
        // [n_tokens, hidden]
        let mut x = self.embed.index_select(&ids, 0)?;
        let m = self.multipliers;
        if m.embedding != 1.0 {
            x = (x * m.embedding)?;
        }
        // Granite's `residual + residual_multiplier · sublayer`.
        let scaled = |t: Tensor| -> candle_core::Result<Tensor> {
            if m.residual != 1.0 {
                t * m.residual
            } else {
                Ok(t)
            }
        };
        // (first row, n rows) of the logits each sequence asked for.
        let mut wanted = Vec::with_capacity(batch.len());
        let mut row_start = 0;
        for seq in batch.iter() {
            let n_rows = seq.tokens.len();
            wanted.push(match seq.logits {
                LogitsWanted::Last => (row_start + n_rows - 1, 1),
                LogitsWanted::All => (row_start, n_rows),
            });
            row_start += n_rows;
        }
        let mut slots = Vec::with_capacity(batch.len());
        let mut row_start = 0;
        for seq in batch.iter_mut() {
            let n_rows = seq.tokens.len();
            let n_past = seq.cache.len();
            slots.push(SequenceSlot {
                row_start,
                n_rows,
                n_past,
                cache: &mut *seq.cache,
            });
            row_start += n_rows;
        }
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let attn_out = timed(Stage::Attention, || {
                layer.attention.forward(
                    &layer.attn_norm.forward(&x)?,
                    layer_idx,
                    &self.rope,
                    &mut slots,
                )
            })?;
            x = residual_add(&x, &scaled(attn_out)?)?;
            if self.experts.wants_prefetch() {
                self.prefetch_next_layer(layer_idx, &x)?;
            }
            let ffn_out = timed(Stage::FeedForward, || {
                let normed = layer.ffn_norm.forward(&x)?;
                match &layer.ffn {
                    FeedForward::Dense(mlp) => mlp.forward(&normed),
                    FeedForward::Sparse(moe) => moe.forward(
                        &normed,
                        ctx.observer
                            .as_mut()
                            .map(|o| &mut **o as &mut dyn RoutingObserver),
                    ),
                }
            })?;
            x = residual_add(&x, &scaled(ffn_out)?)?;
        }
        for slot in slots.iter_mut() {
            slot.cache.advance(slot.n_rows);
        }
        let picked: Vec<Tensor> = wanted
            .iter()
            .map(|&(start, n)| x.narrow(0, start, n))
            .collect::<candle_core::Result<_>>()?;
        // [n_wanted_total, vocab]
        let logits = timed(Stage::LmHead, || {
            self.lm_head
                .forward(&self.final_norm.forward(&Tensor::cat(&picked, 0)?)?)
        })?;
        // Divided (not multiplied by the reciprocal), as transformers does.
        let logits = if m.logits_divisor != 1.0 {
            let divisor = Tensor::new(m.logits_divisor as f32, device)?.to_dtype(logits.dtype())?;
            logits.broadcast_div(&divisor)?
        } else {
            logits
        }
        .to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(wanted.len());
        let mut offset = 0;
        for &(_, n) in &wanted {
            out.push(logits.narrow(0, offset, n)?);
            offset += n;
        }
        Ok(out)
    }
}

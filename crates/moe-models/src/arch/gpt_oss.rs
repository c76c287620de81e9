//! `GptOssForCausalLM`: attention sinks, sliding and full attention alternating by
//! `layer_types`, biases on q/k/v/o and on the router, top-k over the logits then softmax,
//! stacked experts (`gate_up_proj` interleaved, `[in, out]`, with biases; MXFP4 in released
//! checkpoints) with the clamped SwiGLU, YaRN rope.

use moe_core::{Result, RoutingSpec};
use moe_kernels::ExpertActivation;
use moe_loader::ConfigFile;

use crate::blocks::attention::QkNorm;
use crate::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe, Multipliers, RouterRecipe};
use crate::experts::{ExpertLayout, StackedExperts};
use crate::hparams::{read_expert_counts, DecoderHParams};

pub(crate) fn recipe(cfg: &ConfigFile) -> Result<DecoderRecipe> {
    let hparams = DecoderHParams::read(cfg, false)?;
    let n = hparams.n_layers;
    let (n_experts, top_k) = read_expert_counts(cfg, &["num_local_experts", "num_experts"])?;
    // transformers' default: sliding on even layers, full on odd ones.
    let sliding: Vec<bool> = match cfg.raw("layer_types").and_then(|t| t.as_array()) {
        None => (0..n).map(|l| l % 2 == 0).collect(),
        Some(types) if types.len() == n => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(cfg.error("layer_types", format!("unknown layer type {t}"))),
            })
            .collect::<Result<_>>()?,
        Some(types) => {
            return Err(cfg.error(
                "layer_types",
                format!("has {} entries for {n} layers", types.len()),
            ))
        }
    };
    let window = cfg.opt_usize("sliding_window")?.filter(|&w| w > 0);
    if window.is_none() && sliding.contains(&true) {
        return Err(cfg.error("sliding_window", "sliding_attention layers need a window"));
    }
    let alpha = cfg.opt_f64("swiglu_alpha")?.unwrap_or(1.702) as f32;
    let limit = cfg.opt_f64("swiglu_limit")?.unwrap_or(7.0) as f32;
    let mxfp4 = match cfg.object("quantization_config")? {
        None => false,
        Some(q) => match q.opt_str("quant_method")? {
            Some("mxfp4") => true,
            other => {
                return Err(q.error(
                    "quant_method",
                    format!("{other:?} is not supported (only mxfp4)"),
                ))
            }
        },
    };
    let moe = MoeRecipe {
        block: "mlp",
        intermediate: cfg.usize("intermediate_size")?,
        experts: ExpertLayout::Stacked(if mxfp4 {
            StackedExperts::GPT_OSS_MXFP4
        } else {
            StackedExperts::GPT_OSS
        }),
        router: RouterRecipe {
            name: "router",
            bias: true,
            ..RouterRecipe::GATE
        },
        activation: ExpertActivation::ClampedSwiGlu { alpha, limit },
        routing: RoutingSpec::top_k_then_softmax(n_experts, top_k),
        // The top-k softmax runs in the logits' dtype.
        round_weights: true,
        shared: None,
    };
    let bias = cfg.bool_or("attention_bias", true)?;
    let mut attention = super::standard_attention(&hparams, bias, QkNorm::None, None);
    attention.o_bias = bias;
    attention.sinks = true;
    let sliding_layers: Vec<usize> = (0..n).filter(|&l| sliding[l]).collect();
    let facts = vec![
        ("attention sinks", "one learned logit per head".to_string()),
        (
            "sliding window",
            format!(
                "{} tokens on layers {sliding_layers:?}",
                window.unwrap_or(0)
            ),
        ),
        (
            "expert activation",
            format!("clamped SwiGLU (alpha {alpha}, limit {limit})"),
        ),
        (
            "expert storage",
            if mxfp4 {
                "MXFP4, dequantized at load"
            } else {
                "float"
            }
            .to_string(),
        ),
    ];
    Ok(DecoderRecipe {
        architecture: "GptOssForCausalLM",
        attention,
        ffn: vec![FfnRecipe::Sparse(moe); n],
        facts,
        layer_windows: sliding
            .iter()
            .map(|&s| if s { window } else { None })
            .collect(),
        multipliers: Multipliers::NONE,
        hparams,
    })
}

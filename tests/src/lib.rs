//! Shared helpers for the cross-crate tests: fixture paths and the `reference.json` schema
//! written by Hugging Face transformers (see `fixtures/README-transformers-fixtures.md`).

pub mod parity_check;

use std::path::PathBuf;

use serde::Deserialize;

/// The folder of a fixture under `tests/fixtures`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// `reference.json`, the parts the tests read.
#[derive(Debug, Deserialize)]
pub struct Reference {
    /// Fixture name.
    pub name: String,
    /// "float32" or "bfloat16".
    pub dtype: String,
    /// Decoder layers with a router.
    pub moe_layers: Vec<usize>,
    /// Prompts run alone.
    pub prompts: Vec<PromptReference>,
    /// The left-padded batch of prompts 0 and 1.
    pub batched: BatchedReference,
}

/// One prompt's reference outputs.
#[derive(Debug, Deserialize)]
pub struct PromptReference {
    /// Prompt text.
    pub text: String,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Logits at position 0.
    pub logits_first: Vec<f32>,
    /// Logits at the last prompt position.
    pub logits_last: Vec<f32>,
    /// 20 greedy tokens.
    pub greedy_new_tokens: Vec<u32>,
    /// Their text.
    pub greedy_text: String,
    /// Router decisions per MoE layer.
    pub routing: Vec<LayerRouting>,
}

/// One MoE layer's routing of a prompt.
#[derive(Debug, Deserialize)]
pub struct LayerRouting {
    /// Decoder layer.
    pub layer: usize,
    /// Chosen experts per token, ascending.
    pub experts: Vec<Vec<u32>>,
    /// Their weights, same order.
    pub weights: Vec<Vec<f32>>,
    /// min(selected) − max(unselected) score; tiny values are near-ties.
    pub selection_margin: Vec<f32>,
}

/// The batched case.
#[derive(Debug, Deserialize)]
pub struct BatchedReference {
    /// Which prompts form the batch.
    pub prompt_indices: Vec<usize>,
    /// Last-position logits per row.
    pub logits_last: Vec<Vec<f32>>,
    /// 10 greedy tokens per row.
    pub greedy_new_tokens: Vec<Vec<u32>>,
}

impl Reference {
    /// Reads a fixture's `reference.json`.
    pub fn load(name: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(fixture_dir(name).join("reference.json"))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of `prompt` (token ids) by `engine`: `n` new tokens, EOS ignored.
pub fn greedy(engine: &moe_engine::Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let request = moe_engine::GenerateRequest {
        prompt: moe_engine::Prompt::TokenIds(prompt.to_vec()),
        max_new_tokens: n,
        sampling: moe_engine::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ignore_eos: true,
        ..Default::default()
    };
    engine
        .generate(&request, &mut |_| {})
        .unwrap()
        .generated_token_ids
}

/// Greedy continuation of `prompt` by `model` alone (one sequence, no engine): `n` new tokens.
pub fn greedy_decoder(model: &moe_models::DecoderModel, prompt: &[u32], n: usize) -> Vec<u32> {
    use moe_models::{ForwardContext, LogitsWanted, SequenceInput};
    let mut cache = model.new_cache();
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        let fed = if tokens.len() == prompt.len() {
            &tokens[..]
        } else {
            &tokens[tokens.len() - 1..]
        };
        let logits = model
            .forward(
                &mut [SequenceInput {
                    tokens: fed,
                    cache: &mut cache,
                    logits: LogitsWanted::Last,
                }],
                ForwardContext::default(),
            )
            .unwrap();
        let row: Vec<f32> = logits[0].get(0).unwrap().to_vec1().unwrap();
        tokens.push(argmax(&row));
    }
    tokens[prompt.len()..].to_vec()
}

/// The architecture recipe for fixture `name`'s config.json after `edit` (config tests).
pub fn edited_recipe(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> moe_core::Result<moe_models::decoder::DecoderRecipe> {
    let path = fixture_dir(name).join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    let cfg = moe_loader::ConfigFile::from_value(path, json);
    (moe_models::find_architecture(&cfg)?.recipe)(&cfg)
}

/// Asserts `result` is a config error naming `field`.
pub fn assert_rejects_field(
    result: moe_core::Result<moe_models::decoder::DecoderRecipe>,
    field: &str,
) {
    match result {
        Err(moe_core::Error::Config {
            field: f, message, ..
        }) => {
            assert_eq!(f, field, "error names the wrong field: {message}")
        }
        Err(e) => panic!("expected a config error about `{field}`, got: {e}"),
        Ok(_) => panic!("expected a config error about `{field}`, the config was accepted"),
    }
}

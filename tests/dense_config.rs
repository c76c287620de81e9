//! The dense architectures (`LlamaForCausalLM`, `Qwen3ForCausalLM`) read every config field
//! that changes their output and reject the values they do not implement, naming the field.
//! Each case edits the config.json of a dense fixture in memory.

use moe_core::Result;
use moe_models::blocks::attention::QkNorm;
use moe_models::decoder::{DecoderRecipe, FfnRecipe};
use serde_json::{json, Map, Value};

/// The recipe for fixture `name`'s config.json after `edit`.
fn recipe(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Result<DecoderRecipe> {
    moe_tests::edited_recipe(name, edit)
}

/// Asserts a config error about `field`.
fn rejects(result: Result<DecoderRecipe>, field: &str) {
    moe_tests::assert_rejects_field(result, field)
}

fn all_dense(r: &DecoderRecipe) -> bool {
    r.ffn.len() == r.hparams.n_layers
        && r.ffn
            .iter()
            .all(|f| matches!(f, FfnRecipe::Dense { intermediate: 128 }))
}

#[test]
fn llama_fixtures_read_as_dense_models() {
    let r = recipe("llama", |_| {}).unwrap();
    assert_eq!(r.architecture, "LlamaForCausalLM");
    assert!(all_dense(&r));
    assert!(!r.hparams.tie_word_embeddings);
    assert!(!r.attention.qkv_bias && !r.attention.o_bias);
    assert_eq!(r.attention.qk_norm, QkNorm::None);
    assert_eq!(
        (r.hparams.n_heads, r.hparams.n_kv_heads, r.hparams.head_dim),
        (4, 2, 16)
    );

    let r = recipe("llama-tied", |_| {}).unwrap();
    assert!(all_dense(&r));
    assert!(r.hparams.tie_word_embeddings);
    assert!(r.attention.qkv_bias && r.attention.o_bias);
    assert_eq!(r.hparams.n_kv_heads, 1);
}

#[test]
fn llama_defaults_follow_llama_config() {
    // tie_word_embeddings defaults to false, max_position_embeddings to 2048, head_dim to
    // hidden / heads; an explicit head_dim is used as given.
    let r = recipe("llama", |c| {
        c.remove("tie_word_embeddings");
        c.remove("max_position_embeddings");
        c.remove("head_dim");
    })
    .unwrap();
    assert!(!r.hparams.tie_word_embeddings);
    assert_eq!(r.hparams.max_position_embeddings, 2048);
    assert_eq!(r.hparams.head_dim, 16);
    let r = recipe("llama", |c| {
        c.insert("head_dim".into(), json!(32));
    })
    .unwrap();
    assert_eq!((r.attention.head_dim, r.hparams.rope.rotary_dim), (32, 32));
}

#[test]
fn llama_rejects_what_it_does_not_implement() {
    rejects(
        recipe("llama", |c| {
            c.insert("mlp_bias".into(), json!(true));
        }),
        "mlp_bias",
    );
    rejects(
        recipe("llama", |c| {
            c.insert("hidden_act".into(), json!("gelu"));
        }),
        "hidden_act",
    );
    let llama3 = json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    rejects(
        recipe("llama", |c| {
            c.insert("rope_parameters".into(), llama3);
        }),
        "rope_parameters.rope_type",
    );
}

#[test]
fn qwen3_fixture_reads_as_a_dense_model() {
    let r = recipe("qwen3", |_| {}).unwrap();
    assert_eq!(r.architecture, "Qwen3ForCausalLM");
    assert!(all_dense(&r));
    assert!(r.hparams.tie_word_embeddings);
    assert_eq!(r.attention.qk_norm, QkNorm::PerHead);
    assert!(!r.attention.qkv_bias && !r.attention.o_bias);
    assert_eq!(
        (r.hparams.n_heads, r.hparams.n_kv_heads, r.hparams.head_dim),
        (4, 2, 32)
    );
    assert_eq!(r.hparams.rope.theta, 1e6);

    let r = recipe("qwen3", |c| {
        c.insert("attention_bias".into(), json!(true));
    })
    .unwrap();
    assert!(r.attention.qkv_bias && r.attention.o_bias);
}

#[test]
fn qwen3_defaults_follow_qwen3_config() {
    // Qwen3Config: head_dim 128 (not hidden / heads), max_position_embeddings 32768,
    // tie_word_embeddings false.
    let r = recipe("qwen3", |c| {
        c.remove("head_dim");
        c.remove("max_position_embeddings");
        c.remove("tie_word_embeddings");
    })
    .unwrap();
    assert_eq!((r.hparams.head_dim, r.attention.head_dim), (128, 128));
    assert_eq!(r.hparams.max_position_embeddings, 32768);
    assert!(!r.hparams.tie_word_embeddings);
    rejects(
        recipe("qwen3", |c| {
            c.insert("head_dim".into(), Value::Null);
        }),
        "head_dim",
    );
}

#[test]
fn qwen3_rejects_sliding_window_layers() {
    let sliding = |c: &mut Map<String, Value>| {
        c.insert("use_sliding_window".into(), json!(true));
        c.insert("sliding_window".into(), json!(4096));
    };
    // layer_types, when given, decides (as in transformers).
    rejects(
        recipe("qwen3", |c| {
            c.insert(
                "layer_types".into(),
                json!(["full_attention", "sliding_attention", "full_attention"]),
            );
        }),
        "layer_types",
    );
    recipe("qwen3", sliding).unwrap();
    // Without layer_types, layers from max_window_layers on slide when the window is on.
    rejects(
        recipe("qwen3", |c| {
            sliding(c);
            c.remove("layer_types");
            c.insert("max_window_layers".into(), json!(1));
        }),
        "use_sliding_window",
    );
    recipe("qwen3", |c| {
        sliding(c);
        c.remove("layer_types");
        c.insert("max_window_layers".into(), json!(3));
    })
    .unwrap();
    recipe("qwen3", |c| {
        c.remove("layer_types");
        c.insert("sliding_window".into(), json!(4096));
        c.insert("max_window_layers".into(), json!(0));
    })
    .unwrap();
}

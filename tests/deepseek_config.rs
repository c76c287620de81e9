//! DeepSeek-V2/V3 read the config fields that change their output (MLA shape, rope layout and
//! mscale, routing, dense/MoE placement) and reject what they do not implement, naming the
//! field. Each case edits the config.json of a DeepSeek fixture in memory.

use moe_core::{GroupLimit, GroupScore, Result, ScoringFunction};
use moe_models::blocks::mla::RopeLayout;
use moe_models::decoder::{DecoderRecipe, FfnRecipe, MoeRecipe};
use serde_json::{json, Map, Value};

/// The recipe for fixture `name`'s config.json after `edit`.
fn recipe(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Result<DecoderRecipe> {
    moe_tests::edited_recipe(name, edit)
}

/// Asserts a config error about `field`.
fn rejects(result: Result<DecoderRecipe>, field: &str) {
    moe_tests::assert_rejects_field(result, field)
}

/// The MoE layers' recipe and which layers are sparse.
fn moe(r: &DecoderRecipe) -> (&MoeRecipe, Vec<usize>) {
    let layers: Vec<usize> = (0..r.ffn.len())
        .filter(|&l| matches!(r.ffn[l], FfnRecipe::Sparse(_)))
        .collect();
    match &r.ffn[layers[0]] {
        FfnRecipe::Sparse(m) => (m, layers),
        FfnRecipe::Dense { .. } => unreachable!(),
    }
}

#[test]
fn deepseek_v3_reads_mla_routing_and_placement() {
    let r = recipe("deepseek_v3", |_| {}).unwrap();
    let latent = r.attention.latent.as_ref().unwrap();
    assert_eq!(
        (latent.q_lora_rank, latent.kv_lora_rank, latent.v_head_dim),
        (Some(48), 32, 16)
    );
    assert_eq!(latent.rope_layout, RopeLayout::PairsToHalves);
    // The attention head is nope + rope (the config's head_dim 8 is the rope part).
    assert_eq!((r.hparams.head_dim, r.hparams.rope.rotary_dim), (24, 8));
    // 24^-0.5 · (0.1 · ln 40 + 1)²
    let mscale = 0.1 * 40f64.ln() + 1.0;
    assert!((r.attention.softmax_scale - mscale * mscale / 24f64.sqrt()).abs() < 1e-12);
    let (m, layers) = moe(&r);
    assert_eq!(layers, [1, 2]);
    assert_eq!(
        m.routing.scoring,
        ScoringFunction::SigmoidGroupLimited(GroupLimit {
            n_group: 4,
            topk_group: 2,
            group_score: GroupScore::SumTop2
        })
    );
    assert!(m.routing.renormalize && m.router.correction_bias && m.router.f32_logits);
    assert_eq!(m.routing.scaling_factor, 2.5);
    let shared = m.shared.as_ref().unwrap();
    assert_eq!(
        (shared.name, shared.intermediate, shared.gate),
        ("shared_experts", 16, None)
    );

    let r = recipe("deepseek_v3-nonorm", |_| {}).unwrap();
    let (m, layers) = moe(&r);
    assert_eq!(layers, [0, 1]);
    assert_eq!(m.routing.scoring, ScoringFunction::Sigmoid);
    assert!(!m.routing.renormalize);
    assert_eq!(r.attention.latent.as_ref().unwrap().q_lora_rank, None);
    assert!((r.attention.softmax_scale - 16f64.powf(-0.5)).abs() < 1e-15);

    let r = recipe("deepseek_v3", |c| {
        c.insert("rope_interleave".into(), json!(false));
        c.insert("moe_layer_freq".into(), json!(2));
    })
    .unwrap();
    assert_eq!(
        r.attention.latent.as_ref().unwrap().rope_layout,
        RopeLayout::Halves
    );
    assert_eq!(moe(&r).1, [2]);
}

#[test]
fn deepseek_v2_reads_greedy_and_group_limited_routing() {
    let r = recipe("deepseek_v2", |_| {}).unwrap();
    assert_eq!(
        r.attention.latent.as_ref().unwrap().rope_layout,
        RopeLayout::Pairs
    );
    // mscale_all_dim 0.707: 24^-0.5 · (0.0707 · ln 40 + 1)²
    let mscale = 0.1 * 0.707 * 40f64.ln() + 1.0;
    assert!((r.attention.softmax_scale - mscale * mscale / 24f64.sqrt()).abs() < 1e-12);
    let (m, _) = moe(&r);
    assert_eq!(
        m.routing.scoring,
        ScoringFunction::SoftmaxGroupLimited(GroupLimit {
            n_group: 4,
            topk_group: 2,
            group_score: GroupScore::Max
        })
    );
    assert!(!m.routing.renormalize && !m.router.correction_bias);
    assert_eq!(m.routing.scaling_factor, 16.0);
    assert_eq!(m.shared.as_ref().unwrap().intermediate, 32);

    let r = recipe("deepseek_v2-lite", |_| {}).unwrap();
    assert_eq!(moe(&r).0.routing.scoring, ScoringFunction::Softmax);
    // transformers' V2 router never renormalises.
    let r = recipe("deepseek_v2-lite", |c| {
        c.insert("norm_topk_prob".into(), json!(true));
    })
    .unwrap();
    assert!(!moe(&r).0.routing.renormalize);
}

#[test]
fn deepseek_rejects_what_it_does_not_implement() {
    rejects(
        recipe("deepseek_v3", |c| {
            c.insert("scoring_func".into(), json!("softmax"));
        }),
        "scoring_func",
    );
    rejects(
        recipe("deepseek_v2", |c| {
            c.insert("topk_method".into(), json!("noaux_tc"));
        }),
        "topk_method",
    );
    rejects(
        recipe("deepseek_v3", |c| {
            c.insert("n_group".into(), json!(3));
        }),
        "n_group",
    );
    rejects(
        recipe("deepseek_v3", |c| {
            c.insert("topk_group".into(), json!(5));
        }),
        "topk_group",
    );
    rejects(
        recipe("deepseek_v2", |c| {
            c.insert("num_key_value_heads".into(), json!(2));
        }),
        "num_key_value_heads",
    );
    rejects(
        recipe("deepseek_v2", |c| {
            c.insert("qk_rope_head_dim".into(), json!(7));
        }),
        "qk_rope_head_dim",
    );
    rejects(
        recipe("deepseek_v2", |c| {
            c.insert("mlp_bias".into(), json!(true));
        }),
        "mlp_bias",
    );
    rejects(
        recipe("deepseek_v3", |c| {
            c.remove("kv_lora_rank");
        }),
        "kv_lora_rank",
    );
}

//! GPT-OSS as released stores its experts in MXFP4. This quantizes the `gpt_oss` fixture's
//! experts, writes them packed (`*_blocks` + `*_scales`, `quantization_config.quant_method:
//! mxfp4`) and, next to it, as float tensors dequantized by the format's definition, then
//! checks that both checkpoints load to the same model: identical logits (also with int8
//! experts, resident or through the expert cache).

use std::collections::HashMap;
use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_cache::{ExpertBudget, PolicyKind, TieredExpertsBuilder};
use moe_kernels::WeightDtype;
use moe_models::{load_decoder, ForwardContext, LoadOptions, LogitsWanted, SequenceInput};
use moe_tests::{fixture_dir, Reference};

/// e2m1 code → value, from the definition (sign, 2 exponent bits with bias 1, 1 mantissa bit).
fn e2m1(code: u8) -> f32 {
    let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
    let (exponent, mantissa) = (((code >> 1) & 3) as i32, (code & 1) as f32);
    let magnitude = if exponent == 0 {
        0.5 * mantissa
    } else {
        (1.0 + 0.5 * mantissa) * 2f32.powi(exponent - 1)
    };
    sign * magnitude
}

/// Quantizes `[rows, cols]` (cols a multiple of 32) to MXFP4: blocks (two codes per byte,
/// low nibble first), one e8m0 scale per 32 values, and the values they decode to.
fn quantize(values: &[f32], cols: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let (mut blocks, mut scales, mut decoded) = (Vec::new(), Vec::new(), Vec::new());
    for block in values.chunks(32) {
        assert_eq!(cols % 32, 0);
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Smallest power of two with amax / 2^s ≤ 6.
        let s = if amax == 0.0 {
            0
        } else {
            (amax / 6.0).log2().ceil() as i32
        };
        scales.push((s + 127) as u8);
        let codes: Vec<u8> = block
            .iter()
            .map(|v| {
                let x = v / 2f32.powi(s);
                (0..16u8)
                    .min_by(|&a, &b| (e2m1(a) - x).abs().total_cmp(&(e2m1(b) - x).abs()))
                    .unwrap()
            })
            .collect();
        for pair in codes.chunks(2) {
            blocks.push(pair[0] | (pair[1] << 4));
        }
        decoded.extend(codes.iter().map(|&c| e2m1(c) * 2f32.powi(s)));
    }
    (blocks, scales, decoded)
}

fn write_checkpoint(dir: &Path, tensors: &HashMap<String, Tensor>, config: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn mxfp4_checkpoint_loads_like_its_dequantized_float_twin() {
    let fixture = fixture_dir("gpt_oss");
    let dev = Device::Cpu;
    let original = candle_core::safetensors::load(fixture.join("model.safetensors"), &dev).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    let mut packed = original.clone();
    let mut float = original.clone();
    let mut n_converted = 0;
    for (name, t) in &original {
        let Some(base) = name
            .strip_suffix(".gate_up_proj")
            .or_else(|| name.strip_suffix(".down_proj"))
        else {
            continue;
        };
        let proj = &name[base.len() + 1..];
        // Stored [E, in, out]; MXFP4 packs [E, out, in].
        let (e, d_in, d_out) = t.dims3().unwrap();
        let out_in: Vec<f32> = t
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (blocks, scales, decoded) = quantize(&out_in, d_in);
        packed.remove(name);
        packed.insert(
            format!("{name}_blocks"),
            Tensor::from_vec(blocks, (e, d_out, d_in / 32, 16), &dev).unwrap(),
        );
        packed.insert(
            format!("{name}_scales"),
            Tensor::from_vec(scales, (e, d_out, d_in / 32), &dev).unwrap(),
        );
        let decoded = Tensor::from_vec(decoded, (e, d_out, d_in), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        float.insert(name.clone(), decoded);
        assert!(proj == "gate_up_proj" || proj == "down_proj");
        n_converted += 1;
    }
    assert_eq!(
        n_converted,
        2 * 4,
        "two expert matrices in each of 4 layers"
    );
    let mut packed_config = config.clone();
    packed_config["quantization_config"] = serde_json::json!({
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    });
    let root = std::env::temp_dir().join(format!("moe-tests-mxfp4-{}", std::process::id()));
    let (packed_dir, float_dir) = (root.join("packed"), root.join("float"));
    write_checkpoint(&packed_dir, &packed, &packed_config);
    write_checkpoint(&float_dir, &float, &config);

    let options = LoadOptions {
        dtype: DType::F32,
        device: dev.clone(),
        expert_source: None,
        expert_dtype: Default::default(),
        dense_dtype: Default::default(),
    };
    let reference = Reference::load("gpt_oss").unwrap();
    let prompt = &reference.prompts[0].input_ids;
    let logits_with = |dir: &Path, options: &LoadOptions| -> Vec<Vec<f32>> {
        let model = load_decoder(dir, options, false).unwrap();
        let mut cache = model.new_cache();
        let mut batch = [SequenceInput {
            tokens: prompt,
            cache: &mut cache,
            logits: LogitsWanted::All,
        }];
        let out = model
            .forward(&mut batch, ForwardContext::default())
            .unwrap();
        out[0].to_vec2().unwrap()
    };
    let logits = |dir: &Path| logits_with(dir, &options);
    let from_packed = logits(&packed_dir);
    let from_float = logits(&float_dir);
    // The tiered expert cache reads one expert's slice of the packed blocks and scales from
    // disk and dequantizes it to the same weights.
    let builder = Arc::new(TieredExpertsBuilder::new(
        ExpertBudget::Percent(40.0),
        PolicyKind::Lru,
    ));
    let tiered = LoadOptions {
        expert_source: Some(builder.clone()),
        expert_dtype: Default::default(),
        dense_dtype: Default::default(),
        ..options.clone()
    };
    let from_packed_on_demand = logits_with(&packed_dir, &tiered);
    // Int8 experts (`--expert-dtype q8`) quantize the MXFP4-dequantized values: the same model
    // from either checkpoint, resident or read on demand by the expert cache.
    let q8 = LoadOptions {
        expert_dtype: WeightDtype::Q8,
        dense_dtype: Default::default(),
        ..options.clone()
    };
    let q8_packed = logits_with(&packed_dir, &q8);
    let q8_float = logits_with(&float_dir, &q8);
    let q8_on_demand = logits_with(
        &packed_dir,
        &LoadOptions {
            expert_source: Some(Arc::new(TieredExpertsBuilder::new(
                ExpertBudget::Percent(100.0),
                PolicyKind::Lru,
            ))),
            ..q8.clone()
        },
    );
    let stats = builder.built().unwrap().stats();
    std::fs::remove_dir_all(&root).ok();
    assert_eq!(from_packed, from_float);
    assert_eq!(from_packed_on_demand, from_packed);
    assert_eq!(q8_float, q8_packed);
    assert_eq!(q8_on_demand, q8_packed);
    assert_ne!(q8_packed, from_packed, "the q8 model is quantized");
    assert!(stats.evictions > 0 && stats.peak_bytes <= stats.budget_bytes);
    // MXFP4 on disk is under a quarter of f32 in RAM: the bytes read are the packed ones.
    let n_experts: usize = stats.layer_usage.iter().map(|l| l.counts.len()).sum();
    let per_expert_in_ram = stats.expert_bytes_total / n_experts as u64;
    assert!(stats.misses > 0 && 4 * stats.bytes_read < stats.misses * per_expert_in_ram);
    // The quantized experts really are in use: the logits moved away from the fixture's.
    let moved = from_packed[0]
        .iter()
        .zip(&reference.prompts[0].logits_first)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "{moved}");
}

//! The transformers fixtures on CUDA: each model is loaded on the GPU (our MoE kernels through
//! `moe_kernels::fused`, candle's CUDA ops elsewhere) and its first- and last-position logits
//! are compared with the Hugging Face reference. Without a GPU (or without `--features cuda`)
//! it prints why and passes; on a GPU machine: `cargo test --workspace --features cuda`.

use candle_core::{DType, Device};
use moe_models::{load_decoder, ForwardContext, LoadOptions, LogitsWanted, SequenceInput};
use moe_tests::{argmax, fixture_dir, max_abs_diff, Reference};

/// f32 fixtures of different routers: softmax top-k (Mixtral, OLMoE), top-k-then-softmax with
/// the clamped activation and biases (GPT-OSS), sigmoid + bias + groups (DeepSeek-V3).
const FIXTURES: [&str; 4] = ["mixtral", "olmoe", "gpt_oss", "deepseek_v3"];

#[test]
fn fixtures_match_transformers_on_cuda() {
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            let e = e.to_string();
            let reason = e.lines().next().unwrap_or_default();
            println!("skipping the CUDA fixture parity: {reason}");
            return;
        }
    };
    for name in FIXTURES {
        let reference = Reference::load(name).unwrap();
        let options = LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            expert_source: None,
            expert_dtype: Default::default(),
            dense_dtype: Default::default(),
        };
        let model = load_decoder(&fixture_dir(name), &options, false).unwrap();
        for (p, prompt) in reference.prompts.iter().enumerate() {
            let mut cache = model.new_cache();
            let mut batch = [SequenceInput {
                tokens: &prompt.input_ids,
                cache: &mut cache,
                logits: LogitsWanted::All,
            }];
            let logits = model
                .forward(&mut batch, ForwardContext::default())
                .unwrap();
            let logits = logits[0]
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let first = max_abs_diff(&logits[0], &prompt.logits_first);
            let last = max_abs_diff(logits.last().unwrap(), &prompt.logits_last);
            println!("{name} prompt {p} on CUDA: max |Δlogit| first {first:.2e} last {last:.2e}");
            assert!(
                first <= 1e-3 && last <= 1e-3,
                "{name} prompt {p}: logits differ on CUDA"
            );
            assert_eq!(
                argmax(logits.last().unwrap()),
                argmax(&prompt.logits_last),
                "{name} prompt {p}"
            );
        }
    }
}

//! A sequence's logits must not depend on what else is in the batch: prefill and decode of one
//! sequence alone vs. packed with others of different lengths, and the engine's batched
//! generation vs. one request at a time.

use candle_core::{DType, Device, Tensor};
use moe_engine::{Engine, EngineOptions, GenerateRequest, Prompt, SamplingParams};
use moe_models::{
    load_decoder, DecoderModel, ForwardContext, LoadOptions, LogitsWanted, SequenceInput,
};
use moe_tests::{fixture_dir, Reference};

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_batch_invariance(name: &str) -> f32 {
    let model: DecoderModel = load_decoder(
        &fixture_dir(name),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            expert_source: None,
            expert_dtype: Default::default(),
            dense_dtype: Default::default(),
        },
        false,
    )
    .unwrap();
    let reference = Reference::load(name).unwrap();
    let prompts: Vec<&[u32]> = reference
        .prompts
        .iter()
        .map(|p| p.input_ids.as_slice())
        .collect();
    let mut worst = 0.0f32;

    // Prefill: prompt 0 alone, then in the middle of a batch with the other two.
    let mut alone_cache = model.new_cache();
    let alone = model
        .forward(
            &mut [SequenceInput {
                tokens: prompts[0],
                cache: &mut alone_cache,
                logits: LogitsWanted::All,
            }],
            ForwardContext::default(),
        )
        .unwrap();
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache()).collect();
    let order = [1usize, 0, 2];
    let packed = {
        let mut batch: Vec<SequenceInput> = Vec::new();
        for (cache, &p) in caches.iter_mut().zip(&order) {
            batch.push(SequenceInput {
                tokens: prompts[p],
                cache,
                logits: LogitsWanted::All,
            });
        }
        model
            .forward(&mut batch, ForwardContext::default())
            .unwrap()
    };
    worst = worst.max(max_diff(&rows(&alone[0]), &rows(&packed[1])));

    // Five decode steps: same token fed alone and in the batch.
    for step in 0..5u32 {
        let token = [10 + step];
        let alone = model
            .forward(
                &mut [SequenceInput {
                    tokens: &token,
                    cache: &mut alone_cache,
                    logits: LogitsWanted::Last,
                }],
                ForwardContext::default(),
            )
            .unwrap();
        let others = [[20 + step], [30 + step]];
        let packed = {
            let (first, rest) = caches.split_at_mut(1);
            let (second, third) = rest.split_at_mut(1);
            let mut batch = vec![
                SequenceInput {
                    tokens: &others[0],
                    cache: &mut first[0],
                    logits: LogitsWanted::Last,
                },
                SequenceInput {
                    tokens: &token,
                    cache: &mut second[0],
                    logits: LogitsWanted::Last,
                },
                SequenceInput {
                    tokens: &others[1],
                    cache: &mut third[0],
                    logits: LogitsWanted::Last,
                },
            ];
            model
                .forward(&mut batch, ForwardContext::default())
                .unwrap()
        };
        worst = worst.max(max_diff(&rows(&alone[0]), &rows(&packed[1])));
    }
    println!("{name}: max |Δlogit| alone vs batched = {worst:e}");
    worst
}

#[test]
fn logits_do_not_depend_on_batch_mates() {
    for name in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let worst = check_batch_invariance(name);
        assert!(
            worst <= 1e-5,
            "{name}: batched logits differ from single by {worst}"
        );
    }
}

#[test]
fn engine_batch_generation_equals_one_at_a_time() {
    let options = EngineOptions {
        model: Some(fixture_dir("qwen3_moe").display().to_string()),
        ..Default::default()
    };
    let engine = Engine::load(&options).unwrap();
    let reference = Reference::load("qwen3_moe").unwrap();
    let requests: Vec<GenerateRequest> = reference
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            prompt: Prompt::TokenIds(p.input_ids.clone()),
            max_new_tokens: 8 + 4 * i,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            ignore_eos: true,
            ..Default::default()
        })
        .collect();
    let batched = engine.generate_batch(&requests).unwrap();
    for ((request, batched), prompt) in requests.iter().zip(&batched).zip(&reference.prompts) {
        let single = engine.generate(request, &mut |_| {}).unwrap();
        assert_eq!(batched.generated_token_ids, single.generated_token_ids);
        assert_eq!(batched.generated_token_ids.len(), request.max_new_tokens);
        // And both are transformers' greedy continuation.
        assert_eq!(
            batched.generated_token_ids[..],
            prompt.greedy_new_tokens[..request.max_new_tokens]
        );
    }
}

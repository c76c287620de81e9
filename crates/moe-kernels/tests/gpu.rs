//! Every CUDA kernel against its CPU twin on a real GPU: the same device-agnostic ops
//! (`fused::route`, `MoeExperts`) run on `Device::Cpu` (the CPU kernels) and on
//! `Device::new_cuda(0)` (our kernels), on random and edge inputs. Run on a GPU machine with
//! `cargo test --workspace --features cuda`; without the feature or without a GPU every test
//! prints why it skipped and passes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{values, Rng};
use moe_core::{GroupLimit, GroupScore, RoutingSpec, ScoringFunction};
use moe_kernels::fused::{self, DECODE_MAX_TOKENS};
use moe_kernels::{ExpertActivation, MoeExperts, StackedExperts};

/// The error's first line (candle appends a backtrace when RUST_BACKTRACE is set).
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("{test}: skipping the GPU comparison: {}", first_line(&e));
            None
        }
    }
}

fn spec(
    n_experts: usize,
    top_k: usize,
    scoring: ScoringFunction,
    renormalize: bool,
) -> RoutingSpec {
    RoutingSpec::new(n_experts, top_k, scoring, renormalize, 1.5)
}

#[test]
fn topk_kernel_on_the_gpu_matches_the_cpu_router() {
    let Some(gpu) = gpu("topk") else { return };
    let mut rng = Rng::new("gpu topk");
    let v3 = ScoringFunction::SigmoidGroupLimited(GroupLimit {
        n_group: 8,
        topk_group: 4,
        group_score: GroupScore::SumTop2,
    });
    let cases = [
        (1, spec(8, 2, ScoringFunction::Softmax, true), false),
        (513, spec(60, 4, ScoringFunction::Softmax, false), false),
        (7, spec(7, 7, ScoringFunction::Softmax, true), false),
        (
            33,
            spec(32, 4, ScoringFunction::TopKThenSoftmax, false),
            false,
        ),
        (65, spec(256, 8, v3, true), true),
        (5, spec(16, 3, ScoringFunction::Sigmoid, true), true),
    ];
    for (n_tokens, spec, with_bias) in &cases {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let logits = Tensor::from_vec(
                rng.vec(n_tokens * spec.n_experts, 4.0),
                (*n_tokens, spec.n_experts),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            let bias = with_bias.then(|| {
                Tensor::from_vec(rng.vec(spec.n_experts, 0.5), spec.n_experts, &Device::Cpu)
                    .unwrap()
            });
            let want = fused::route(&logits, bias.as_ref(), spec).unwrap();
            let got = fused::route(
                &logits.to_device(&gpu).unwrap(),
                bias.as_ref().map(|b| b.to_device(&gpu).unwrap()).as_ref(),
                spec,
            )
            .unwrap();
            let ids = |t: &Tensor| -> Vec<u32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let ws = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (gi, wi, gw, ww) = (
                ids(&got.expert_ids),
                ids(&want.expert_ids),
                ws(&got.weights),
                ws(&want.weights),
            );
            for i in 0..wi.len() {
                assert!(
                    (gw[i] - ww[i]).abs() <= 1e-5 * ww[i].abs().max(1.0)
                        && (gi[i] == wi[i] || (gw[i] - ww[i]).abs() <= 1e-6),
                    "{n_tokens}x{} {:?} {dtype:?}: slot {i}: gpu ({}, {}) cpu ({}, {})",
                    spec.n_experts,
                    spec.scoring,
                    gi[i],
                    gw[i],
                    wi[i],
                    ww[i]
                );
            }
        }
    }
}

#[test]
fn expert_kernels_on_the_gpu_match_the_cpu_pipeline() {
    let Some(gpu) = gpu("experts") else { return };
    let mut rng = Rng::new("gpu experts");
    let gpt_oss = ExpertActivation::ClampedSwiGlu {
        alpha: 1.702,
        limit: 7.0,
    };
    // (tokens, k, experts, hidden, inter, activation, biases): decode sizes, then grouped GEMM
    let cases = [
        (1, 2, 8, 64, 96, ExpertActivation::SiluGlu, false),
        (DECODE_MAX_TOKENS, 4, 16, 72, 40, gpt_oss, true),
        (3, 8, 8, 32, 48, ExpertActivation::SiluGlu, false),
        (37, 2, 4, 96, 136, ExpertActivation::SiluGlu, false),
        (300, 8, 64, 128, 96, ExpertActivation::SiluGlu, false),
        (129, 4, 32, 72, 40, gpt_oss, true),
    ];
    for &(n_tokens, top_k, n_experts, hidden, inter, act, with_bias) in &cases {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = |v: Vec<f32>, shape: &[usize]| {
                Tensor::from_vec(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let x = t(rng.vec(n_tokens * hidden, 1.0), &[n_tokens, hidden]);
            let experts = StackedExperts {
                gate: t(
                    rng.vec(n_experts * inter * hidden, 0.3),
                    &[n_experts, inter, hidden],
                ),
                up: t(
                    rng.vec(n_experts * inter * hidden, 0.3),
                    &[n_experts, inter, hidden],
                ),
                down: t(
                    rng.vec(n_experts * hidden * inter, 0.3),
                    &[n_experts, hidden, inter],
                ),
                biases: with_bias.then(|| {
                    (
                        t(rng.vec(n_experts * inter, 0.2), &[n_experts, inter]),
                        t(rng.vec(n_experts * inter, 0.2), &[n_experts, inter]),
                        t(rng.vec(n_experts * hidden, 0.2), &[n_experts, hidden]),
                    )
                }),
                expert_slot: Some(
                    rng.permutation(n_experts)
                        .into_iter()
                        .map(|s| s as u32)
                        .collect(),
                ),
            };
            let ids = Tensor::from_vec(
                rng.routing(n_tokens, top_k, n_experts),
                (n_tokens, top_k),
                &Device::Cpu,
            )
            .unwrap();
            let w: Vec<f32> = (0..n_tokens * top_k)
                .map(|_| 0.5 * rng.uniform() + 0.6)
                .collect();
            let weights = Tensor::from_vec(w, (n_tokens, top_k), &Device::Cpu).unwrap();
            let op = MoeExperts {
                experts: &experts,
                n_experts,
                activation: act,
            };
            let want = op.forward(&x, &ids, &weights).unwrap();

            let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
            let experts_gpu = StackedExperts {
                gate: on_gpu(&experts.gate),
                up: on_gpu(&experts.up),
                down: on_gpu(&experts.down),
                biases: experts
                    .biases
                    .as_ref()
                    .map(|(a, b, c)| (on_gpu(a), on_gpu(b), on_gpu(c))),
                expert_slot: experts.expert_slot.clone(),
            };
            let op_gpu = MoeExperts {
                experts: &experts_gpu,
                n_experts,
                activation: act,
            };
            let got = op_gpu
                .forward(&on_gpu(&x), &on_gpu(&ids), &on_gpu(&weights))
                .unwrap();

            let (g, wv) = (values(&got), values(&want));
            let scale = wv.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let err = g
                .iter()
                .zip(&wv)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
                / scale;
            let tol = match dtype {
                DType::F32 => 1e-4,
                DType::F16 => 4e-3,
                _ => 2e-2,
            };
            assert!(
                err <= tol,
                "{n_tokens} tokens k={top_k} {n_experts} experts {hidden}x{inter} {act:?} {dtype:?}: normalized error {err}"
            );
        }
    }
}

/// The device expert pool: uploads on the copy stream land in the right slots (read back on
/// the compute stream after `wait_on_compute`), slots are reused LRU once released, and a
/// step needing more slots than the pool has fails. Compiled, never run on a GPU yet.
#[cfg(feature = "cuda")]
#[test]
fn device_expert_pool_uploads_into_slots() {
    use moe_kernels::cuda_pool::{DeviceExpertPool, ExpertDims};
    use moe_kernels::ExpertWeights;
    let Some(gpu) = gpu("expert pool") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let (hidden, intermediate) = (24, 40);
    let dims = ExpertDims {
        hidden,
        intermediate,
        biases: false,
    };
    let expert = |e: usize| -> ExpertWeights {
        let base = e as f32 * 1000.0;
        let t = |r, c, off: f32| {
            Tensor::arange(0u32, (r * c) as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(1.0, (base + off) as f64)
                .unwrap()
                .reshape((r, c))
                .unwrap()
        };
        ExpertWeights::new(
            t(intermediate, hidden, 0.0),
            t(intermediate, hidden, 0.25),
            t(hidden, intermediate, 0.5),
        )
    };
    let mut pool = DeviceExpertPool::<usize, f32>::new(dev, dims, 3, 2).unwrap();
    let slots: Vec<usize> = [5, 9, 2]
        .iter()
        .map(|&e| pool.pin(e, || Ok(expert(e))).unwrap())
        .collect();
    assert!(pool.pin(7, || Ok(expert(7))).is_err(), "all 3 slots pinned");
    pool.wait_on_compute(&slots).unwrap();
    let stacked = pool.stacked(vec![0; 16]);
    for (&e, &slot) in [5, 9, 2].iter().zip(&slots) {
        let want = expert(e);
        for (got, want) in [
            (&stacked.gate, &want.gate),
            (&stacked.up, &want.up),
            (&stacked.down, &want.down),
        ] {
            let got: Vec<f32> = got
                .get(slot)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "expert {e} in slot {slot}");
        }
    }
    pool.release(&[5, 9, 2]).unwrap();
    // a hit does not call the loader; a miss takes the least recently used slot (expert 5's)
    assert_eq!(
        pool.pin(9, || panic!("expert 9 is resident")).unwrap(),
        slots[1]
    );
    let s7 = pool.pin(7, || Ok(expert(7))).unwrap();
    assert_eq!(s7, slots[0]);
    pool.wait_on_compute(&[s7]).unwrap();
    let got: Vec<f32> = pool
        .stacked(vec![0; 16])
        .down
        .get(s7)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = expert(7).down.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, want);
}

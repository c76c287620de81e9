//! Executes every CUDA kernel of `kernels/` on the CPU (g++ + `kernels/shim/cuda_cpu_shim.h`,
//! one C++ thread per CUDA thread, real barriers, emulated warp shuffles and WMMA) and compares
//! its output with the Rust CPU twin, on fresh random inputs and on edge shapes. Needs no CUDA
//! toolkit and no GPU; skips with a printed reason when g++ is absent.
//!
//! The harness binary is built once per change of the kernel sources (cached under the
//! target dir). Each run prints its random seed; `MOE_TEST_SEED=<n>` replays one.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use moe_core::{GroupLimit, GroupScore, RoutingSpec, ScoringFunction};
mod common;
use common::Rng;
use moe_kernels::{
    combine, expert_ffn, route_with_bias, AlignedGroups, ExpertActivation, ExpertGroups,
    ExpertWeights,
};

// ---- the harness binary ------------------------------------------------------------------

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels")
}

/// Path of the built harness, or `None` (with the reason printed) when it cannot be built here.
fn harness() -> Option<&'static Path> {
    static HARNESS: OnceLock<Option<PathBuf>> = OnceLock::new();
    HARNESS
        .get_or_init(|| {
            if let Some(prebuilt) = std::env::var_os("MOE_SHIM_HARNESS") {
                // a sanitizer build from ci/kernel-shim-tests.sh
                println!("CPU-shim harness: {}", prebuilt.to_string_lossy());
                return Some(PathBuf::from(prebuilt));
            }
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
            if Command::new(&cxx).arg("--version").output().is_err() {
                println!("skipping the CPU-shim kernel tests: `{cxx}` not found (set CXX)");
                return None;
            }
            let dir = kernels_dir();
            let mut sources: Vec<PathBuf> = ["", "shim", "shim_tests"]
                .iter()
                .flat_map(|sub| std::fs::read_dir(dir.join(sub)).unwrap())
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| ["cu", "cuh", "h", "cpp"].contains(&e.to_str().unwrap()))
                })
                .collect();
            sources.sort();
            let mut hasher = DefaultHasher::new();
            for s in &sources {
                std::fs::read(s).unwrap().hash(&mut hasher);
            }
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("moe-shim-harness-{:016x}", hasher.finish()));
            if !out.exists() {
                let tmp = out.with_extension("tmp");
                let status = Command::new(&cxx)
                    .args(["-std=c++20", "-O1", "-g", "-pthread", "-I"])
                    .arg(&dir)
                    .arg("-include")
                    .arg(dir.join("shim/cuda_cpu_shim.h"))
                    .arg(dir.join("shim_tests/harness.cpp"))
                    .arg("-o")
                    .arg(&tmp)
                    .status()
                    .expect("run the C++ compiler");
                assert!(status.success(), "the CPU-shim harness does not compile");
                std::fs::rename(&tmp, &out).unwrap();
            }
            Some(out)
        })
        .as_deref()
}

// ---- tensor files (the harness's I/O format) ---------------------------------------------

#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
}

impl Data {
    fn code(&self) -> u32 {
        match self {
            Data::F32(_) => 0,
            Data::F16(_) => 1,
            Data::Bf16(_) => 2,
            Data::U32(_) => 3,
            Data::I32(_) => 4,
        }
    }
    fn to_f32(&self) -> Vec<f32> {
        match self {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::U32(v) => v.iter().map(|&x| x as f32).collect(),
            Data::I32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
    fn u32s(&self) -> &[u32] {
        match self {
            Data::U32(v) => v,
            other => panic!("expected u32, got {other:?}"),
        }
    }
    fn i32s(&self) -> &[i32] {
        match self {
            Data::I32(v) => v,
            other => panic!("expected i32, got {other:?}"),
        }
    }
    /// The values rounded to `dtype` (as the kernel sees them).
    fn of(values: &[f32], dtype: DType) -> Data {
        match dtype {
            DType::F32 => Data::F32(values.to_vec()),
            DType::F16 => Data::F16(values.iter().map(|&x| half::f16::from_f32(x)).collect()),
            DType::BF16 => Data::Bf16(values.iter().map(|&x| half::bf16::from_f32(x)).collect()),
            d => panic!("unsupported dtype {d:?}"),
        }
    }
}

type Records = BTreeMap<String, Data>;

fn write_records(path: &Path, records: &Records) {
    let mut bytes = Vec::new();
    for (name, data) in records {
        bytes.extend((name.len() as u32).to_le_bytes());
        bytes.extend(name.as_bytes());
        bytes.extend(data.code().to_le_bytes());
        let (n, raw): (usize, Vec<u8>) = match data {
            Data::F32(v) => (v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::F16(v) => (v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::Bf16(v) => (v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::U32(v) => (v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I32(v) => (v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        bytes.extend((n as u64).to_le_bytes());
        bytes.extend(raw);
    }
    std::fs::write(path, bytes).unwrap();
}

fn read_records(path: &Path) -> Records {
    let bytes = std::fs::read(path).unwrap();
    let mut rest = &bytes[..];
    let mut take = |n: usize| {
        let (head, tail) = rest.split_at(n);
        rest = tail;
        head
    };
    let mut records = Records::new();
    let n_bytes = bytes.len();
    let mut at = 0;
    loop {
        if at >= n_bytes {
            return records;
        }
        let len = u32::from_le_bytes(take(4).try_into().unwrap()) as usize;
        let name = String::from_utf8(take(len).to_vec()).unwrap();
        let code = u32::from_le_bytes(take(4).try_into().unwrap());
        let n = u64::from_le_bytes(take(8).try_into().unwrap()) as usize;
        let data = match code {
            0 => Data::F32(
                take(4 * n)
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            1 => Data::F16(
                take(2 * n)
                    .chunks(2)
                    .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            2 => Data::Bf16(
                take(2 * n)
                    .chunks(2)
                    .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            3 => Data::U32(
                take(4 * n)
                    .chunks(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            4 => Data::I32(
                take(4 * n)
                    .chunks(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            c => panic!("bad dtype code {c}"),
        };
        at += 4 + len + 4 + 8 + n * if matches!(code, 1 | 2) { 2 } else { 4 };
        records.insert(name, data);
    }
}

/// Runs operation `op` of the harness on `inputs`; `None` when the harness cannot be built.
/// `MOE_SHIM_MAX_RUNS=n` runs only the first n cases of each test (the TSan build in CI,
/// where every CUDA thread is an instrumented OS thread).
fn run(op: &str, mut inputs: Records) -> Option<Records> {
    let harness = harness()?;
    thread_local!(static RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });
    let max_runs = std::env::var("MOE_SHIM_MAX_RUNS")
        .ok()
        .and_then(|s| s.parse().ok());
    if max_runs.is_some_and(|max: usize| RUNS.get() >= max) {
        return None;
    }
    RUNS.set(RUNS.get() + 1);
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (inp, out) = (
        dir.join(format!("shim-{}-{id}.in", std::process::id())),
        dir.join(format!("shim-{}-{id}.out", std::process::id())),
    );
    inputs.insert(
        "op".into(),
        Data::U32(op.chars().map(|c| c as u32).collect()),
    );
    write_records(&inp, &inputs);
    let result = Command::new(harness).arg(&inp).arg(&out).output().unwrap();
    assert!(
        result.status.success(),
        "harness {op} failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let records = read_records(&out);
    let _ = std::fs::remove_file(&inp);
    let _ = std::fs::remove_file(&out);
    Some(records)
}

// ---- top-k gating ------------------------------------------------------------------------

fn topk_case(rng: &mut Rng, n_tokens: usize, spec: &RoutingSpec, with_bias: bool, dtype: DType) {
    let Some(harness) = harness() else { return };
    let _ = harness;
    let n_experts = spec.n_experts;
    let logits = Data::of(&rng.vec(n_tokens * n_experts, 4.0), dtype);
    let bias = with_bias.then(|| rng.vec(n_experts, 0.5));
    // the twin: the CPU kernel on the same (rounded) logits
    let logits_t = Tensor::from_vec(logits.to_f32(), (n_tokens, n_experts), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let bias_t = bias
        .as_ref()
        .map(|b| Tensor::from_vec(b.clone(), n_experts, &Device::Cpu).unwrap());
    let want = route_with_bias(&logits_t, bias_t.as_ref(), spec).unwrap();
    let want_ids: Vec<u32> = want.expert_ids.flatten_all().unwrap().to_vec1().unwrap();
    let want_w: Vec<f32> = want.weights.flatten_all().unwrap().to_vec1().unwrap();

    let (scoring, eps) = match spec.scoring {
        ScoringFunction::Softmax | ScoringFunction::SoftmaxGroupLimited(_) => (0, 0.0),
        ScoringFunction::TopKThenSoftmax => (1, 0.0),
        ScoringFunction::Sigmoid | ScoringFunction::SigmoidGroupLimited(_) => (2, 1e-20),
        ScoringFunction::SparseMixer { .. } => unreachable!("no kernel for sparsemixer"),
    };
    let (n_group, topk_group, group_score) = spec.scoring.group_limit().map_or((1, 1, 0), |l| {
        (
            l.n_group,
            l.topk_group,
            (l.group_score == GroupScore::SumTop2) as i32,
        )
    });
    let mut inputs = Records::new();
    inputs.insert("logits".into(), logits);
    if let Some(b) = bias {
        inputs.insert("bias".into(), Data::F32(b));
    }
    let params = [
        n_tokens,
        n_experts,
        spec.top_k,
        scoring,
        spec.renormalize as usize,
        n_group,
        topk_group,
    ];
    let mut params: Vec<i32> = params.iter().map(|&p| p as i32).collect();
    params.push(group_score);
    inputs.insert("params".into(), Data::I32(params));
    inputs.insert("fparams".into(), Data::F32(vec![eps, spec.scaling_factor]));
    let Some(got) = run("topk", inputs) else {
        return;
    };
    let got_ids = got["ids"].u32s();
    let got_w = got["weights"].to_f32();
    let what = format!(
        "topk {n_tokens}x{n_experts} k={} {:?} bias={with_bias} {dtype:?}",
        spec.top_k, spec.scoring
    );
    assert_eq!(got_ids.len(), want_ids.len(), "{what}");
    for i in 0..want_ids.len() {
        // a swap of two experts whose weights agree to 1e-6 is a near-tie that the two softmax
        // implementations may order differently; anything else is a bug
        let same_id = got_ids[i] == want_ids[i];
        let close = (got_w[i] - want_w[i]).abs() <= 1e-5 * want_w[i].abs().max(1.0);
        assert!(
            close && (same_id || (got_w[i] - want_w[i]).abs() <= 1e-6),
            "{what}: row {} slot {}: kernel ({}, {}) twin ({}, {})",
            i / spec.top_k,
            i % spec.top_k,
            got_ids[i],
            got_w[i],
            want_ids[i],
            want_w[i]
        );
    }
}

fn limit(n_group: usize, topk_group: usize, group_score: GroupScore) -> GroupLimit {
    GroupLimit {
        n_group,
        topk_group,
        group_score,
    }
}

#[test]
fn topk_kernel_matches_the_cpu_router() {
    let mut rng = Rng::new("topk");
    use ScoringFunction::*;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // one token; tokens >> experts; experts not a multiple of the warp; top_k = n_experts
        topk_case(
            &mut rng,
            1,
            &RoutingSpec::new(8, 2, Softmax, true, 1.0),
            false,
            dtype,
        );
        topk_case(
            &mut rng,
            37,
            &RoutingSpec::new(60, 4, Softmax, false, 1.0),
            false,
            dtype,
        );
        topk_case(
            &mut rng,
            9,
            &RoutingSpec::new(7, 7, Softmax, true, 1.0),
            false,
            dtype,
        );
        topk_case(
            &mut rng,
            3,
            &RoutingSpec::new(1, 1, Softmax, false, 1.0),
            false,
            dtype,
        );
        topk_case(
            &mut rng,
            5,
            &RoutingSpec::new(256, 8, Softmax, true, 1.0),
            false,
            dtype,
        );
        // GPT-OSS / Granite: top-k of the logits, softmax over the chosen
        topk_case(
            &mut rng,
            11,
            &RoutingSpec::new(32, 4, TopKThenSoftmax, false, 1.0),
            false,
            dtype,
        );
        // DeepSeek-V3: sigmoid + correction bias + group limit (sum of top-2), scaled
        let v3 = SigmoidGroupLimited(limit(8, 4, GroupScore::SumTop2));
        topk_case(
            &mut rng,
            13,
            &RoutingSpec::new(64, 8, v3, true, 2.5),
            true,
            dtype,
        );
        topk_case(
            &mut rng,
            4,
            &RoutingSpec::new(16, 3, Sigmoid, true, 1.0),
            true,
            dtype,
        );
        // DeepSeek-V2: softmax, group-limited by the group max
        let v2 = SoftmaxGroupLimited(limit(4, 2, GroupScore::Max));
        topk_case(
            &mut rng,
            6,
            &RoutingSpec::new(24, 6, v2, false, 16.0),
            false,
            dtype,
        );
        // softmax with a bias
        topk_case(
            &mut rng,
            3,
            &RoutingSpec::new(10, 2, Softmax, true, 1.0),
            true,
            dtype,
        );
    }
}

// ---- alignment ---------------------------------------------------------------------------

fn align_case(rng: &mut Rng, n_tokens: usize, top_k: usize, n_experts: usize, tile: usize) {
    let ids = rng.routing(n_tokens, top_k, n_experts);
    let want = AlignedGroups::from_ids(&ids, top_k, n_experts, tile).unwrap();
    let mut inputs = Records::new();
    inputs.insert("ids".into(), Data::U32(ids.clone()));
    inputs.insert(
        "params".into(),
        Data::I32(vec![ids.len() as i32, n_experts as i32, tile as i32]),
    );
    let Some(got) = run("align", inputs) else {
        return;
    };
    let what = format!("align {n_tokens} tokens k={top_k} {n_experts} experts tile {tile}");
    assert_eq!(got["offsets"].i32s(), &want.offsets[..], "{what}: offsets");
    assert_eq!(
        got["sorted_pairs"].u32s(),
        &want.sorted_pairs[..],
        "{what}: sorted_pairs"
    );
    assert_eq!(
        got["tile_expert"].i32s(),
        &want.tile_expert[..],
        "{what}: tile_expert"
    );
    assert_eq!(
        got["pair_slot"].i32s(),
        &want.pair_slot[..],
        "{what}: pair_slot"
    );
}

#[test]
fn align_kernel_matches_the_cpu_grouping() {
    let mut rng = Rng::new("align");
    align_case(&mut rng, 1, 2, 8, 16); // one token
    align_case(&mut rng, 300, 2, 4, 32); // tokens >> experts
    align_case(&mut rng, 3, 2, 64, 16); // experts that get no token
    align_case(&mut rng, 5, 8, 8, 64); // top_k = n_experts
    align_case(&mut rng, 37, 4, 60, 16); // nothing a multiple of anything
    align_case(&mut rng, 129, 6, 130, 1); // more experts than threads, tile 1
}

// ---- expert FFN + combine (grouped GEMM and decode paths) --------------------------------

/// One MoE layer's experts, stacked in pool-slot order ([slots, out, in]), plus routing.
struct MoeCase {
    n_tokens: usize,
    top_k: usize,
    n_experts: usize,
    hidden: usize,
    inter: usize,
    act: ExpertActivation,
    with_bias: bool,
}

enum KernelPath {
    /// grouped GEMM, combine fused into the down projection's epilogue
    GemmFused,
    /// grouped GEMM, then moe_combine
    GemmCombine,
    /// the decode kernels, then moe_combine
    Decode,
}

fn moe_case(rng: &mut Rng, c: &MoeCase, dtype: DType, path: KernelPath, tile_m: usize) {
    let Some(_) = harness() else { return };
    let (e, h, i) = (c.n_experts, c.hidden, c.inter);
    let x = Data::of(&rng.vec(c.n_tokens * h, 1.0), dtype);
    let w_gate = Data::of(&rng.vec(e * i * h, 0.3), dtype);
    let w_up = Data::of(&rng.vec(e * i * h, 0.3), dtype);
    let w_down = Data::of(&rng.vec(e * h * i, 0.3), dtype);
    let biases = c.with_bias.then(|| {
        (
            Data::of(&rng.vec(e * i, 0.2), dtype),
            Data::of(&rng.vec(e * i, 0.2), dtype),
            Data::of(&rng.vec(e * h, 0.2), dtype),
        )
    });
    let ids = rng.routing(c.n_tokens, c.top_k, e);
    let weights: Vec<f32> = (0..ids.len()).map(|_| 0.5 * rng.uniform() + 0.6).collect();
    // experts live in a device pool at permuted slots
    let slot_of = rng.permutation(e);

    // the twin: the CPU MoE pipeline (grouping -> expert_ffn per expert -> combine)
    let cpu = Device::Cpu;
    let t = |d: &Data, shape: &[usize]| {
        Tensor::from_vec(d.to_f32(), shape, &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let x_t = t(&x, &[c.n_tokens, h]);
    let (wg_t, wu_t, wd_t) = (
        t(&w_gate, &[e, i, h]),
        t(&w_up, &[e, i, h]),
        t(&w_down, &[e, h, i]),
    );
    let bias_t = biases
        .as_ref()
        .map(|(bg, bu, bd)| (t(bg, &[e, i]), t(bu, &[e, i]), t(bd, &[e, h])));
    let groups = ExpertGroups::from_slices(&ids, &weights, c.top_k, e).unwrap();
    let mut outputs = Vec::new();
    for expert in groups.active_experts() {
        let slot = slot_of[expert] as usize;
        let mut w = ExpertWeights::new(
            wg_t.get(slot).unwrap(),
            wu_t.get(slot).unwrap(),
            wd_t.get(slot).unwrap(),
        );
        if let Some((bg, bu, bd)) = &bias_t {
            w.gate_bias = Some(bg.get(slot).unwrap());
            w.up_bias = Some(bu.get(slot).unwrap());
            w.down_bias = Some(bd.get(slot).unwrap());
        }
        let rows =
            Tensor::from_slice(groups.rows(expert).0, groups.rows(expert).0.len(), &cpu).unwrap();
        outputs.push(expert_ffn(&x_t.index_select(&rows, 0).unwrap(), &w, c.act).unwrap());
    }
    let want: Vec<f32> = combine(c.n_tokens, h, &groups, &outputs, dtype, &cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let (act, alpha, lim) = match c.act {
        ExpertActivation::SiluGlu => (0, 0.0, 0.0),
        ExpertActivation::ClampedSwiGlu { alpha, limit } => (1, alpha, limit),
    };
    let path_code = match path {
        KernelPath::GemmFused => 0,
        KernelPath::GemmCombine => 1,
        KernelPath::Decode => 2,
    };
    let mut inputs = Records::new();
    inputs.insert("x".into(), x);
    inputs.insert("w_gate".into(), w_gate);
    inputs.insert("w_up".into(), w_up);
    inputs.insert("w_down".into(), w_down);
    if let Some((bg, bu, bd)) = biases {
        inputs.insert("b_gate".into(), bg);
        inputs.insert("b_up".into(), bu);
        inputs.insert("b_down".into(), bd);
    }
    inputs.insert("expert_slot".into(), Data::I32(slot_of.clone()));
    inputs.insert("ids".into(), Data::U32(ids.clone()));
    inputs.insert("weights".into(), Data::F32(weights));
    let params = [c.n_tokens, c.top_k, e, h, i, act, path_code, tile_m, 5];
    inputs.insert(
        "params".into(),
        Data::I32(params.iter().map(|&p| p as i32).collect()),
    );
    inputs.insert("fparams".into(), Data::F32(vec![alpha, lim]));
    let Some(got) = run("moe", inputs) else {
        return;
    };
    let what = format!(
        "moe {} tokens k={} {e} experts hidden {h} inter {i} {:?} bias={} {dtype:?} path {path_code} tile {tile_m}",
        c.n_tokens, c.top_k, c.act, c.with_bias
    );
    for key in ["unwritten_inter", "unwritten_y_rows"] {
        if let Some(n) = got.get(key) {
            assert_eq!(n.u32s(), &[0], "{what}: {key}");
        }
    }
    let y = got["y"].to_f32();
    assert_eq!(y.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let max_err = y
        .iter()
        .zip(&want)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max);
    let tol = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 2e-2,
    };
    assert!(
        max_err / scale <= tol,
        "{what}: normalized error {} > {tol}",
        max_err / scale
    );

    if let KernelPath::Decode = path {
        // each selected expert's weights read exactly once in the step, the others never
        let selected: std::collections::BTreeSet<usize> =
            ids.iter().map(|&e| slot_of[e as usize] as usize).collect();
        for (name, per_slot) in [
            ("reads_gate", i * h),
            ("reads_up", i * h),
            ("reads_down", h * i),
        ] {
            let reads = got[name].u32s();
            assert_eq!(reads.len(), e * per_slot, "{what}: {name}");
            for slot in 0..e {
                let want_reads = selected.contains(&slot) as u32;
                let slice = &reads[slot * per_slot..(slot + 1) * per_slot];
                if let Some(j) = slice.iter().position(|&r| r != want_reads) {
                    panic!(
                        "{what}: {name}: element {j} of slot {slot} read {} times, expected {want_reads}",
                        slice[j]
                    );
                }
            }
        }
    }
}

const GPT_OSS: ExpertActivation = ExpertActivation::ClampedSwiGlu {
    alpha: 1.702,
    limit: 7.0,
};

fn gemm_cases() -> Vec<MoeCase> {
    let case = |n_tokens, top_k, n_experts, hidden, inter, act, with_bias| MoeCase {
        n_tokens,
        top_k,
        n_experts,
        hidden,
        inter,
        act,
        with_bias,
    };
    vec![
        case(1, 2, 8, 40, 72, ExpertActivation::SiluGlu, false), // one token
        case(37, 2, 4, 40, 24, ExpertActivation::SiluGlu, false), // tokens >> experts
        case(3, 2, 16, 32, 48, GPT_OSS, true),                   // experts with no token
        case(5, 4, 4, 24, 40, ExpertActivation::SiluGlu, true),  // top_k = n_experts
    ]
}

#[test]
fn grouped_gemm_kernels_match_the_cpu_moe_pipeline() {
    let mut rng = Rng::new("grouped_gemm");
    for (n, c) in gemm_cases().iter().enumerate() {
        for dtype in [DType::BF16, DType::F16] {
            let tile = [16, 32, 64][(n + (dtype == DType::F16) as usize) % 3];
            moe_case(&mut rng, c, dtype, KernelPath::GemmFused, tile);
            moe_case(&mut rng, c, dtype, KernelPath::GemmCombine, tile);
        }
    }
}

#[test]
fn decode_kernels_match_and_read_each_expert_once() {
    let mut rng = Rng::new("decode");
    let case = |n_tokens, top_k, n_experts, hidden, inter, act, with_bias| MoeCase {
        n_tokens,
        top_k,
        n_experts,
        hidden,
        inter,
        act,
        with_bias,
    };
    let cases = [
        case(1, 2, 8, 40, 72, ExpertActivation::SiluGlu, false), // batch 1
        case(8, 2, 4, 33, 20, ExpertActivation::SiluGlu, true),  // 8 tokens, experts shared
        case(3, 2, 16, 32, 48, GPT_OSS, true),                   // experts with no token
        case(2, 4, 4, 24, 40, ExpertActivation::SiluGlu, false), // top_k = n_experts
    ];
    for c in &cases {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            moe_case(&mut rng, c, dtype, KernelPath::Decode, 0);
        }
    }
}

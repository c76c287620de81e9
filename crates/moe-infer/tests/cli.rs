//! End-to-end tests of the `moe-infer` binary: the bundled model against transformers' greedy
//! tokens, sampling reproducibility, stop strings, `--dump-logits`, `inspect`, chat templates
//! and hub resolution from an offline cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_tests::{fixture_dir, max_abs_diff, Reference};
use serde_json::Value;

mod common;
use common::{json_of, moe_infer};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-infer-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn bundled_model_greedy_matches_transformers() {
    // models/train_demo.py records transformers' float32 greedy continuation of the bundled model.
    let log: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/tinystories-moe/training_log.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let reference = &log["checks"]["reference_greedy_f32"];
    let out = json_of(&moe_infer(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        "20",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(
        ids(&out["prompt_token_ids"]),
        ids(&reference["prompt_ids"]),
        "BOS is prepended to the text prompt"
    );
    assert_eq!(
        ids(&out["generated_token_ids"]),
        ids(&reference["generated_ids"])
    );
    assert_eq!(out["finish_reason"], "length");
    assert!(out["text"]
        .as_str()
        .unwrap()
        .contains("little girl named Lily"));
    for key in [
        "prompt_tokens",
        "generated_tokens",
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
    ] {
        assert!(out["timings"][key].as_f64().unwrap() > 0.0, "timings.{key}");
    }
}

#[test]
fn bundled_model_samples_by_default_and_seed_reproduces() {
    let run = |seed: &str| {
        json_of(&moe_infer(&[
            "generate",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "30",
            "--seed",
            seed,
            "--json",
        ]))
    };
    let a = run("7");
    let b = run("7");
    let c = run("8");
    assert_eq!(a["generated_token_ids"], b["generated_token_ids"]);
    assert_eq!(a["text"], b["text"]);
    assert_ne!(
        a["generated_token_ids"], c["generated_token_ids"],
        "different seeds should differ when sampling"
    );
    assert_eq!(a["seed"], 7);
}

#[test]
fn streaming_output_is_the_json_text() {
    let out = moe_infer(&[
        "generate",
        "--prompt",
        "The dog",
        "--max-new-tokens",
        "25",
        "--seed",
        "3",
    ]);
    assert!(out.status.success());
    let streamed = String::from_utf8(out.stdout).unwrap();
    let json = json_of(&moe_infer(&[
        "generate",
        "--prompt",
        "The dog",
        "--max-new-tokens",
        "25",
        "--seed",
        "3",
        "--json",
    ]));
    assert_eq!(
        streamed.trim_end_matches('\n'),
        format!("The dog{}", json["text"].as_str().unwrap())
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("prefill") && stderr.contains("decode") && stderr.contains("tok/s"),
        "{stderr}"
    );
}

#[test]
fn stop_string_ends_generation_and_is_not_returned() {
    let out = json_of(&moe_infer(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--stop",
        "Lily",
        "--json",
    ]));
    assert_eq!(out["finish_reason"], "stop_string");
    assert_eq!(out["text"], ", there was a little girl named ");
}

#[test]
fn dump_logits_matches_transformers() {
    let reference = Reference::load("mixtral").unwrap();
    let prompt = &reference.prompts[0];
    let dir = temp_dir("dump");
    let path = dir.join("logits.safetensors");
    let token_ids: Vec<String> = prompt.input_ids.iter().map(u32::to_string).collect();
    let out = moe_infer(&[
        "perplexity",
        "--model",
        fixture_dir("mixtral").to_str().unwrap(),
        "--token-ids",
        &token_ids.join(","),
        "--dump-logits",
        path.to_str().unwrap(),
        "--json",
    ]);
    let report = json_of(&out);
    assert_eq!(report["n_tokens"], prompt.input_ids.len());
    assert!(report["perplexity"].as_f64().unwrap() > 1.0);
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let logits = file.tensor("logits").unwrap();
    assert_eq!(logits.shape(), &[prompt.input_ids.len(), 512]);
    let values: Vec<f32> = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(max_abs_diff(&values[..512], &prompt.logits_first) <= 1e-4);
    assert!(max_abs_diff(&values[values.len() - 512..], &prompt.logits_last) <= 1e-4);
    // The reported NLL is the mean of -log softmax at the next token.
    let mut nll = 0.0f64;
    for (pos, next) in prompt.input_ids.iter().skip(1).enumerate() {
        let row = &values[pos * 512..(pos + 1) * 512];
        let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let log_sum = row
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        nll += log_sum - row[*next as usize] as f64;
    }
    nll /= (prompt.input_ids.len() - 1) as f64;
    assert!((report["mean_nll"].as_f64().unwrap() - nll).abs() < 1e-4);
}

#[test]
fn inspect_reports_experts_and_parameter_counts() {
    let out = json_of(&moe_infer(&[
        "inspect",
        "--model",
        fixture_dir("qwen2_moe").to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(out["architecture"], "Qwen2MoeForCausalLM");
    assert_eq!(out["n_experts"], 8);
    assert_eq!(out["top_k"], 3);
    assert_eq!(out["n_shared_experts"], 1);
    assert_eq!(out["moe_layers"], serde_json::json!([0, 2]));
    // Parameters counted independently from the safetensors header.
    let bytes = std::fs::read(fixture_dir("qwen2_moe").join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let total: u64 = file
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
        .sum();
    assert_eq!(out["params_total"], total);
    // 2 MoE layers × (8 − 3) inactive experts × 3 matrices of 64 × 32.
    assert_eq!(out["params_active"], total - 2 * 5 * 3 * 64 * 32);
    assert_eq!(out["params_active_routed"], 2 * 3 * 3 * 64 * 32);
    assert_eq!(out["expert_dtype"], "f32");
    let q8 = json_of(&moe_infer(&[
        "inspect",
        "--model",
        fixture_dir("qwen2_moe").to_str().unwrap(),
        "--expert-dtype",
        "q8",
        "--json",
    ]));
    assert_eq!(q8["expert_dtype"], "q8");
    assert_eq!(q8["dense_dtype"], "f32");
    let all_q8 = json_of(&moe_infer(&[
        "inspect",
        "--model",
        fixture_dir("qwen2_moe").to_str().unwrap(),
        "--dense-dtype",
        "q8",
        "--json",
    ]));
    assert_eq!(all_q8["expert_dtype"], "f32");
    assert_eq!(all_q8["dense_dtype"], "q8");
}

#[test]
fn chat_renders_the_models_template() {
    let dir = temp_dir("chat");
    copy_dir(&fixture_dir("mixtral"), &dir);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg["chat_template"] = Value::String("{{ bos_token }}{% for m in messages %}[{{ m.role|upper }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}".into());
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let model = dir.to_str().unwrap();
    let chat = json_of(&moe_infer(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        " What is a list? ",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
        "--json",
    ]));
    // The same text typed as a plain prompt tokenizes to the same ids (this tokenizer adds no BOS).
    let plain = json_of(&moe_infer(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "<|endoftext|>[USER] What is a list?\n[ASSISTANT]",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
        "--json",
    ]));
    assert_eq!(chat["prompt_token_ids"], plain["prompt_token_ids"]);
    assert_eq!(
        ids(&chat["prompt_token_ids"])[0],
        0,
        "bos_token rendered by the template"
    );
    let no_template = moe_infer(&[
        "generate",
        "--model",
        fixture_dir("mixtral").to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
    ]);
    assert!(!no_template.status.success());
    assert!(String::from_utf8_lossy(&no_template.stderr).contains("no chat template"));
}

#[test]
fn hub_id_resolves_from_the_offline_cache() {
    // The standard HF cache layout: models--org--name/{refs/main, snapshots/<rev>/files}.
    let home = temp_dir("hfhome");
    let repo = home.join("hub").join("models--tiny--mixtral");
    let snapshot = repo.join("snapshots").join("0123abc");
    copy_dir(&fixture_dir("mixtral"), &snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abc").unwrap();
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_moe-infer"))
            .args(["inspect", "--model", id, "--json"])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
    };
    let out = json_of(&run("tiny/mixtral"));
    assert_eq!(out["architecture"], "MixtralForCausalLM");
    let missing = run("tiny/absent");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("HF_HUB_OFFLINE") && stderr.contains("tiny/absent"),
        "{stderr}"
    );
}

/// `--numerics torch-exact` reproduces transformers' bf16 logits bit for bit; the default fast
/// kernels stay within the tolerance tests/parity_fast.rs states (0.1).
#[test]
fn numerics_flag_selects_the_bf16_kernels() {
    let reference = Reference::load("mixtral-bf16").unwrap();
    let prompt = &reference.prompts[0];
    let token_ids: Vec<String> = prompt.input_ids.iter().map(u32::to_string).collect();
    let dir = temp_dir("numerics");
    for (numerics, tolerance) in [("torch-exact", 0.0), ("fast", 0.1)] {
        let path = dir.join(format!("{numerics}.safetensors"));
        let out = moe_infer(&[
            "perplexity",
            "--model",
            fixture_dir("mixtral-bf16").to_str().unwrap(),
            "--dtype",
            "bf16",
            "--numerics",
            numerics,
            "--token-ids",
            &token_ids.join(","),
            "--dump-logits",
            path.to_str().unwrap(),
            "--json",
        ]);
        json_of(&out);
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let values: Vec<f32> = file
            .tensor("logits")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let first = max_abs_diff(&values[..512], &prompt.logits_first);
        let last = max_abs_diff(&values[values.len() - 512..], &prompt.logits_last);
        assert!(
            first <= tolerance && last <= tolerance,
            "{numerics}: |Δlogit| first {first}, last {last} > {tolerance}"
        );
    }
}

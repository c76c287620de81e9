//! Bad input: every broken file, config or flag must end `moe-infer` with a one-line
//! `error: ...` on stderr that names the file, tensor or field at fault, a non-zero exit
//! status, and no panic. Each test copies a tiny fixture into a temp folder and breaks one
//! thing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Map, Value};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_moe-infer");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

// ---------------------------------------------------------------------------------------------
// helpers

/// A fresh copy of `tests/fixtures/<name>` in a temp folder (kept alive by the `TempDir`).
fn fixture_copy(name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).expect("create model dir");
    for entry in std::fs::read_dir(Path::new(FIXTURES).join(name)).expect("fixture exists") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy fixture file");
        }
    }
    (tmp, dir)
}

/// A safetensors file split into its JSON header and its data section.
struct Safetensors {
    header: Map<String, Value>,
    data: Vec<u8>,
}

fn read_safetensors(path: &Path) -> Safetensors {
    let bytes = std::fs::read(path).expect("read safetensors");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
    Safetensors {
        header: header.as_object().expect("header object").clone(),
        data: bytes[8 + n..].to_vec(),
    }
}

fn write_safetensors(path: &Path, header: &Map<String, Value>, data: &[u8]) {
    let header = serde_json::to_vec(header).expect("serialize header");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).expect("write safetensors");
}

/// Rewrites the JSON header of a safetensors file in place, keeping the data section as is.
fn rewrite_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut st = read_safetensors(path);
    edit(&mut st.header);
    write_safetensors(path, &st.header, &st.data);
}

/// Rewrites a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut value: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read JSON")).expect("JSON");
    edit(value.as_object_mut().expect("JSON object"));
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).expect("write JSON");
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("MOE_INFER_BUNDLED_MODEL")
        .output()
        .expect("run moe-infer")
}

/// `generate --model DIR --prompt hi --max-new-tokens 2` plus `extra`.
fn generate(dir: &Path, extra: &[&str]) -> Output {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["generate", "--model", dir];
    if !extra
        .iter()
        .any(|a| *a == "--prompt" || *a == "--token-ids")
    {
        args.extend(["--prompt", "hi"]);
    }
    if !extra.iter().any(|a| a.starts_with("--max-new-tokens")) {
        args.extend(["--max-new-tokens", "2"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

fn inspect(dir: &Path) -> Output {
    run(&["inspect", "--model", dir.to_str().unwrap()])
}

/// Asserts a clean failure: non-zero exit that is not a panic, exactly one non-empty stderr
/// line starting with `error: `, containing every one of `needles`. Returns that line.
#[track_caller]
fn assert_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr:\n{stderr}"
    );
    assert_ne!(code, Some(101), "moe-infer panicked:\n{stderr}");
    assert!(
        code.is_some(),
        "moe-infer was killed by a signal:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic message:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "no `error: ` prefix: {line}");
    for needle in needles {
        assert!(line.contains(needle), "`{needle}` not in: {line}");
    }
    line.to_string()
}

fn data_len(path: &Path) -> usize {
    read_safetensors(path).data.len()
}

// ---------------------------------------------------------------------------------------------
// checkpoint files

#[test]
fn missing_model_safetensors() {
    let (_tmp, dir) = fixture_copy("mixtral");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_error(&generate(&dir, &[]), &["model.safetensors"]);
}

#[test]
fn truncated_model_safetensors() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_error(&generate(&dir, &[]), &["model.safetensors", "truncated"]);
}

#[test]
fn file_too_short_for_a_header() {
    let (_tmp, dir) = fixture_copy("mixtral");
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    assert_error(&inspect(&dir), &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_past_end_of_file() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_error(&inspect(&dir), &["model.safetensors", "header"]);
}

#[test]
fn data_offsets_past_end_of_file() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let path = dir.join("model.safetensors");
    let end = data_len(&path);
    rewrite_header(&path, |h| {
        // Same byte count as the real [64] f32 tensor, but beyond the data section.
        h["model.norm.weight"]["data_offsets"] = json!([end, end + 256]);
    });
    assert_error(
        &generate(&dir, &[]),
        &["model.safetensors", "`model.norm.weight`"],
    );
}

#[test]
fn overlapping_tensors() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let path = dir.join("model.safetensors");
    rewrite_header(&path, |h| {
        let start = h["lm_head.weight"]["data_offsets"][0].as_u64().unwrap();
        h["model.norm.weight"]["data_offsets"] = json!([start, start + 256]);
    });
    assert_error(
        &generate(&dir, &[]),
        &[
            "model.safetensors",
            "`model.norm.weight`",
            "`lm_head.weight`",
            "overlap",
        ],
    );
}

#[test]
fn shape_too_large_to_address() {
    let (_tmp, dir) = fixture_copy("mixtral");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        h["model.norm.weight"]["shape"] = json!([1u64 << 40, 1u64 << 40]);
    });
    assert_error(
        &inspect(&dir),
        &["model.safetensors", "`model.norm.weight`"],
    );
}

#[test]
fn wrong_tensor_shape() {
    let (_tmp, dir) = fixture_copy("mixtral");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        // Same byte count, transposed shape.
        h["lm_head.weight"]["shape"] = json!([64, 512]);
    });
    let line = assert_error(
        &generate(&dir, &[]),
        &[
            "`lm_head.weight`",
            "model.safetensors",
            "[64, 512]",
            "[512, 64]",
        ],
    );
    assert!(line.contains("expected [512, 64]"), "{line}");
    assert_error(
        &inspect(&dir),
        &["`lm_head.weight`", "[64, 512]", "[512, 64]"],
    );
}

#[test]
fn unsupported_tensor_dtype() {
    let (_tmp, dir) = fixture_copy("mixtral");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        assert_eq!(h["model.norm.weight"]["dtype"], "F32");
        h["model.norm.weight"]["dtype"] = json!("I32"); // same element size
    });
    assert_error(
        &generate(&dir, &[]),
        &["`model.norm.weight`", "model.safetensors", "I32"],
    );
}

#[test]
fn unknown_tensor_dtype() {
    let (_tmp, dir) = fixture_copy("mixtral");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        h["model.norm.weight"]["dtype"] = json!("Q4_K");
    });
    assert_error(
        &inspect(&dir),
        &["`model.norm.weight`", "model.safetensors", "Q4_K"],
    );
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = fixture_copy("mixtral");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        let entry = h.remove("model.norm.weight").unwrap();
        h.insert("model.final_norm.weight".into(), entry);
    });
    assert_error(
        &generate(&dir, &[]),
        &["missing tensor", "`model.norm.weight`"],
    );
}

#[test]
fn missing_expert_tensor_qwen2_moe() {
    let (_tmp, dir) = fixture_copy("qwen2_moe");
    let name = "model.layers.0.mlp.experts.7.down_proj.weight";
    rewrite_header(&dir.join("model.safetensors"), |h| {
        let entry = h.remove(name).expect("qwen2_moe names experts like this");
        h.insert(format!("{name}.renamed"), entry);
    });
    assert_error(&inspect(&dir), &["missing tensor", &format!("`{name}`")]);
}

// ---------------------------------------------------------------------------------------------
// config.json and the other JSON files

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let (_tmp, dir) = fixture_copy("mixtral");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("architectures".into(), json!(["FooForCausalLM"]));
    });
    assert_error(
        &generate(&dir, &[]),
        &[
            "FooForCausalLM",
            "MixtralForCausalLM",
            "Qwen2MoeForCausalLM",
            "Qwen3MoeForCausalLM",
            "OlmoeForCausalLM",
        ],
    );
}

#[test]
fn more_experts_per_token_than_experts() {
    let (_tmp, dir) = fixture_copy("mixtral");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("num_experts_per_tok".into(), json!(9));
    });
    assert_error(
        &generate(&dir, &[]),
        &["config.json", "`num_experts_per_tok`", "9", "8"],
    );
}

#[test]
fn more_experts_per_token_than_experts_qwen2_moe() {
    let (_tmp, dir) = fixture_copy("qwen2_moe");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("num_experts_per_tok".into(), json!(20));
    });
    assert_error(
        &inspect(&dir),
        &["config.json", "`num_experts_per_tok`", "20"],
    );
}

#[test]
fn zero_attention_heads() {
    let (_tmp, dir) = fixture_copy("mixtral");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("num_attention_heads".into(), json!(0));
    });
    assert_error(
        &generate(&dir, &[]),
        &["config.json", "`num_attention_heads`"],
    );
}

#[test]
fn hidden_size_not_divisible_by_heads() {
    let (_tmp, dir) = fixture_copy("mixtral");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("num_attention_heads".into(), json!(5));
        c.insert("num_key_value_heads".into(), json!(5));
        c.remove("head_dim");
    });
    assert_error(
        &generate(&dir, &[]),
        &["config.json", "`hidden_size`", "64", "5"],
    );
}

#[test]
fn missing_and_mistyped_config_fields() {
    let (_tmp, dir) = fixture_copy("mixtral");
    edit_json(&dir.join("config.json"), |c| {
        c.remove("vocab_size");
    });
    assert_error(&inspect(&dir), &["config.json", "`vocab_size`", "missing"]);
    edit_json(&dir.join("config.json"), |c| {
        c.insert("vocab_size".into(), json!(512));
        c.insert("hidden_size".into(), json!("64"));
    });
    assert_error(&inspect(&dir), &["config.json", "`hidden_size`"]);
}

#[test]
fn implausible_config_values() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let config = dir.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let cases: [(&str, Value, &str); 4] = [
        ("rms_norm_eps", json!(-1.0), "`rms_norm_eps`"),
        (
            "max_position_embeddings",
            json!(1u64 << 40),
            "`max_position_embeddings`",
        ),
        (
            "num_attention_heads",
            json!(1u64 << 62),
            "`num_attention_heads`",
        ),
        ("head_dim", json!(3), "`head_dim`"),
    ];
    for (field, value, needle) in cases {
        std::fs::write(&config, &original).unwrap();
        edit_json(&config, |c| {
            if field == "num_attention_heads" {
                c.insert("num_key_value_heads".into(), value.clone());
                c.insert("head_dim".into(), json!(16));
            }
            c.insert(field.into(), value);
        });
        assert_error(&inspect(&dir), &["config.json", needle]);
    }
}

#[test]
fn invalid_json_in_config() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    // Drop the closing brace and leave a dangling comma.
    let broken = format!("{},", text.trim_end().strip_suffix('}').unwrap());
    std::fs::write(&path, broken).unwrap();
    assert_error(&generate(&dir, &[]), &["config.json", "invalid JSON"]);
}

#[test]
fn invalid_json_in_generation_config() {
    let (_tmp, dir) = fixture_copy("mixtral");
    std::fs::write(dir.join("generation_config.json"), "{ nope").unwrap();
    assert_error(
        &generate(&dir, &[]),
        &["generation_config.json", "invalid JSON"],
    );
}

#[test]
fn missing_config_json() {
    let (_tmp, dir) = fixture_copy("mixtral");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_error(&generate(&dir, &[]), &["config.json"]);
}

#[test]
fn missing_tokenizer_json() {
    let (_tmp, dir) = fixture_copy("mixtral");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_error(&generate(&dir, &[]), &["tokenizer.json"]);
}

// ---------------------------------------------------------------------------------------------
// requests and flags

fn ids(n: usize, id: u32) -> String {
    vec![id.to_string(); n].join(",")
}

#[test]
fn prompt_longer_than_the_context() {
    let dir = Path::new(FIXTURES).join("mixtral");
    let out = generate(&dir, &["--token-ids", &ids(300, 5)]);
    assert_error(&out, &["300", "256", "context"]);
}

#[test]
fn invalid_sampling_values() {
    let dir = Path::new(FIXTURES).join("mixtral");
    let cases: [(&[&str], &[&str]); 6] = [
        (&["--temperature", "-1"], &["temperature", "-1"]),
        (&["--temperature=-1"], &["temperature", "-1"]),
        (&["--top-p", "0"], &["top-p", "0"]),
        (&["--top-p", "1.5"], &["top-p", "1.5"]),
        (&["--min-p", "1"], &["min-p", "1"]),
        (&["--repetition-penalty", "0"], &["repetition penalty", "0"]),
    ];
    std::thread::scope(|s| {
        for (flags, needles) in cases {
            let dir = &dir;
            s.spawn(move || assert_error(&generate(dir, flags), needles));
        }
    });
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cuda_device_without_cuda_build() {
    let dir = Path::new(FIXTURES).join("mixtral");
    assert_error(&generate(&dir, &["--device", "cuda"]), &["without CUDA"]);
    assert_error(&generate(&dir, &["--device", "cuda:1"]), &["without CUDA"]);
}

#[test]
fn unknown_device_and_dtype() {
    let dir = Path::new(FIXTURES).join("mixtral");
    assert_error(&generate(&dir, &["--device", "tpu"]), &["`tpu`", "cpu"]);
    assert_error(&generate(&dir, &["--dtype", "f8"]), &["`f8`", "bf16"]);
    assert_error(
        &generate(&dir, &["--numerics", "quick"]),
        &["quick", "torch-exact"],
    );
}

/// `--expert-dtype q8` or `--dense-dtype q8` where nothing computes int8 weights (torch-exact
/// numerics) is a one-line error saying what is unsupported; an unknown weight dtype names the
/// choices.
#[test]
fn q8_experts_with_torch_exact_numerics() {
    let dir = Path::new(FIXTURES).join("mixtral");
    assert_error(
        &generate(&dir, &["--expert-dtype", "q8", "--numerics", "torch-exact"]),
        &["--expert-dtype q8 is not supported with --numerics torch-exact"],
    );
    assert_error(
        &generate(&dir, &["--expert-dtype", "q4"]),
        &["q4", "expected auto or q8"],
    );
    assert_error(
        &generate(&dir, &["--dense-dtype", "q8", "--numerics", "torch-exact"]),
        &["--dense-dtype q8 is not supported with --numerics torch-exact"],
    );
    assert_error(
        &generate(&dir, &["--dense-dtype", "int4"]),
        &["int4", "expected auto or q8"],
    );
}

#[test]
fn model_path_that_does_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    assert_error(
        &generate(&missing, &[]),
        &["no-such-model", "no such folder"],
    );
}

#[test]
fn model_path_that_is_a_file() {
    let file = Path::new(FIXTURES).join("mixtral/config.json");
    assert_error(&inspect(&file), &["config.json", "not a folder"]);
}

#[test]
fn token_id_outside_the_vocabulary() {
    let dir = Path::new(FIXTURES).join("mixtral");
    assert_error(
        &generate(&dir, &["--token-ids", "5,600,7"]),
        &["600", "vocabulary", "512"],
    );
    let out = run(&[
        "perplexity",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        "5,6,900",
    ]);
    assert_error(&out, &["900", "vocabulary", "512"]);
}

#[test]
fn empty_stop_string_and_zero_new_tokens() {
    let dir = Path::new(FIXTURES).join("mixtral");
    assert_error(&generate(&dir, &["--stop", ""]), &["stop string"]);
    assert_error(
        &generate(&dir, &["--stop", "x", "--stop", ""]),
        &["stop string #2"],
    );
    assert_error(
        &generate(&dir, &["--max-new-tokens", "0"]),
        &["max_new_tokens", "0"],
    );
}

#[test]
fn empty_prompt() {
    let dir = Path::new(FIXTURES).join("mixtral");
    assert_error(&generate(&dir, &["--prompt", ""]), &["prompt", "empty"]);
}

#[test]
fn usage_errors_exit_with_status_2() {
    let dir = Path::new(FIXTURES).join("mixtral");
    for out in [
        generate(&dir, &["--no-such-flag"]),
        generate(&dir, &["--temperature", "warm"]),
        generate(&dir, &["--token-ids", "1,x"]),
    ] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// sharded checkpoints

/// Splits `model.safetensors` of `dir` into shards (`assign` picks a shard 0/1 per tensor
/// name), writes them as `model-0000{i+1}-of-00002.safetensors` with a correct index, and
/// removes the single file.
fn shard_checkpoint(dir: &Path, assign: impl Fn(&str) -> usize) {
    let single = dir.join("model.safetensors");
    let st = read_safetensors(&single);
    let shard_names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut headers = [Map::new(), Map::new()];
    let mut datas = [Vec::new(), Vec::new()];
    let mut weight_map = Map::new();
    let mut names: Vec<&String> = st.header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    for name in names {
        let entry = &st.header[name];
        let start = entry["data_offsets"][0].as_u64().unwrap() as usize;
        let end = entry["data_offsets"][1].as_u64().unwrap() as usize;
        let shard = assign(name);
        let offset = datas[shard].len();
        datas[shard].extend_from_slice(&st.data[start..end]);
        let mut entry = entry.clone();
        entry["data_offsets"] = json!([offset, offset + end - start]);
        headers[shard].insert(name.clone(), entry);
        weight_map.insert(name.clone(), json!(shard_names[shard]));
    }
    for shard in 0..2 {
        assert!(!headers[shard].is_empty(), "shard {shard} would be empty");
        write_safetensors(
            &dir.join(shard_names[shard]),
            &headers[shard],
            &datas[shard],
        );
    }
    let index = json!({
        "metadata": {"total_size": st.data.len()},
        "weight_map": weight_map,
    });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(single).unwrap();
}

#[test]
fn index_names_a_missing_shard() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let shard = "model-00001-of-00001.safetensors";
    std::fs::rename(dir.join("model.safetensors"), dir.join(shard)).unwrap();
    let names: Vec<String> = read_safetensors(&dir.join(shard))
        .header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let mut weight_map = Map::new();
    for name in &names {
        let file = if name == "model.norm.weight" {
            "model-00002-of-00002.safetensors"
        } else {
            shard
        };
        weight_map.insert(name.clone(), json!(file));
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    assert_error(
        &generate(&dir, &[]),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
        ],
    );
}

#[test]
fn invalid_shard_index() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(&index, "{ not json").unwrap();
    assert_error(
        &inspect(&dir),
        &["model.safetensors.index.json", "invalid JSON"],
    );
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    assert_error(
        &inspect(&dir),
        &["model.safetensors.index.json", "weight_map"],
    );
}

#[test]
fn tensor_in_two_shards() {
    let (_tmp, dir) = fixture_copy("mixtral");
    shard_checkpoint(&dir, |name| {
        usize::from(name.starts_with("model.layers.1."))
    });
    // Copy one tensor of shard 1 into shard 2 as well.
    let second = dir.join("model-00002-of-00002.safetensors");
    let first = read_safetensors(&dir.join("model-00001-of-00002.safetensors"));
    let mut st = read_safetensors(&second);
    let name = "lm_head.weight";
    let entry = &first.header[name];
    let (start, end) = (
        entry["data_offsets"][0].as_u64().unwrap() as usize,
        entry["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let offset = st.data.len();
    st.data.extend_from_slice(&first.data[start..end]);
    let mut entry = entry.clone();
    entry["data_offsets"] = json!([offset, offset + end - start]);
    st.header.insert(name.into(), entry);
    write_safetensors(&second, &st.header, &st.data);
    assert_error(
        &inspect(&dir),
        &["model-00002-of-00002.safetensors", "`lm_head.weight`"],
    );
}

fn generate_json(dir: &Path, prompt_ids: &str) -> Value {
    let out = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--temperature",
        "0",
        "--json",
        "--token-ids",
        prompt_ids,
        "--max-new-tokens",
        "20",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn sharded_checkpoint_matches_the_single_file() {
    let (_tmp, dir) = fixture_copy("mixtral");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompt: Vec<String> = reference["prompts"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap().to_string())
        .collect();
    let prompt = prompt.join(",");
    let single = generate_json(&dir, &prompt);
    // Experts of layer 1 and the output head in the second shard, the rest in the first.
    shard_checkpoint(&dir, |name| {
        usize::from(name.starts_with("model.layers.1.") || name == "lm_head.weight")
    });
    assert!(!dir.join("model.safetensors").exists());
    let sharded = generate_json(&dir, &prompt);
    let tokens = &single["generated_token_ids"];
    assert_eq!(tokens.as_array().map(Vec::len), Some(20), "{single}");
    assert_eq!(&sharded["generated_token_ids"], tokens);
}

//! `moe-infer bench`: the JSON report is filled and consistent, `--plot` writes SVG, and an
//! expert budget adds the cache's statistics. Tiny settings on a fixture; no timing assertions.

use std::process::Output;

use moe_tests::fixture_dir;
use serde_json::Value;

mod common;
use common::{json_of, moe_infer};

fn bench(reps: &str, extra: &[&str]) -> Output {
    let model = fixture_dir("qwen3_moe").display().to_string();
    let mut args = vec![
        "bench",
        "--model",
        &model,
        "--prefill",
        "8,16",
        "--concurrency",
        "1,3",
        "--decode-tokens",
        "3",
        "--decode-prompt",
        "4",
        "--reps",
        reps,
        "--bandwidth-mib",
        "8",
    ];
    args.extend_from_slice(extra);
    moe_infer(&args)
}

/// A `Stat` object: positive samples, min <= median <= max.
fn check_stat(stat: &Value, what: &str) {
    let get = |k: &str| {
        stat[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}.{k}: {stat}"))
    };
    let (median, min, max) = (get("median"), get("min"), get("max"));
    assert!(min > 0.0, "{what}: {stat}");
    assert!(min <= median && median <= max, "{what}: {stat}");
    assert_eq!(stat["samples"].as_array().unwrap().len(), 3, "{what}");
}

#[test]
fn json_report_is_filled_and_plot_is_svg() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("decode.svg");
    let report = json_of(&bench("3", &["--json", "--plot", plot.to_str().unwrap()]));
    assert_eq!(report["architecture"], "Qwen3MoeForCausalLM");
    let prefill = report["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), 2);
    assert_eq!(prefill[1]["prompt_tokens"], 16);
    for p in prefill {
        check_stat(&p["tokens_per_second"], "prefill tok/s");
        check_stat(&p["ttft_seconds"], "ttft");
    }
    let decode = report["decode"].as_array().unwrap();
    assert_eq!(decode.len(), 2);
    assert_eq!(decode[1]["concurrency"], 3);
    assert_eq!(decode[1]["decode_steps"], 2);
    for d in decode {
        check_stat(&d["aggregate_tokens_per_second"], "aggregate");
        check_stat(&d["per_sequence_tokens_per_second"], "per sequence");
    }
    let roof = &report["roofline"];
    assert!(roof["weight_bytes_per_token"].as_u64().unwrap() > 0);
    for k in [
        "bandwidth_gb_per_s",
        "roofline_tokens_per_second",
        "decode_tokens_per_second",
        "fraction_of_roofline",
    ] {
        assert!(roof[k].as_f64().unwrap() > 0.0, "roofline.{k}: {roof}");
    }
    let peak = report["memory"]["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak >= report["memory"]["rss_after_load_bytes"].as_u64().unwrap());
    assert!(report["expert_cache"].is_null());
    assert!(
        decode[0]["stage_ms_per_step"].is_null(),
        "off without --stage-times"
    );

    let svg = std::fs::read_to_string(&plot).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the plot parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(svg.contains("concurrent sequences"));
}

#[test]
fn budget_adds_cache_stats_and_table_prints() {
    let out = bench("1", &["--expert-budget", "50%"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    for needle in ["prefill", "decode", "roofline", "peak RSS", "hit rate"] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }
    assert!(
        table.contains("% hits"),
        "no per-phase cache cell in:\n{table}"
    );
    let report = json_of(&bench("3", &["--json", "--expert-budget", "50%"]));
    let cache = &report["expert_cache"];
    assert!(cache["lookups"].as_u64().unwrap() > 0, "{cache}");
    assert!(cache["budget_bytes"].as_u64().unwrap() > 0);
    // The phases' lookups and reads add up to the whole run's (stats are reset after the
    // warm-up, and every lookup belongs to one phase).
    let phases: Vec<&Value> = ["prefill", "decode"]
        .iter()
        .flat_map(|k| report[*k].as_array().unwrap())
        .map(|p| &p["expert_cache"])
        .collect();
    let sum = |k: &str| phases.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("lookups"), cache["lookups"].as_u64().unwrap());
    assert_eq!(sum("bytes_read"), cache["bytes_read"].as_u64().unwrap());
    for p in &phases {
        let rate = p["hit_rate"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&rate) && p["lookups"].as_u64().unwrap() > 0,
            "{p}"
        );
    }
}

/// `--expert-dtype q8`: the report and the table say the experts are int8, and the roofline
/// counts one byte per routed-expert parameter (the f32 run's bytes less 3 of every 4 bytes of
/// the active routed parameters).
#[test]
fn q8_experts_are_reported_and_counted_as_int8() {
    let f32_report = json_of(&bench("1", &["--json"]));
    let q8_report = json_of(&bench("1", &["--json", "--expert-dtype", "q8"]));
    assert_eq!(f32_report["expert_dtype"], "f32");
    assert_eq!(q8_report["expert_dtype"], "q8");
    let model = fixture_dir("qwen3_moe").display().to_string();
    let inspect = json_of(&moe_infer(&["inspect", "--model", &model, "--json"]));
    let routed = inspect["params_active_routed"].as_u64().unwrap();
    let bytes = |r: &Value| r["roofline"]["weight_bytes_per_token"].as_u64().unwrap();
    assert_eq!(bytes(&q8_report), bytes(&f32_report) - 3 * routed);
    let out = bench("1", &["--expert-dtype", "q8"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("experts q8"), "{table}");
}

#[test]
fn stage_times_split_each_decode_step() {
    let report = json_of(&bench("3", &["--json", "--stage-times"]));
    for d in report["decode"].as_array().unwrap() {
        let t = &d["stage_ms_per_step"];
        for k in ["attention", "feed_forward", "lm_head"] {
            assert!(t[k].as_f64().unwrap() > 0.0, "{k}: {t}");
        }
        assert!(t["other"].as_f64().unwrap() >= 0.0, "{t}");
        // The stages fit in a step (the average call includes the prompts' prefill, hence
        // the slack): the slowest repetition's step time bounds their sum.
        let per_step_ms = 1e3 / d["per_sequence_tokens_per_second"]["min"].as_f64().unwrap();
        let stages: f64 = ["attention", "feed_forward", "lm_head"]
            .iter()
            .map(|k| t[*k].as_f64().unwrap())
            .sum();
        assert!(
            stages <= per_step_ms * 3.0,
            "{stages} ms of stages vs a {per_step_ms} ms step"
        );
    }
    let out = bench("1", &["--stage-times"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("ms per step") && table.contains("lm head"),
        "{table}"
    );
}
